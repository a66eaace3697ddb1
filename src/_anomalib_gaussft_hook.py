"""Make GaussFT and ``MVTec`` visible to the stock ``anomalib`` CLI and API.

anomalib 2.7 has no plugin entry points: ``--model Name`` resolves only classes
already imported, ``get_model``/``get_datamodule`` look names up as attributes of
``anomalib.models``/``anomalib.data``. The installed ``anomalib_gaussft.pth`` runs
:func:`install` at interpreter start-up. That costs one finder object and no
import: the finder stays inert until some code imports ``anomalib.models`` or
``anomalib.data``; right after those modules finish loading it adds ``GaussFT``
(and ``MVTec``) to them; after ``anomalib.cli.cli`` it makes the CLI print
GaussFT's user errors without a traceback; then it removes itself. A process
that never imports anomalib is not changed in any other way. Set ``ANOMALIB_GAUSSFT_NO_HOOK=1`` to
disable it.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import os
import sys
import warnings

_TARGETS = ("anomalib.models", "anomalib.data", "anomalib.cli.cli")


def _register(fullname: str) -> None:
    from anomalib_gaussft.registration import register, short_cli_errors

    if fullname == "anomalib.cli.cli":
        short_cli_errors(sys.modules[fullname])
    else:
        register(fullname)


class _PostImportLoader(importlib.abc.Loader):
    def __init__(self, loader: importlib.abc.Loader, fullname: str) -> None:
        self._loader = loader
        self._fullname = fullname

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> object:
        return self._loader.create_module(spec)

    def exec_module(self, module: object) -> None:
        self._loader.exec_module(module)
        try:
            _register(self._fullname)
        except Exception as error:  # noqa: BLE001 - a broken plugin must never break anomalib itself
            warnings.warn(f"anomalib-gaussft could not register itself: {error!r}", stacklevel=2)


class _AnomalibFinder(importlib.abc.MetaPathFinder):
    def __init__(self) -> None:
        self._pending = set(_TARGETS)

    def find_spec(self, fullname: str, path: object, target: object = None) -> importlib.machinery.ModuleSpec | None:
        if fullname not in self._pending:
            return None
        self._pending.discard(fullname)
        if not self._pending and self in sys.meta_path:
            sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return None
        spec.loader = _PostImportLoader(spec.loader, fullname)
        return spec


def install() -> None:
    """Install the finder once (called from ``anomalib_gaussft.pth``)."""
    if os.environ.get("ANOMALIB_GAUSSFT_NO_HOOK"):
        return
    if any(isinstance(finder, _AnomalibFinder) for finder in sys.meta_path):
        return
    for name in _TARGETS:  # already imported (e.g. hook installed late): register directly
        if name in sys.modules:
            _register(name)
    sys.meta_path.insert(0, _AnomalibFinder())
