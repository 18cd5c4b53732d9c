"""MLflow models-from-code file of a saved larex detector: MLflow runs this file to build the model object (it is
never pickled); the pyfunc class lives in :mod:`larex.tracking`, the only module that imports mlflow. Logged by
``larex-evaluate save_detector=[...]`` with the detector folder (and its weights) as artifacts."""
from larex.tracking import set_detector_model

set_detector_model()
