"""``MVTec``: the anomalib 1.x name of the MVTec AD datamodule, kept working on anomalib 2.x."""

from anomalib.data import MVTecAD


class MVTec(MVTecAD):
    """Alias of :class:`anomalib.data.MVTecAD` so that ``--data MVTec`` keeps working."""


__all__ = ["MVTec"]

import anomalib.data as _anomalib_data  # noqa: E402

# ``get_datamodule`` (used by ``anomalib benchmark``) looks names up on ``anomalib.data``.
_anomalib_data.MVTec = MVTec
