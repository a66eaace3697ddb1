"""The fine-tuning objective: Mahalanobis distance of normal images to the Gaussians the network induces."""

from __future__ import annotations

import torch
from torch import nn

from .gaussian import StreamingGaussian
from .hyperparameters import LossDistance, LossGaussian

N_FOLDS = 2


class GaussianLoss(nn.Module):
    """Mean over images, sum over levels of ``d² / C`` of the pooled features (≈1 per level when fitted).

    ``d`` is the Mahalanobis distance (the paper's) or, as an ablation, the Euclidean distance to the mean
    scaled by the level's average variance (a center loss). With ``cross_fit`` the module owns one set of
    Gaussians per fold of the training images, and image ``i`` of fold ``f`` is scored against the Gaussians of
    the *other* fold: an out-of-sample distance, like the distances that will score new images. With
    ``in_sample`` it scores against the model's own image Gaussians. Either way the Gaussians are targets:
    re-estimated without gradient (:meth:`update`, :meth:`fit`), the gradient flows through the features only.
    The fold Gaussians are working state, re-estimated after a resume, so they stay out of the ``state_dict``.

    Args:
        level_dims: ``{level: feature width}`` of the image-score levels.
        gaussian: ``"cross_fit"`` or ``"in_sample"``.
        distance: ``"mahalanobis"`` or ``"euclidean"``.

    """

    def __init__(
        self,
        level_dims: dict[int, int],
        gaussian: LossGaussian | str = LossGaussian.CROSS_FIT,
        distance: LossDistance | str = LossDistance.MAHALANOBIS,
    ) -> None:
        super().__init__()
        self.gaussian = LossGaussian(gaussian)
        self.distance = LossDistance(distance)
        self.level_dims = dict(level_dims)
        folds = N_FOLDS if self.gaussian == LossGaussian.CROSS_FIT else 0
        self.fold_gaussians = nn.ModuleList(
            nn.ModuleDict({str(lvl): StreamingGaussian(1, dim, persistent=False) for lvl, dim in level_dims.items()})
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
    def update(self, pooled: dict[int, torch.Tensor], folds: torch.Tensor) -> None:
        """Accumulate pooled features ``{level: (N, 1, C)}`` into the Gaussians of each image's fold (−1: none)."""
        for index, fold in enumerate(self.fold_gaussians):
            members = folds == index
            if members.any():
                for lvl, gaussian in fold.items():
                    gaussian.update(pooled[int(lvl)][members])

    @torch.no_grad()
    def fit(self) -> None:
        """Fit the fold Gaussians from what :meth:`update` accumulated."""
        for fold in self.fold_gaussians:
            for gaussian in fold.values():
                gaussian.fit()
                gaussian.reset()

    def _squared(self, gaussian: StreamingGaussian, samples: torch.Tensor) -> torch.Tensor:
        if self.distance == LossDistance.EUCLIDEAN:
            return gaussian.squared_euclidean(samples)[:, 0]
        return gaussian.squared_mahalanobis(samples)[:, 0]

    def forward(
        self, pooled: dict[int, torch.Tensor], image_gaussians: nn.ModuleDict, folds: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The loss of pooled features ``{level: (N, 1, C)}``; ``folds``: each image's fold (cross-fitting)."""
        losses = []
        for level, gaussian in image_gaussians.items():
            samples = pooled[int(level)]
            if self.cross_fitted and folds is not None:
                per_fold = torch.stack([self._squared(fold[level], samples) for fold in self.fold_gaussians], 1)
                other = (folds + 1) % len(self.fold_gaussians)
                per_image = per_fold.gather(1, other[:, None])[:, 0]
            else:
                per_image = self._squared(gaussian, samples)
            losses.append(per_image.mean() / gaussian.dim)
        return torch.stack(losses).sum()
