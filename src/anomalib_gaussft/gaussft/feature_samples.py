"""Feature maps turned into the samples of GaussFT's Gaussians: pooled vectors, the layout, neighbourhood means."""

from __future__ import annotations

import torch
import torch.nn.functional as F  # noqa: N812


def pooled(features: torch.Tensor) -> torch.Tensor:
    """Global average pooling ``(N, C, H, W)`` → ``(N, 1, C)`` (one sample per image for a 1-group Gaussian)."""
    return features.mean(dim=(2, 3)).unsqueeze(1)


LAYOUT_GRID = 3  # the layout term pools the deepest map level to a 3 × 3 grid (DFM-like coarse layout)


def layout_vector(features: torch.Tensor) -> torch.Tensor:
    """``(N, C, h, w)`` → ``(N, 1, C · 9)``: the map pooled to a 3 × 3 grid, one joint sample per image."""
    return F.adaptive_avg_pool2d(features, LAYOUT_GRID).flatten(1).unsqueeze(1)


def layout_offset(size: int) -> int:
    """Positions between the two layout grids along a map side of ``size``: one per 14 (1 for lite0 at 224 px)."""
    return max(1, round(size / 14)) if size > LAYOUT_GRID else 0


def layout_vectors(features: torch.Tensor, grids: int) -> list[torch.Tensor]:
    """One :func:`layout_vector` per pooling grid of the layout term.

    ``grids`` 1: the whole map. 2: two grids offset by :func:`layout_offset` positions, the map without its last
    rows and columns and the map without its first ones. Each grid's 3 × 3 cells cut the image elsewhere, so the
    mean of their evidence depends less on where one grid's cell borders happen to fall (measured in
    docs/local_evidence.md, "The layout on two offset grids").
    """
    if grids == 1:
        return [layout_vector(features)]
    h, w = features.shape[-2:]
    rows, cols = layout_offset(h), layout_offset(w)
    return [layout_vector(features[..., : h - rows, : w - cols]), layout_vector(features[..., rows:, cols:])]


def neighbourhood_average(features: torch.Tensor, size: int) -> torch.Tensor:
    """``(N, C, h, w)`` → the same shape, each position the mean of the ``size × size`` positions around it.

    Positions outside the map do not count (``count_include_pad=False``), so border positions average fewer
    neighbours instead of mixing in zeros. ``size`` 1 returns ``features`` unchanged.
    """
    if size == 1:
        return features
    return F.avg_pool2d(features, size, stride=1, padding=size // 2, count_include_pad=False)
