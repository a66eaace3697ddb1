"""The fine-tuning objective: Mahalanobis distance of normal features to the Gaussians the network induces."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from .gaussian import StreamingGaussian
from .hyperparameters import LossDistance, LossGaussian

N_FOLDS = 2

# name → (samples (N, S, C), group of each of the S slots or None): what the loss measures, e.g. one pooled sample
# per image and level ("pooled_3") or every map position of a level with its region ("map_3").
LossSamples = dict[str, tuple[torch.Tensor, torch.Tensor | None]]


class GaussianLoss(nn.Module):
    """Sum over targets of the mean ``d² / C`` of their samples (≈1 per target when fitted).

    A target is a (grouped) Gaussian and its samples: the pooled features of a level (the paper's loss), or the
    positions of a map level scored by their region's Gaussian (``loss_features="local"``). ``d`` is the
    Mahalanobis distance (the paper's) or, as an ablation, the Euclidean distance to the mean scaled by the
    average variance (a center loss). With ``cross_fit`` the module owns one set of Gaussians per fold of the
    training images, and image ``i`` of fold ``f`` is scored against the Gaussians of the *other* fold: an
    out-of-sample distance, like the distances that will score new images. With ``in_sample`` it scores against
    the model's own Gaussians. Either way the Gaussians are targets: re-estimated without gradient
    (:meth:`update`, :meth:`fit`), the gradient flows through the features only. The fold Gaussians are working
    state, re-estimated after a resume, so they stay out of the ``state_dict``.

    Args:
        target_shapes: ``{name: (groups, feature width)}`` of the targets.
        gaussian: ``"cross_fit"`` or ``"in_sample"``.
        distance: ``"mahalanobis"`` or ``"euclidean"``.

    """

    def __init__(
        self,
        target_shapes: Mapping[str, tuple[int, int]],
        gaussian: LossGaussian | str = LossGaussian.CROSS_FIT,
        distance: LossDistance | str = LossDistance.MAHALANOBIS,
    ) -> None:
        super().__init__()
        self.gaussian = LossGaussian(gaussian)
        self.distance = LossDistance(distance)
        self.target_shapes = dict(target_shapes)
        folds = N_FOLDS if self.gaussian == LossGaussian.CROSS_FIT else 0
        self.fold_gaussians = nn.ModuleList(
            nn.ModuleDict({name: StreamingGaussian(*shape, persistent=False) for name, shape in target_shapes.items()})
            for _ in range(folds)
        )

    @property
    def cross_fitted(self) -> bool:
        """Whether images are scored against the other fold's Gaussians."""
        return len(self.fold_gaussians) > 0

    def reset(self) -> None:
        """Forget the accumulated fold statistics."""
        for fold in self.fold_gaussians:
            for gaussian in fold.values():
                gaussian.reset()

    @torch.no_grad()
    def update(self, samples: LossSamples, folds: torch.Tensor) -> None:
        """Accumulate each target's samples into the Gaussians of each image's fold (−1: none)."""
        for index, fold in enumerate(self.fold_gaussians):
            members = folds == index
            if members.any():
                for name, gaussian in fold.items():
                    values, group_index = samples[name]
                    gaussian.update(values[members], group_index=group_index)

    @torch.no_grad()
    def fit(self) -> None:
        """Fit the fold Gaussians from what :meth:`update` accumulated."""
        for fold in self.fold_gaussians:
            for gaussian in fold.values():
                gaussian.fit()
                gaussian.reset()

    def _squared(
        self, gaussian: StreamingGaussian, values: torch.Tensor, group_index: torch.Tensor | None
    ) -> torch.Tensor:
        """``(N, S)`` squared distances of ``(N, S, C)`` samples."""
        if self.distance == LossDistance.EUCLIDEAN:
            return gaussian.squared_euclidean(values, group_index)
        return gaussian.squared_mahalanobis(values, group_index)

    def forward(
        self,
        samples: LossSamples,
        targets: Mapping[str, StreamingGaussian],
        folds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The loss of ``samples``; ``targets``: the model's Gaussians; ``folds``: each image's fold (cross-fitting)."""
        losses = []
        for name, gaussian in targets.items():
            values, group_index = samples[name]
            if self.cross_fitted and folds is not None:
                per_fold = torch.stack([self._squared(f[name], values, group_index) for f in self.fold_gaussians], 1)
                other = (folds + 1) % len(self.fold_gaussians)
                per_sample = per_fold.gather(1, other[:, None, None].expand(-1, 1, per_fold.shape[-1]))[:, 0]
            else:
                per_sample = self._squared(gaussian, values, group_index)
            losses.append(per_sample.mean() / gaussian.dim)
        return torch.stack(losses).sum()
