"""anomalib-gaussft: the GaussFT anomaly detection model as an anomalib plugin.

Attributes are imported lazily so that the start-up hook's ``MVTec`` alias can be
registered without importing the model (and all of ``anomalib.models``).
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "GaussFT": "anomalib_gaussft.gaussft",
    "GaussFTModel": "anomalib_gaussft.gaussft",
    "ModelNotFittedError": "anomalib_gaussft.gaussft",
    "MVTec": "anomalib_gaussft.data",
}

__all__ = [*_LAZY, "__version__"]


def __getattr__(name: str) -> Any:  # noqa: ANN401
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    msg = f"module 'anomalib_gaussft' has no attribute '{name}'"
    raise AttributeError(msg)
