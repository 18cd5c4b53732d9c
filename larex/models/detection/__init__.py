"""Detector adapters: one module per family, each a :class:`~larex.models.detection.base.DetectorAdapter`."""
