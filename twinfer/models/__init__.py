"""Model families; `get_model_class(config.architectures)` picks one (imported lazily)."""

from twinfer.models.registry import SUPPORTED_ARCHITECTURES, get_model_class

__all__ = ["SUPPORTED_ARCHITECTURES", "get_model_class"]
