"""sparse-mae: FCMAE (ConvNeXt V2) pretraining with true sparse encoders."""
from sparse_mae.backends import available_backends, get_backend, list_backends
from sparse_mae.build import create_model
from sparse_mae.models import list_models

__version__ = "0.1.0"

__all__ = ["available_backends", "create_model", "get_backend", "list_backends", "list_models", "__version__"]
