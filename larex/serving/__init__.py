"""Serving a saved detector: the MLflow models-from-code file (:mod:`larex.serving.detector_model`)."""
