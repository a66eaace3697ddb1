"""Fuse the neighbourhood-averaged anomaly map with an unaveraged detail map: per-pixel max on a common scale.

The 3 × 3 neighbourhood average (PatchCore's local aggregation) makes the map of a large defect solid, but it
dilutes a defect one feature position wide: DeepPCB's pixel AUROC is 0.713 with it and 0.829 without
(docs/local_evidence.md). The two maps live on different scales on normal images (the unaveraged one is
noisier, with a heavier upper tail), so each is first put on the scale of its own upper tail on held-out
normals, ``(m - median) / (q99 - median)``: 0 is a typical normal pixel and 1 the 99th percentile of normal
pixels, for both maps. The per-pixel maximum then keeps whichever map fires. No anomaly chooses anything.
"""

from __future__ import annotations

import torch
from torch import nn

MAP_NAMES = ("averaged", "detail")
TAIL_QUANTILE = 0.99  # a scaled map reads 1 at this quantile of the held-out normal pixels
PIXELS_PER_IMAGE = 4096  # pixels kept per held-out map for the quantiles (a strided subsample)
MAX_PIXELS = 4_000_000  # per map; a longer sample is thinned evenly (torch.quantile's input limit is 16M)


class MapFusion(nn.Module):
    """Median and upper tail of each map's pixels on held-out normals; the fused map is the max of the scaled maps.

    Until fitted (``median`` 0, ``scale`` 1) the fused map is the max of the raw maps, which are both in
    ``sqrt(d² / C)`` units (≈1 on normal positions).
    """

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("median", torch.zeros(len(MAP_NAMES)))
        self.register_buffer("scale", torch.ones(len(MAP_NAMES)))
        self._pixels: list[torch.Tensor] = []  # (P, 2) subsampled pixels of the held-out maps while accumulating

    def reset(self) -> None:
        """Forget the accumulated pixels (the fitted constants stay)."""
        self._pixels = []

    @torch.no_grad()
    def update(self, averaged: torch.Tensor, detail: torch.Tensor) -> None:
        """Keep an evenly strided sample of the pixels of a batch of held-out normal maps ``(N, 1, H, W)``."""
        maps = torch.stack([averaged.flatten(1), detail.flatten(1)], dim=-1)  # (N, H·W, 2)
        stride = max(1, maps.shape[1] // PIXELS_PER_IMAGE)
        self._pixels.append(maps[:, ::stride].reshape(-1, len(MAP_NAMES)).float().cpu())

    @torch.no_grad()
    def fit(self) -> None:
        """Set each map's median and tail scale ``q99 - median`` from the accumulated pixels."""
        if not self._pixels:
            msg = "The map fusion needs the pixels of at least one held-out normal map (update() before fit())."
            raise ValueError(msg)
        pixels = torch.cat(self._pixels)
        pixels = pixels[:: -(-len(pixels) // MAX_PIXELS)]
        quantiles = torch.quantile(pixels, torch.tensor([0.5, TAIL_QUANTILE]), dim=0)  # (2, maps)
        median, tail = quantiles[0], quantiles[1]
        # A map (nearly) constant on the normals (degenerate data) must not divide by zero.
        scale = torch.maximum(tail - median, 1e-6 * median.abs().clamp_min(1.0))
        self.median.copy_(median.to(self.median))
        self.scale.copy_(scale.to(self.scale))
        self.reset()

    def forward(self, averaged: torch.Tensor, detail: torch.Tensor) -> torch.Tensor:
        """Per-pixel max of the two scaled maps, ``(N, 1, H, W)``."""
        scaled_averaged = (averaged - self.median[0]) / self.scale[0]
        return torch.maximum(scaled_averaged, (detail - self.median[1]) / self.scale[1])
