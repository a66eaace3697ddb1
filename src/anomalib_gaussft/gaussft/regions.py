"""Image regions of a feature map: the positions that share one regional map Gaussian."""

from __future__ import annotations

import torch


def region_grid(height: int, width: int, regions: int) -> tuple[int, int]:
    """``(rows, cols)`` of the region grid of a ``height × width`` map: ``regions`` per side, ≤ 1 per position."""
    return min(regions, height), min(regions, width)


def region_index(height: int, width: int, grid: tuple[int, int], device: torch.device | None = None) -> torch.Tensor:
    """Region of every position of an ``height × width`` map, row-major ``(height * width,)``.

    Position ``(i, j)`` lies in region ``(⌊i·rows/height⌋, ⌊j·cols/width⌋)`` of the ``grid``: near-equal blocks
    that cover the map whatever its size, so a map of another size than the fitted one still finds its regions.
    """
    rows, cols = grid
    row = torch.div(torch.arange(height, device=device) * rows, height, rounding_mode="floor")
    col = torch.div(torch.arange(width, device=device) * cols, width, rounding_mode="floor")
    return (row[:, None] * cols + col[None, :]).flatten()
