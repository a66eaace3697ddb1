"""The layout term on its pooling grids: its Gaussians, its distance L and its map, averaged over the grids.

``layout_grids`` 2 reads the deepest map level on two 3 × 3 grids one feature position apart, each with its own
Gaussian (``layout_gaussian`` and ``offset_layout_gaussian``, the second under its own name so that checkpoints
with one grid load unchanged); 1 reads the whole map on one grid (docs/local_evidence.md, "The layout on two offset
grids").
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from .feature_samples import layout_vectors

if TYPE_CHECKING:
    from .gaussian import StreamingGaussian
    from .layout_map import LayoutMap
    from .torch_model import Features, GaussFTModel


class LayoutTerm:
    """Mixin of :class:`GaussFTModel`: the layout term's Gaussians, samples, distance and map, one per grid."""

    def _uses_layout_map(self: GaussFTModel, map_layout: bool | None) -> bool:
        if map_layout and self.layout_gaussian is None:
            msg = (
                f"map_layout=True needs the layout term of image_score 'local' or 'combined' (got "
                f"{self.image_score.value!r}); set map_layout to null or false."
            )
            raise ValueError(msg)
        return self.layout_gaussian is not None if map_layout is None else bool(map_layout)

    def _score_reads_layout_map(self: GaussFTModel, score_layout_map: bool | None) -> bool:
        if score_layout_map and self.layout_map is None:
            msg = (
                "score_layout_map=True needs the layout map (map_layout on, image_score 'local' or 'combined'); "
                "set score_layout_map to null or false."
            )
            raise ValueError(msg)
        return self.layout_map is not None if score_layout_map is None else bool(score_layout_map)

    def layout_gaussians(self: GaussFTModel) -> list[StreamingGaussian]:
        """The layout term's Gaussians, one per pooling grid (none without a layout term)."""
        return [g for g in (self.layout_gaussian, self.offset_layout_gaussian) if g is not None]

    def layout_maps(self: GaussFTModel) -> list[LayoutMap]:
        """The layout map's per-cell whitenings, one per pooling grid (none without a layout map)."""
        return [m for m in (self.layout_map, self.offset_layout_map) if m is not None]

    def layout_samples(self: GaussFTModel, features: Features) -> list[torch.Tensor]:
        """``(N, 1, C · 9)`` layout vectors of the layout level, one per pooling grid (``layout_grids``)."""
        return layout_vectors(features[self.layout_level], self.layout_grids)

    def layout_distance(self: GaussFTModel, features: Features) -> torch.Tensor:
        """``(N,)`` the layout term: the layout vector's Mahalanobis distance, averaged over the pooling grids."""
        grids = zip(self.layout_gaussians(), self.layout_samples(features), strict=True)
        squared = [gaussian.squared_mahalanobis(vector) for gaussian, vector in grids]
        return torch.sqrt(torch.cat(squared, dim=1).clamp_min(0)).mean(dim=1)

    def upsampled_layout_map(
        self: GaussFTModel, features: Features, image_size: tuple[int, int] | torch.Size
    ) -> torch.Tensor | None:
        """The layout map's cells, averaged over the grids, upsampled and blurred to ``(N, 1, H, W)`` (or ``None``)."""
        if self.layout_map is None:
            return None
        grids = zip(self.layout_maps(), self.layout_samples(features), self.layout_gaussians(), strict=True)
        cells = torch.stack([layout_map(vector, gaussian) for layout_map, vector, gaussian in grids]).mean(dim=0)
        return self.anomaly_map_generator([cells], image_size)
