"""The one place that makes ``GaussFT`` and ``MVTec`` visible to anomalib's name lookups.

anomalib 2.7 has no plugin entry points: ``get_model``/``get_datamodule`` (and so ``anomalib benchmark``)
look names up as attributes of ``anomalib.models``/``anomalib.data``. :func:`register` adds ours there. It
is called by the start-up hook right after anomalib imports one of those modules, and by our own modules at
the end of their import (which covers processes that run without the hook).
"""

from __future__ import annotations

import importlib
import sys

# anomalib module → (attribute to add, our module that defines it)
TARGETS = {
    "anomalib.models": ("GaussFT", "anomalib_gaussft.gaussft"),
    "anomalib.data": ("MVTec", "anomalib_gaussft.data"),
}


def register(target: str) -> None:
    """Add our class to the already imported anomalib module ``target`` (a key of :data:`TARGETS`)."""
    name, source = TARGETS[target]
    if source in sys.modules and not hasattr(sys.modules[source], name):
        return  # our module is being imported right now: it calls register() itself when it is complete
    setattr(sys.modules[target], name, getattr(importlib.import_module(source), name))
