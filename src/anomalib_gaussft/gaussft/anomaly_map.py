"""Combine per-level Mahalanobis maps into one smoothed, full-resolution anomaly map."""

from __future__ import annotations

import torch
import torch.nn.functional as F  # noqa: N812
from anomalib.models.components.filters.blur import compute_kernel_size
from kornia.filters import get_gaussian_kernel1d
from torch import nn


def blur_matrix(size: int, sigma: float) -> torch.Tensor:
    """``(size, size)`` matrix of a 1-D Gaussian blur with reflect padding (anomalib's ``GaussianBlur2d`` per axis).

    Column ``j`` is the blurred unit impulse at ``j``; a side shorter than the kernel's half-width is padded by
    replication instead (reflect padding would fail there).
    """
    kernel_size = compute_kernel_size(sigma)
    kernel = get_gaussian_kernel1d(kernel_size, sigma).to(torch.float64).view(1, 1, -1)
    pad = kernel_size // 2
    impulses = torch.eye(size, dtype=torch.float64).unsqueeze(1)  # (size, 1, size)
    padded = F.pad(impulses, (pad, pad), mode="reflect" if pad < size else "replicate")
    return F.conv1d(padded, kernel)[:, 0].T.contiguous().float()


class AnomalyMapGenerator(nn.Module):
    """Upsample each level's map to the input size, average the levels, blur.

    Each level map holds ``sqrt(d² / C)``: the Mahalanobis distance divided by the
    square root of the level's width ``C``. For a normal position ``d²`` follows
    roughly a χ² with ``C`` degrees of freedom, so every level is ≈1 on normal data
    and no level dominates the average merely by being wider.

    The blur is anomalib's ``GaussianBlur2d`` (PaDiM's, σ = 4, reflect padding) written as two matrix products,
    ``B_H · map · B_Wᵀ``: the Gaussian kernel is separable, so this is the same blur, about 2.5× cheaper than the
    dense 33 × 33 convolution at 224 px, and it is a MatMul that INT8 post-training quantization leaves in float
    (a quantized 1089-tap convolution of a map of small values returned zeros).

    Args:
        sigma: Standard deviation (pixels) of the Gaussian blur, as in PaDiM.
        image_size: Size of the maps whose blur matrices are built up front (others are built when needed).

    """

    def __init__(self, sigma: float = 4.0, image_size: tuple[int, int] | None = None) -> None:
        super().__init__()
        self.sigma = sigma
        self._matrices: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}
        self.size = tuple(image_size) if sigma > 0 and image_size is not None else None
        if self.size is not None:  # buffers: they follow the model's device and export as constants
            self.register_buffer("rows_matrix", blur_matrix(self.size[0], sigma), persistent=False)
            self.register_buffer("cols_matrix", blur_matrix(self.size[1], sigma), persistent=False)

    def _blur_matrices(self, size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        if size == self.size:
            return self.rows_matrix, self.cols_matrix
        if size not in self._matrices:
            self._matrices[size] = (blur_matrix(size[0], self.sigma), blur_matrix(size[1], self.sigma))
        return self._matrices[size]

    def blur(self, anomaly_map: torch.Tensor) -> torch.Tensor:
        """Gaussian blur of ``(N, 1, H, W)`` maps (identity with ``sigma=0``)."""
        if self.sigma <= 0:
            return anomaly_map
        rows, cols = self._blur_matrices(tuple(anomaly_map.shape[-2:]))
        rows, cols = rows.to(anomaly_map), cols.to(anomaly_map)
        return rows @ (anomaly_map @ cols.T)  # constant left operand last: see AntialiasedResize.forward

    def forward(self, level_maps: list[torch.Tensor], image_size: tuple[int, int] | torch.Size) -> torch.Tensor:
        """``level_maps``: ``(N, 1, h, w)`` each → ``(N, 1, H, W)`` anomaly map."""
        upsampled = [F.interpolate(m, size=image_size, mode="bilinear", align_corners=False) for m in level_maps]
        combined = torch.stack(upsampled, dim=0).mean(dim=0)
        return self.blur(combined)
