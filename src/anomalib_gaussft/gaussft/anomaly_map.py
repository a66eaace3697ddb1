"""Combine per-level Mahalanobis maps into one smoothed, full-resolution anomaly map."""

from __future__ import annotations

import torch
import torch.nn.functional as F  # noqa: N812
from anomalib.models.components import GaussianBlur2d
from anomalib.models.components.filters.blur import compute_kernel_size
from torch import nn


class AnomalyMapGenerator(nn.Module):
    """Upsample each level's map to the input size, average the levels, blur.

    Each level map holds ``sqrt(d² / C)``: the Mahalanobis distance divided by the
    square root of the level's width ``C``. For a normal position ``d²`` follows
    roughly a χ² with ``C`` degrees of freedom, so every level is ≈1 on normal data
    and no level dominates the average merely by being wider.

    Args:
        sigma: Standard deviation (pixels) of the Gaussian blur, as in PaDiM.

    """

    def __init__(self, sigma: float = 4.0) -> None:
        super().__init__()
        self.sigma = sigma
        if sigma > 0:
            kernel_size = compute_kernel_size(sigma)
            self.blur: nn.Module = GaussianBlur2d(
                kernel_size=(kernel_size, kernel_size), sigma=(sigma, sigma), channels=1
            )
        else:
            self.blur = nn.Identity()

    def forward(self, level_maps: list[torch.Tensor], image_size: tuple[int, int] | torch.Size) -> torch.Tensor:
        """``level_maps``: ``(N, 1, h, w)`` each → ``(N, 1, H, W)`` anomaly map."""
        upsampled = [F.interpolate(m, size=image_size, mode="bilinear", align_corners=False) for m in level_maps]
        combined = torch.stack(upsampled, dim=0).mean(dim=0)
        return self.blur(combined)
