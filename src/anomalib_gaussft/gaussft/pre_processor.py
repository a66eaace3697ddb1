"""Pre-processing that the exported model computes exactly like the torch model.

anomalib's exportable transform turns ``Resize(antialias=True)`` into a plain bilinear resize, because ONNX's
``Resize`` antialias attribute is not honoured by OpenVINO (measured here: it returns the non-antialiased
result). Camera images (e.g. 900 × 900 px) scaled down to the backbone's input were then scored differently
by the exported model than by the torch model (5.4e-2 on a normalised score). :class:`AntialiasedResize`
computes torch's antialiased bilinear resize as two matrix products whose weights are built from the input
size with plain tensor ops, so it exports to ONNX/OpenVINO with dynamic input sizes and matches
``torch.nn.functional.interpolate(..., antialias=True)`` to float precision.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from anomalib.pre_processing import PreProcessor
from anomalib.pre_processing.utils.transform import get_exportable_transform
from torch import nn
from torchvision.transforms.v2 import Compose, Normalize, Resize, Transform


def resize_weights(positions: torch.Tensor, out_size: int) -> torch.Tensor:
    """``(out_size, in_size)`` weights of torch's antialiased bilinear resize along one axis.

    Output pixel ``i`` is centred at ``(i + 0.5) · s`` in input coordinates (``s = in / out``); input pixel ``j``
    (centre ``j + 0.5``) gets the triangle weight ``max(0, 1 − |j + 0.5 − centre| / max(s, 1))``, normalised per
    output pixel: PIL's and torch's antialiasing filter for bilinear interpolation (a plain bilinear resize when
    enlarging). ``positions``: ``arange(in_size) + 0.5`` in the working dtype.
    """
    scale = (positions[-1:] + 0.5) / out_size  # in_size / out_size, as a tensor (export-friendly)
    centres = (torch.arange(out_size, dtype=positions.dtype, device=positions.device) + 0.5) * scale
    weights = torch.relu(1.0 - (positions[None, :] - centres[:, None]).abs() / scale.clamp(min=1.0))
    return weights / weights.sum(dim=1, keepdim=True)


class AntialiasedResize(nn.Module):
    """Resize ``(N, C, H, W)`` images to ``size`` with torch's antialiased bilinear filter, in exportable ops.

    Args:
        size: Output ``(height, width)``.

    """

    def __init__(self, size: Sequence[int]) -> None:
        super().__init__()
        self.size = (int(size[0]), int(size[1]))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Resized images."""
        rows = torch.arange(images.shape[-2], dtype=images.dtype, device=images.device) + 0.5
        cols = torch.arange(images.shape[-1], dtype=images.dtype, device=images.device) + 0.5
        # R · (X · Cᵀ), not (R · X) · Cᵀ: with a static input size OpenVINO's CPU plugin turns a product whose
        # right operand is constant into a fully-connected layer and fuses the next per-channel Normalize into
        # it as if its channels were the last axis, and the compilation fails ("data.size() == OC").
        return resize_weights(rows, self.size[0]) @ (images @ resize_weights(cols, self.size[1]).T)


def exportable_transform(transform: Transform | None) -> Any:  # noqa: ANN401 - a transform or a module
    """Anomalib's exportable transform, with antialiased two-sided ``Resize`` kept as :class:`AntialiasedResize`."""
    if isinstance(transform, Compose):
        return Compose([exportable_transform(t) for t in transform.transforms])
    if isinstance(transform, Resize) and transform.antialias and len(transform.size or ()) == 2:
        return AntialiasedResize(transform.size)
    return get_exportable_transform(transform)


class GaussFTPreProcessor(PreProcessor):
    """anomalib's ``PreProcessor`` whose exported graph resizes with the same antialiasing as training and test.

    Args:
        image_size: Input ``(height, width)`` of the backbone.
        mean: Normalisation mean of the backbone's weights.
        std: Normalisation std of the backbone's weights.

    """

    def __init__(self, image_size: Sequence[int], mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__(transform=Compose([Resize(tuple(image_size), antialias=True), Normalize(mean=mean, std=std)]))
        self.export_transform = exportable_transform(self.transform)

    def load_checkpoint_config(self, config: dict[str, Any]) -> None:
        """Restore the checkpoint's transform, and its exportable twin."""
        super().load_checkpoint_config(config)
        self.export_transform = exportable_transform(self.transform)
