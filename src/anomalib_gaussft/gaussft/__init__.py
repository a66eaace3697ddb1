"""GaussFT model: lightning module, torch model and components."""

from .lightning_model import GaussFT
from .torch_model import GaussFTModel, ModelNotFittedError

__all__ = ["GaussFT", "GaussFTModel", "ModelNotFittedError"]

import anomalib.models as _anomalib_models

# Make ``get_model("GaussFT")`` and ``{"class_path": "GaussFT"}`` work once this package is imported.
_anomalib_models.GaussFT = GaussFT
