"""Streaming normal images' features into GaussFT's Gaussians and fitting them."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import torch

from .feature_samples import pooled

if TYPE_CHECKING:
    from .torch_model import Features, GaussFTModel

logger = logging.getLogger(__name__)


class StatisticsFitting:
    """Mixin of :class:`GaussFTModel`: accumulate features of normal images, then fit every Gaussian from them."""

    @torch.no_grad()
    def accumulate(self: GaussFTModel, features: Features, image_only: bool = False) -> None:
        """Add a batch of normal images' features to the streamed statistics."""
        for lvl, gaussian in self.image_gaussians.items():
            gaussian.update(pooled(features[int(lvl)]))
        if not image_only:
            for detail, gaussians in ((False, self.map_gaussians), (True, self.detail_gaussians)):
                for lvl, gaussian in gaussians.items():
                    samples, index = self._map_samples(int(lvl), features[int(lvl)], detail)
                    gaussian.update(samples, group_index=index)
            if self.layout_gaussian is not None:
                for gaussian, vector in zip(self.layout_gaussians(), self.layout_samples(features), strict=True):
                    gaussian.update(vector)

    @torch.no_grad()
    def update_statistics(self: GaussFTModel, images: torch.Tensor, image_only: bool = False) -> Features:
        """Accumulate the statistics of a batch of pre-processed normal images; returns its features."""
        features = self.extract(images)
        self.accumulate(features, image_only=image_only)
        return features

    def reset_statistics(self: GaussFTModel) -> None:
        """Forget accumulated statistics (fitted ones stay until the next fit)."""
        for gaussian in self.gaussians():
            gaussian.reset()

    @torch.no_grad()
    def fit(self: GaussFTModel, image_only: bool = False, keep_statistics: bool = False, quiet: bool = False) -> None:
        """Fit the Gaussians from the accumulated statistics (``image_only``: the image-level ones only).

        ``keep_statistics``: keep the accumulated moments, so that more images can be added and fitted again.
        ``quiet``: no few-images warning (fine-tuning's per-epoch refits; the final fit warns).
        """
        for gaussian in self.image_gaussians.values() if image_only else self.gaussians():
            gaussian.fit()
            if not keep_statistics:
                gaussian.reset()
        if image_only:  # the anomaly-map Gaussians are not fitted: the model is not usable for inference yet
            return
        if self.layout_map is not None:
            for layout_map, gaussian in zip(self.layout_maps(), self.layout_gaussians(), strict=True):
                layout_map.fit(gaussian)
        self.set_fitted(True)
        n_images = min(int(g.num_samples) for g in self.image_gaussians.values())
        widest = max(g.dim for g in self.image_gaussians.values())
        if n_images < widest and not quiet:
            logger.warning(
                "Fitted on %d images while the widest level has %d features: its covariance rests on Ledoit-Wolf "
                "shrinkage. Scores stay finite, but more normal images (or fewer/narrower levels) help.",
                n_images,
                widest,
            )

    @torch.no_grad()
    def fit_from(
        self: GaussFTModel,
        loader: Iterable[Any],
        transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
        image_only: bool = False,
        on_features: Callable[[Any, Features], None] | None = None,
        keep_statistics: bool = False,
        quiet: bool = False,
    ) -> None:
        """Re-estimate the Gaussians from one pass over ``loader`` with the current network.

        ``on_features(batch, features)`` sees every batch's features (e.g. to refit the loss's Gaussians in the
        same pass); ``keep_statistics`` and ``quiet`` as in :meth:`fit`.
        """
        self.reset_statistics()
        for item in self.iter_features(loader, transform):
            self.accumulate(item.features, image_only=image_only)
            if on_features is not None:
                on_features(item.batch, item.features)
        self.fit(image_only=image_only, keep_statistics=keep_statistics, quiet=quiet)
