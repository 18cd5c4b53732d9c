"""Tasks: what differs between classification, detection, segmentation and LLMs (``configs/task/<name>.yaml``)."""
