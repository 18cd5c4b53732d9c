"""Object detection: the Task's geometry (letterbox / resize and box mapping) first; the Task, adapters and box
producers follow (issue "Object detection")."""
