"""``MVTec``: the anomalib 1.x name of the MVTec AD datamodule, kept working on anomalib 2.x."""

from anomalib.data import MVTecAD


class MVTec(MVTecAD):
    """Alias of :class:`anomalib.data.MVTecAD` so that ``--data MVTec`` keeps working."""


__all__ = ["MVTec"]

from anomalib_gaussft.registration import register  # noqa: E402

register("anomalib.data")  # ``get_datamodule("MVTec")`` (used by ``anomalib benchmark``)
