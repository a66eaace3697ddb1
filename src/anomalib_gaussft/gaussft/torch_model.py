"""PyTorch model of GaussFT: multi-level features, per-level Gaussians, Mahalanobis scores and maps."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from enum import Enum
from pathlib import Path

import torch
from anomalib.data import InferenceBatch
from anomalib.models.components.base import DynamicBufferMixin
from torch import nn

from .anomaly_map import AnomalyMapGenerator
from .feature_extractor import MultiLevelFeatureExtractor
from .gaussian import StreamingGaussian

logger = logging.getLogger(__name__)


class MapGaussian(str, Enum):
    """How the heatmap Gaussians are shared over feature-map positions."""

    SHARED = "shared"  # one Gaussian per level for all positions: small, shift-invariant (textures)
    PER_POSITION = "per_position"  # PaDiM-style, one Gaussian per level and position (aligned objects)


class ImageScore(str, Enum):
    """How the image-level anomaly score is computed."""

    GAUSSIAN_AD = "gaussian_ad"  # the paper's: Σ over levels of the pooled-feature Mahalanobis distance
    MAP_MAX = "map_max"  # maximum of the anomaly map


class LossDistance(str, Enum):
    """Distance of the fine-tuning loss."""

    MAHALANOBIS = "mahalanobis"  # the paper's: distance to the induced Gaussian
    EUCLIDEAN = "euclidean"  # ablation: a center loss, no whitening


class ModelNotFittedError(RuntimeError):
    """Raised when a GaussFT model is used for inference before its Gaussians are fitted."""


def default_map_levels(extractor: MultiLevelFeatureExtractor) -> list[int]:
    """Heatmap levels: EfficientNet stages at strides 8 and 16, else the 2nd-4th levels (PaDiM's layer1-3)."""
    if extractor.is_efficientnet:
        return [3, 4, 5]
    return [lvl for lvl in (1, 2, 3) if lvl < extractor.num_levels]


class GaussFTModel(DynamicBufferMixin):
    """Gaussian AD on multi-level features of a (fine-tunable) timm backbone.

    Args:
        backbone: timm model name.
        pre_trained: Use ImageNet weights from the timm hub.
        backbone_weights: Local weights file that replaces the hub download.
        image_size: Input size ``(H, W)`` the model is fitted at.
        levels: Levels whose pooled features give the image score (``None`` = all).
        map_levels: Levels whose feature maps give the anomaly map (``None`` = default).
        map_gaussian: ``"shared"`` or ``"per_position"``.
        image_score: ``"gaussian_ad"`` or ``"map_max"``.
        sigma: Blur of the anomaly map in pixels.

    """

    def __init__(
        self,
        backbone: str,
        pre_trained: bool,
        image_size: tuple[int, int],
        backbone_weights: str | Path | None = None,
        levels: Sequence[int] | None = None,
        map_levels: Sequence[int] | None = None,
        map_gaussian: MapGaussian | str = MapGaussian.SHARED,
        image_score: ImageScore | str = ImageScore.GAUSSIAN_AD,
        sigma: float = 4.0,
    ) -> None:
        super().__init__()
        self.feature_extractor = MultiLevelFeatureExtractor(backbone, pre_trained, backbone_weights)
        self.levels = self.feature_extractor.validate_levels(levels, "levels")
        self.map_levels = self.feature_extractor.validate_levels(
            map_levels if map_levels is not None else default_map_levels(self.feature_extractor),
            "map_levels",
        )
        self.map_gaussian = MapGaussian(map_gaussian)
        self.image_score = ImageScore(image_score)
        self.image_size = tuple(image_size)
        self.used_levels = sorted(set(self.levels) | set(self.map_levels))

        strides = self.feature_extractor.level_strides()
        deepest = max(self.used_levels, key=lambda lvl: strides[lvl])
        if min(self.image_size) < strides[deepest]:
            msg = (
                f"image_size {self.image_size} is too small for backbone '{backbone}': level {deepest} has stride "
                f"{strides[deepest]}, so both sides of image_size must be at least {strides[deepest]} px."
            )
            raise ValueError(msg)
        shapes = self.feature_extractor.level_shapes(self.image_size)
        self.level_dims = {lvl: shapes[lvl][0] for lvl in self.all_levels}
        self.map_sizes = {lvl: shapes[lvl][1:] for lvl in self.map_levels}
        self.image_gaussians = nn.ModuleDict({str(lvl): StreamingGaussian(1, shapes[lvl][0]) for lvl in self.levels})
        self.map_gaussians = nn.ModuleDict(
            {str(lvl): StreamingGaussian(self._map_groups(lvl), shapes[lvl][0]) for lvl in self.map_levels}
        )
        self.anomaly_map_generator = AnomalyMapGenerator(sigma=sigma)
        self.register_buffer("is_fitted", torch.tensor(False))
        # Plain-bool mirror of ``is_fitted``: torch.export traces with fake buffers whose value is unknown.
        self._fitted = False
        self.register_load_state_dict_post_hook(GaussFTModel._sync_fitted)
        # Scores of held-out normal images for the conformal thresholds (empty unless calibrated).
        self.register_buffer("calibration_scores", torch.empty(0))
        self.register_buffer("calibration_map_max", torch.empty(0))
        self.register_buffer("calibration_level_scores", torch.empty(0, len(self.levels)))

    @staticmethod
    def _sync_fitted(module: GaussFTModel, incompatible_keys: object) -> None:
        del incompatible_keys
        module._fitted = bool(module.is_fitted)

    def set_fitted(self, fitted: bool) -> None:
        """Mark the Gaussians as fitted or not (buffer for checkpoints, bool for export-time checks)."""
        self.is_fitted.fill_(fitted)
        self._fitted = fitted

    @property
    def all_levels(self) -> list[int]:
        """Every level of the backbone."""
        return self.feature_extractor.all_levels

    def _map_groups(self, level: int) -> int:
        height, width = self.map_sizes[level]
        return height * width if self.map_gaussian == MapGaussian.PER_POSITION else 1

    def gaussians(self) -> list[StreamingGaussian]:
        """All Gaussians of the model (image level, then map level)."""
        return [*self.image_gaussians.values(), *self.map_gaussians.values()]

    def extract(self, images: torch.Tensor) -> dict[int, torch.Tensor]:
        """Feature maps of every level in use."""
        return self.feature_extractor(images, self.used_levels)

    @staticmethod
    def pooled(features: torch.Tensor) -> torch.Tensor:
        """Global average pooling ``(N, C, H, W)`` → ``(N, 1, C)``."""
        return features.mean(dim=(2, 3)).unsqueeze(1)

    def _map_samples(self, level: int, features: torch.Tensor) -> torch.Tensor:
        """``(N, C, h, w)`` → samples for the level's map Gaussian."""
        n, c, h, w = features.shape
        if self.map_gaussian == MapGaussian.PER_POSITION:
            if not torch.compiler.is_compiling() and (h, w) != tuple(self.map_sizes[level]):
                msg = (
                    f"Per-position Gaussians were built for feature maps of {tuple(self.map_sizes[level])} at level "
                    f"{level} (image_size {self.image_size}); got {(h, w)}. Feed images of the fitted size."
                )
                raise ValueError(msg)
            return features.reshape(n, c, h * w).transpose(1, 2)
        return features.permute(0, 2, 3, 1).reshape(n * h * w, 1, c)

    @torch.no_grad()
    def update_statistics(self, images: torch.Tensor, image_only: bool = False) -> dict[int, torch.Tensor]:
        """Accumulate the sufficient statistics from a batch of normal images; returns its features."""
        features = self.extract(images)
        for lvl, gaussian in self.image_gaussians.items():
            gaussian.update(self.pooled(features[int(lvl)]))
        if not image_only:
            for lvl, gaussian in self.map_gaussians.items():
                gaussian.update(self._map_samples(int(lvl), features[int(lvl)]))
        return features

    def reset_statistics(self) -> None:
        """Forget accumulated statistics (fitted ones stay until the next fit)."""
        for gaussian in self.gaussians():
            gaussian.reset()

    @torch.no_grad()
    def fit(self, image_only: bool = False) -> None:
        """Fit the Gaussians from the accumulated statistics (``image_only``: the image-level ones only)."""
        for gaussian in self.image_gaussians.values() if image_only else self.gaussians():
            gaussian.fit()
            gaussian.reset()
        if image_only:  # the anomaly-map Gaussians are not fitted: the model is not usable for inference yet
            return
        self.set_fitted(True)
        n_images = min(int(g.num_samples) for g in self.image_gaussians.values())
        widest = max(g.dim for g in self.image_gaussians.values())
        if n_images < widest:
            logger.warning(
                "Fitted on %d images while the widest level has %d features: its covariance rests on Ledoit-Wolf "
                "shrinkage. Scores stay finite, but more normal images (or fewer/narrower levels) help.",
                n_images,
                widest,
            )

    def level_distances(self, features: dict[int, torch.Tensor]) -> torch.Tensor:
        """Mahalanobis distance of the pooled features per level, ``(N, len(levels))``."""
        squared = [g.squared_mahalanobis(self.pooled(features[int(k)])) for k, g in self.image_gaussians.items()]
        return torch.sqrt(torch.cat(squared, 1).clamp_min(0))

    def pooled_image_score(self, features: dict[int, torch.Tensor]) -> torch.Tensor:
        """The paper's image score: Σ over levels of the pooled-feature Mahalanobis distance, ``(N,)``."""
        return self.level_distances(features).sum(dim=1)

    def level_maps(self, features: dict[int, torch.Tensor]) -> list[torch.Tensor]:
        """Per-level maps ``sqrt(d² / C)`` of shape ``(N, 1, h, w)``."""
        maps = []
        for lvl, gaussian in self.map_gaussians.items():
            feats = features[int(lvl)]
            n, c, h, w = feats.shape
            squared = gaussian.squared_mahalanobis(self._map_samples(int(lvl), feats))
            maps.append(torch.sqrt(squared.clamp_min(0) / c).reshape(n, 1, h, w))
        return maps

    def fine_tuning_loss(
        self,
        images: torch.Tensor,
        fold_gaussians: Sequence[dict[str, StreamingGaussian]] | None = None,
        folds: torch.Tensor | None = None,
        distance: LossDistance | str = LossDistance.MAHALANOBIS,
    ) -> torch.Tensor:
        """Fine-tuning objective: mean over images, sum over levels of ``d² / C`` (≈1 per level when fitted).

        ``d`` is the Mahalanobis distance (the paper's) or, as an ablation, the Euclidean distance to the
        mean scaled by the level's average variance (a center loss). With ``fold_gaussians`` (one
        ``{level: Gaussian}`` per fold) and ``folds`` (each image's fold), image ``i`` is scored against the
        Gaussians of the *other* fold (cross-fitting): an out-of-sample distance, not the in-sample one of a
        Gaussian fitted on the image itself.
        """
        distance = LossDistance(distance)

        def squared(gaussian: StreamingGaussian, pooled: torch.Tensor) -> torch.Tensor:
            if distance == LossDistance.EUCLIDEAN:
                return gaussian.squared_euclidean(pooled)[:, 0]
            return gaussian.squared_mahalanobis(pooled)[:, 0]

        features = self.extract(images)
        losses = []
        for level, gaussian in self.image_gaussians.items():
            pooled = self.pooled(features[int(level)])
            if fold_gaussians is None or folds is None:
                per_image = squared(gaussian, pooled)
            else:
                per_fold = torch.stack([squared(g[level], pooled) for g in fold_gaussians], 1)
                other = (folds + 1) % len(fold_gaussians)
                per_image = per_fold.gather(1, other[:, None])[:, 0]
            losses.append(per_image.mean() / gaussian.dim)
        return torch.stack(losses).sum()

    def forward(self, images: torch.Tensor) -> InferenceBatch:
        """Score images: ``pred_score`` ``(N,)`` and ``anomaly_map`` ``(N, 1, H, W)``."""
        tracing = torch.compiler.is_compiling() or torch.onnx.is_in_onnx_export()
        if not (getattr(self, "_fitted", False) if tracing else bool(self.is_fitted)):
            msg = "GaussFT is not fitted: train it (engine.fit / anomalib train) or load a fitted checkpoint first."
            raise ModelNotFittedError(msg)
        return self.predict_from_features(self.extract(images), images.shape[-2:])

    def predict_from_features(
        self, features: dict[int, torch.Tensor], image_size: tuple[int, int] | torch.Size
    ) -> InferenceBatch:
        """``pred_score`` and ``anomaly_map`` (at ``image_size``) from the features of :meth:`extract`."""
        anomaly_map = self.anomaly_map_generator(self.level_maps(features), image_size)
        if self.image_score == ImageScore.MAP_MAX:
            pred_score = anomaly_map.amax(dim=(-3, -2, -1))
        else:
            pred_score = self.pooled_image_score(features)
        return InferenceBatch(pred_score=pred_score, anomaly_map=anomaly_map)
