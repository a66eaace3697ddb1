"""The one place where GaussFT joins anomalib: its names, and short CLI errors.

anomalib 2.7 has no plugin entry points: ``get_model``/``get_datamodule`` (and so ``anomalib benchmark``)
look names up as attributes of ``anomalib.models``/``anomalib.data``. :func:`register` adds ours there. It
is called by the start-up hook right after anomalib imports one of those modules, and by our own modules at
the end of their import (which covers processes that run without the hook).
"""

from __future__ import annotations

import functools
import importlib
import sys
from collections.abc import Callable
from typing import Any

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


def short_cli_errors(cli_module: Any) -> None:  # noqa: ANN401 - the module anomalib.cli.cli
    """Make ``anomalib``'s console script print a :class:`GaussFTUserError` as one message, exit status 1.

    anomalib's CLI installs rich's traceback printer, which turns an error that names a file or an option into
    a hundred lines of frames; the message is what the user needs.
    """
    main: Callable[..., Any] = cli_module.main

    @functools.wraps(main)
    def main_with_short_errors(*args: Any, **kwargs: Any) -> Any:  # noqa: ANN401
        from anomalib_gaussft.errors import GaussFTUserError

        try:
            return main(*args, **kwargs)
        except GaussFTUserError as error:
            print(f"error: {error}", file=sys.stderr)
            raise SystemExit(1) from None

    cli_module.main = main_with_short_errors
