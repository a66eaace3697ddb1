"""Fuse the anomaly maps on a common scale: the averaged map, a detail map (max) and the layout map (excess).

The 3 × 3 neighbourhood average (PatchCore's local aggregation) makes the map of a large defect solid, but it
dilutes a defect one feature position wide: DeepPCB's pixel AUROC is 0.713 with it and 0.829 without
(docs/local_evidence.md). The maps live on different scales on normal images (the unaveraged one is noisier,
with a heavier upper tail), so each is first put on the scale of its own upper tail on held-out normals,
``(m - median) / (q99 - median)``: 0 is a typical normal pixel and 1 the 99th percentile of normal pixels, for
every map. The per-pixel maximum of the averaged and the detail map keeps whichever fires.

The layout map (the layout term per 3 × 3 cell, ``layout_map.py``) is coarse: through the max it would raise whole
thirds of an image and bury small defects (KolektorSDD −0.03, DeepPCB −0.05 pixel AUROC). It is added only by
its excess over its tail, ``+ relu(s_layout − 1)``: silent on normal-looking layouts, it lifts large diffuse
defects that the local maps miss. Its tail is the 99th percentile of a Gaussian with the held-out pixels' mean and
standard deviation, ``mean + 2.326 · std``, not their empirical 99th percentile: the map has only nine independent
values per image, so the empirical tail rests on a handful of held-out cells and moved Magnetic Tile's pixel AUROC
by ± 0.012 with the held-out draw (0.847 on average); the moments are stable (0.866 ± 0.002;
docs/local_evidence.md).

The excess is weighted by how little the local maps found in the image, ``τ / max(max h, μ)``, with ``h`` the max of
the scaled averaged and detail maps, and ``μ`` and ``τ = μ + 2.326 σ`` the mean and the Gaussian 99th percentile of
the held-out images' ``max h``. An image whose local maps peak no higher than a typical normal image's gets ``τ / μ``
times the excess (1.3-2.5 on the sets measured): the diffuse defect they miss. One whose small defect they find
k times above ``τ`` gets 1/k of it, so the coarse cell no longer lifts the normal pixels around that defect. Measured
(docs/local_evidence.md, cached features, held-out draws): BSData +0.004, textures +0.002 to +0.006 pixel AUROC,
Magnetic Tile +0.003 at 200 training images and +0.018 with all 666; no set loses more than 0.001. No anomaly
chooses anything.
"""

from __future__ import annotations

from statistics import NormalDist

import torch
from torch import nn

TAIL_QUANTILE = 0.99  # a scaled map reads 1 at this quantile of the held-out normal pixels
# The layout map's tail: TAIL_QUANTILE of a Gaussian fitted to its held-out pixels, in standard deviations.
LAYOUT_TAIL_Z = NormalDist().inv_cdf(TAIL_QUANTILE)
PIXELS_PER_IMAGE = 4096  # pixels kept per held-out map for the quantiles (a strided subsample)
MAX_PIXELS = 4_000_000  # per map; a longer sample is thinned evenly (torch.quantile's input limit is 16M)


class MapFusion(nn.Module):
    """Centre and upper tail of each map's pixels on held-out normals; the fused map combines the scaled maps.

    The averaged and detail maps are scaled by ``(m − median) / (q99 − median)``, the layout map by
    ``(m − mean) / (2.326 · std)`` (its buffers keep the names ``layout_median`` / ``layout_scale``); its excess is
    weighted per image by ``min(layout_weight_cap, layout_gate / max h)`` (``layout_gate`` = τ,
    ``layout_weight_cap`` = τ / μ: the same as ``τ / max(max h, μ)``).

    Until fitted (``median`` 0, ``scale`` 1, ``layout_gate`` ∞, ``layout_weight_cap`` 1) the raw maps are fused, all
    in ``sqrt(d² / C)`` units (≈1 on normal positions), with the whole excess. A checkpoint written before the weight
    existed loads with those values: the heatmap it was fitted with.

    Args:
        detail: Whether a detail map is maxed with the averaged map.
        layout: Whether the layout map's excess over its tail is added.

    """

    def __init__(self, detail: bool = True, layout: bool = False) -> None:
        super().__init__()
        self.detail, self.layout = detail, layout
        # Maxed maps' constants first (the buffers of checkpoints without a layout map), then the layout map's.
        self.register_buffer("median", torch.zeros(1 + detail))
        self.register_buffer("scale", torch.ones(1 + detail))
        if layout:
            self.register_buffer("layout_median", torch.zeros(1))
            self.register_buffer("layout_scale", torch.ones(1))
            self.register_buffer("layout_gate", torch.full((1,), float("inf")))
            self.register_buffer("layout_weight_cap", torch.ones(1))
        self._pixels: list[torch.Tensor] = []  # (P, maps) subsampled pixels of the held-out maps while accumulating
        self._maxima: list[torch.Tensor] = []  # (N, maxed maps) each held-out image's raw maximum of the maxed maps

    @property
    def names(self) -> list[str]:
        """The fused maps, in the order of the accumulated pixel columns."""
        return ["averaged", *(["detail"] if self.detail else []), *(["layout"] if self.layout else [])]

    def reset(self) -> None:
        """Forget the accumulated pixels (the fitted constants stay)."""
        self._pixels, self._maxima = [], []

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: object) -> None:
        """A checkpoint from before the excess weight (no ``layout_gate``) keeps the whole excess, as it was fitted."""
        if self.layout and f"{prefix}layout_median" in state_dict and f"{prefix}layout_gate" not in state_dict:
            state_dict[f"{prefix}layout_gate"] = torch.full_like(self.layout_gate, float("inf"))
            state_dict[f"{prefix}layout_weight_cap"] = torch.ones_like(self.layout_weight_cap)
        super()._load_from_state_dict(state_dict, prefix, *args)

    def _maps(
        self, averaged: torch.Tensor, detail: torch.Tensor | None, layout: torch.Tensor | None
    ) -> list[torch.Tensor]:
        maps = [averaged, *([detail] if self.detail else []), *([layout] if self.layout else [])]
        if any(m is None for m in maps):
            msg = f"MapFusion fuses {self.names}: pass every one of these maps."
            raise ValueError(msg)
        return maps

    @torch.no_grad()
    def update(
        self, averaged: torch.Tensor, detail: torch.Tensor | None = None, layout: torch.Tensor | None = None
    ) -> None:
        """Keep an evenly strided sample of the pixels of a batch of held-out normal maps ``(N, 1, H, W)``."""
        maps = torch.stack([m.flatten(1) for m in self._maps(averaged, detail, layout)], dim=-1)  # (N, H·W, maps)
        stride = max(1, maps.shape[1] // PIXELS_PER_IMAGE)
        self._pixels.append(maps[:, ::stride].reshape(-1, maps.shape[-1]).float().cpu())
        if self.layout:  # the excess weight's constants: each image's peak of the maxed maps
            self._maxima.append(maps[..., : len(self.median)].amax(dim=1).float().cpu())

    @torch.no_grad()
    def fit(self) -> None:
        """Set each map's centre and tail scale from the accumulated pixels (quantiles; the layout map: moments)."""
        if not self._pixels:
            msg = "The map fusion needs the pixels of at least one held-out normal map (update() before fit())."
            raise ValueError(msg)
        pixels = torch.cat(self._pixels)
        pixels = pixels[:: -(-len(pixels) // MAX_PIXELS)]
        maxed = len(self.median)
        quantiles = torch.quantile(pixels[:, :maxed], torch.tensor([0.5, TAIL_QUANTILE]), dim=0)  # (2, maxed)
        self.median.copy_(quantiles[0].to(self.median))
        self.scale.copy_(_positive(quantiles[1] - quantiles[0], quantiles[0]).to(self.scale))
        if self.layout:
            layout = pixels[:, maxed:].double()  # moments in float64: millions of pixels
            centre = layout.mean(dim=0)
            self.layout_median.copy_(centre.to(self.layout_median))
            # one pixel in all has no spread (floored below); std of one sample would be NaN with a warning
            spread = layout.std(dim=0) if len(layout) > 1 else torch.zeros_like(centre)
            self.layout_scale.copy_(_positive(LAYOUT_TAIL_Z * spread, centre).to(self.layout_scale))
            typical, tail = self._peak_constants(torch.cat(self._maxima))
            self.layout_gate.copy_(tail.to(self.layout_gate))
            self.layout_weight_cap.copy_((tail / typical).to(self.layout_weight_cap))
        self.reset()

    def _peak_constants(self, maxima: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(μ, τ)``: mean and Gaussian q99 of the held-out images' ``max h`` (from their raw per-map maxima)."""
        peaks = ((maxima.double() - self.median.double()) / self.scale.double()).amax(dim=1)  # (N,) max h
        spread = peaks.std() if len(peaks) > 1 else torch.zeros((), dtype=peaks.dtype)
        # Floored: peaks at or below 0 (degenerate data) would silence or invert the weight.
        typical = peaks.mean().clamp_min(1e-6)
        return typical.reshape(1), (typical + LAYOUT_TAIL_Z * spread).reshape(1)

    @property
    def constants(self) -> list[tuple[str, float, float]]:
        """``(map, centre, scale)`` of every fused map (the layout map's centre is its mean, the others' median)."""
        medians, scales = self.median.tolist(), self.scale.tolist()
        if self.layout:
            medians, scales = medians + self.layout_median.tolist(), scales + self.layout_scale.tolist()
        return list(zip(self.names, medians, scales, strict=True))

    def scaled_averaged(self, averaged: torch.Tensor) -> torch.Tensor:
        """The averaged map on its held-out scale (0: a typical normal pixel, 1: their 99th percentile)."""
        return (averaged - self.median[0]) / self.scale[0]

    def layout_excess(self, layout: torch.Tensor) -> torch.Tensor:
        """The layout map's excess over its held-out tail, ``relu(s_layout − 1)``."""
        return ((layout - self.layout_median) / self.layout_scale - 1).relu()

    def excess_weight(self, local: torch.Tensor) -> torch.Tensor:
        """``τ / max(max h, μ)`` per image ``(N, 1, 1, 1)`` of the scaled local map ``h`` ``(N, 1, H, W)``."""
        peak = local.amax(dim=(-3, -2, -1), keepdim=True).clamp_min(1e-6)
        # Written as a capped ratio (cap τ / μ): an unfitted or older model (τ = ∞, cap 1) then weighs 1, also in FP16.
        return torch.minimum(self.layout_gate / peak, self.layout_weight_cap)

    def forward(
        self, averaged: torch.Tensor, detail: torch.Tensor | None = None, layout: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The fused map ``(N, 1, H, W)``: scaled averaged and detail maps maxed, plus the weighted layout excess."""
        self._maps(averaged, detail, layout)
        fused = self.scaled_averaged(averaged)
        if self.detail:
            fused = torch.maximum(fused, (detail - self.median[1]) / self.scale[1])
        if self.layout:
            fused = fused + self.layout_excess(layout) * self.excess_weight(fused)
        return fused


def _positive(scale: torch.Tensor, centre: torch.Tensor) -> torch.Tensor:
    """``scale`` kept above zero: a map (nearly) constant on the normals (degenerate data) must not divide by zero."""
    return torch.maximum(scale, 1e-6 * centre.abs().clamp_min(1.0))
