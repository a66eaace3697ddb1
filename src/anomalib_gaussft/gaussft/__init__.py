"""GaussFT model: lightning module, torch model and components."""

from .lightning_model import GaussFT
from .torch_model import GaussFTModel, ModelNotFittedError

__all__ = ["GaussFT", "GaussFTModel", "ModelNotFittedError"]

from anomalib_gaussft.registration import register

register("anomalib.models")  # ``get_model("GaussFT")`` works once this package is imported
