"""Image scores with local evidence: sums of z-scored terms (pooled distance, layout distance, top of the map).

The paper's pooled score cannot see a defect that covers 0.2 % of the image; the mean of the anomaly map's top 1 %
can, and the layout distance (the deepest map level pooled to a coarse grid, one joint Gaussian) sees a part
that is out of place. ``"local"`` (the default) sums the layout and map terms; ``"combined"`` adds the paper's
pooled score, which is shift-invariant and carries unaligned surfaces where the layout term sees only
nuisance, at a small cost on aligned parts (docs/local_evidence.md). The terms live on different scales, so
each is z-scored with its mean and standard deviation on held-out normal images: no anomaly chooses a weight.
"""

from __future__ import annotations

import math

import torch
from torch import nn

TOP_FRACTION = 0.01  # share of the anomaly map's pixels whose mean is the map term
# The z-scored terms of each normalised image score, in the order ``GaussFTModel.score_terms`` returns them.
TERMS = {"local": ("layout", "map_top"), "combined": ("pooled", "layout", "map_top")}
MIN_NORMALISATION_IMAGES = 2
UNNORMALISED_WARNING = (
    "Too few training images to hold out normals for the normalisation of the image score and the map fusion: "
    "all are fitted, the score's terms are summed unnormalised and the fused map is the max of the raw maps. Add "
    "normal images (≥ 20 advised), or set image_score='gaussian_ad' and map_detail_levels=[]."
)


def top_fraction_mean(anomaly_map: torch.Tensor, fraction: float = TOP_FRACTION) -> torch.Tensor:
    """Mean of the largest ``⌈fraction · H · W⌉`` values of each ``(N, 1, H, W)`` map, ``(N,)``."""
    flat = anomaly_map.flatten(1)
    k = max(1, math.ceil(fraction * flat.shape[1]))
    return flat.topk(k, dim=1).values.mean(dim=1)


class ScoreNormalisation(nn.Module):
    """Per-term mean and standard deviation on held-out normals; the score is the sum of the z-scores."""

    def __init__(self, n_terms: int = 2) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(n_terms))
        self.register_buffer("std", torch.ones(n_terms))

    @torch.no_grad()
    def fit(self, terms: torch.Tensor) -> None:
        """Set mean and (unbiased) std from ``(N, n_terms)`` terms of normal images."""
        if len(terms) < MIN_NORMALISATION_IMAGES:
            msg = f"The image-score normalisation needs at least {MIN_NORMALISATION_IMAGES} images, got {len(terms)}."
            raise ValueError(msg)
        terms = terms.to(torch.float64)
        mean, std = terms.mean(0), terms.std(0)
        # A term constant on the normals (degenerate data) must not divide by zero.
        std = torch.maximum(std, 1e-6 * mean.abs().clamp_min(1.0))
        self.mean.copy_(mean.to(self.mean))
        self.std.copy_(std.to(self.std))

    def forward(self, terms: torch.Tensor) -> torch.Tensor:
        """``(N, n_terms)`` → ``(N,)`` sum of the z-scored terms."""
        return ((terms - self.mean) / self.std).sum(dim=1)
