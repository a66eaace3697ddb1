"""What GaussFT's fine-tuning loss measures: the Gaussians it targets and the feature samples it feeds them."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from .feature_samples import neighbourhood_average, pooled
from .hyperparameters import LossFeatures, MapGaussian

if TYPE_CHECKING:
    from .gaussian import StreamingGaussian
    from .loss import LossSamples
    from .torch_model import Features, GaussFTModel


class FineTuningTargets:
    """Mixin of :class:`GaussFTModel`: the loss's targets, pooled levels or map levels and the layout."""

    def loss_targets(self: GaussFTModel, kind: LossFeatures | str) -> dict[str, StreamingGaussian]:
        """The Gaussians the fine-tuning loss measures against: pooled levels, or map levels and the layout."""
        if LossFeatures(kind) == LossFeatures.POOLED:
            return {f"pooled_{lvl}": gaussian for lvl, gaussian in self.image_gaussians.items()}
        targets = {f"map_{lvl}": gaussian for lvl, gaussian in self.map_gaussians.items()}
        for grid, gaussian in enumerate(self.layout_gaussians()):
            targets["layout" if grid == 0 else f"layout_{grid}"] = gaussian
        return targets

    def loss_levels(self: GaussFTModel, kind: LossFeatures | str) -> list[int]:
        """The levels whose features :meth:`loss_samples` reads."""
        return list(self.levels) if LossFeatures(kind) == LossFeatures.POOLED else list(self.map_levels)

    def loss_samples(self: GaussFTModel, features: Features, kind: LossFeatures | str) -> LossSamples:
        """Samples of :meth:`loss_targets`: one pooled sample per image, or every map position with its group."""
        if LossFeatures(kind) == LossFeatures.POOLED:
            return {f"pooled_{lvl}": (pooled(features[lvl]), None) for lvl in self.levels}
        samples: LossSamples = {}
        for lvl in self.map_levels:
            feats = features[lvl]
            if self.map_gaussian == MapGaussian.SHARED:  # the loss's folds need one row per image: slots, group 0
                feats = neighbourhood_average(feats, self.map_neighbourhood)  # what the map's Gaussian reads
                n, c, h, w = feats.shape
                index = torch.zeros(h * w, dtype=torch.long, device=feats.device)
                samples[f"map_{lvl}"] = (feats.reshape(n, c, h * w).transpose(1, 2), index)
            else:
                samples[f"map_{lvl}"] = self._map_samples(lvl, feats)
        if self.layout_gaussian is not None:
            for grid, vector in enumerate(self.layout_samples(features)):
                samples["layout" if grid == 0 else f"layout_{grid}"] = (vector, None)
        return samples
