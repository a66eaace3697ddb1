"""PyTorch model of GaussFT: multi-level features, per-level Gaussians, Mahalanobis scores and maps."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
from anomalib.data import InferenceBatch
from anomalib.models.components.base import DynamicBufferMixin
from torch import nn

from .anomaly_map import AnomalyMapGenerator
from .feature_extractor import MultiLevelFeatureExtractor
from .feature_samples import LAYOUT_GRID, neighbourhood_average, pooled
from .fine_tuning_targets import FineTuningTargets
from .gaussian import StreamingGaussian
from .hyperparameters import ImageScore, MapGaussian
from .image_score import TERMS, ScoreNormalisation, top_fraction_mean
from .input_checks import check_finite
from .layout_map import LayoutMap
from .layout_term import LayoutTerm
from .map_fusion import MapFusion
from .regions import region_grid, region_index
from .statistics_fitting import StatisticsFitting

Features = dict[int, torch.Tensor]


class FeatureBatch(NamedTuple):
    """One batch of :meth:`GaussFTModel.iter_features`: the loader's batch, its pre-processed images, features."""

    batch: Any
    images: torch.Tensor
    features: Features


class ModelNotFittedError(RuntimeError):
    """Raised when a GaussFT model is used for inference before its Gaussians are fitted."""


def default_map_levels(extractor: MultiLevelFeatureExtractor) -> list[int]:
    """Heatmap levels: EfficientNet stages at strides 8 and 16, else the 2nd-4th levels (PaDiM's layer1-3)."""
    if extractor.is_efficientnet:
        return [3, 4, 5]
    return [lvl for lvl in (1, 2, 3) if lvl < extractor.num_levels]


DETAIL_BLUR_FRACTION = 0.5  # the detail map's blur, as a fraction of the map's ``sigma``


def default_detail_levels(map_levels: Sequence[int], map_neighbourhood: int) -> list[int]:
    """Detail-map levels: the finest map level when the map is neighbourhood-averaged, else none (nothing to add)."""
    return [min(map_levels)] if map_neighbourhood > 1 else []


class GaussFTModel(StatisticsFitting, FineTuningTargets, LayoutTerm, DynamicBufferMixin):
    """Gaussian AD on multi-level features of a (fine-tunable) timm backbone.

    Args:
        backbone: timm model name.
        pre_trained: Use ImageNet weights from the timm hub.
        image_size: Input size ``(H, W)`` the model is fitted at.
        backbone_weights: Local weights file that replaces the hub download.
        levels: Levels whose pooled features give the image score (``None`` = all).
        map_levels: Levels whose feature maps give the anomaly map (``None`` = default).
        map_gaussian: ``"regional"``, ``"shared"`` or ``"per_position"``.
        map_regions: Regions per side of the ``"regional"`` map Gaussians.
        map_neighbourhood: Side of the square neighbourhood averaged at each map position (1 = none).
        map_detail_levels: Levels whose unaveraged map is fused into the anomaly map (per-pixel max on the
            held-out normals' scale); ``None``: the finest map level when ``map_neighbourhood > 1``; ``[]``: none.
        map_layout: Add the layout term's per-cell map where it exceeds its held-out tail (mean + 2.33 std of
            its held-out pixels); ``None``: whenever the image score has a layout term ("local", "combined").
        score_layout_map: The image score's map term reads the averaged map plus the layout map's excess (both on
            their held-out scale) instead of the averaged map alone; ``None``: whenever there is a layout map.
        image_score: ``"local"``, ``"combined"``, ``"gaussian_ad"`` or ``"map_max"``.
        layout_grids: Pooling grids of the layout term, each with its own Gaussian, their evidence averaged: 1 (the
            whole map) or 2 (two grids one position apart at 224 px, :func:`feature_samples.layout_vectors`).
        sigma: Blur of the anomaly map in pixels (of the detail map: half of it).

    """

    def __init__(
        self,
        backbone: str,
        pre_trained: bool,
        image_size: tuple[int, int],
        backbone_weights: str | Path | None = None,
        levels: Sequence[int] | None = None,
        map_levels: Sequence[int] | None = None,
        map_gaussian: MapGaussian | str = MapGaussian.REGIONAL,
        map_regions: int = 10,
        map_neighbourhood: int = 3,
        map_detail_levels: Sequence[int] | None = None,
        map_layout: bool | None = None,
        score_layout_map: bool | None = None,
        image_score: ImageScore | str = ImageScore.LOCAL,
        layout_grids: int = 2,
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
        self.map_regions = map_regions
        self.map_neighbourhood = map_neighbourhood
        if map_detail_levels is None:
            map_detail_levels = default_detail_levels(self.map_levels, map_neighbourhood)
        self.map_detail_levels = self.feature_extractor.validate_levels(
            map_detail_levels, "map_detail_levels", allow_empty=True
        )
        self.image_score = ImageScore(image_score)
        self.image_size = tuple(image_size)
        self.used_levels = sorted(set(self.levels) | set(self.map_levels) | set(self.map_detail_levels))
        self._check_image_size(backbone)
        shapes = self.feature_extractor.level_shapes(self.image_size)
        self.level_dims = {lvl: shapes[lvl][0] for lvl in self.feature_extractor.all_levels}
        self.map_sizes = {lvl: shapes[lvl][1:] for lvl in {*self.map_levels, *self.map_detail_levels}}
        self.image_gaussians = nn.ModuleDict({str(lvl): StreamingGaussian(1, shapes[lvl][0]) for lvl in self.levels})
        self.map_gaussians = nn.ModuleDict(
            {str(lvl): StreamingGaussian(self._map_groups(lvl), shapes[lvl][0]) for lvl in self.map_levels}
        )
        # Unaveraged maps of the detail levels, fused with the averaged map (per-pixel max on a common scale).
        self.detail_gaussians = nn.ModuleDict(
            {str(lvl): StreamingGaussian(self._map_groups(lvl), shapes[lvl][0]) for lvl in self.map_detail_levels}
        )
        # Layout term of the "local" and "combined" image scores: the deepest map level pooled to 3 × 3, one
        # joint Gaussian per pooling grid (the second grid's under its own name: older checkpoints have one).
        self.layout_level = max(self.map_levels)
        if layout_grids not in (1, 2):
            msg = f"layout_grids must be 1 or 2 (pooling grids of the layout term), got {layout_grids!r}."
            raise ValueError(msg)
        self.layout_grids = layout_grids
        layout_dim = shapes[self.layout_level][0] * LAYOUT_GRID**2
        self.layout_gaussian = StreamingGaussian(1, layout_dim) if self.normalised_score else None
        offset = self.normalised_score and layout_grids == 2
        self.offset_layout_gaussian = StreamingGaussian(1, layout_dim) if offset else None
        # The layout term per 3 × 3 cell, added to the heatmap where it exceeds its held-out tail.
        self.layout_map = LayoutMap(shapes[self.layout_level][0]) if self._uses_layout_map(map_layout) else None
        offset_map = self.layout_map is not None and offset
        self.offset_layout_map = LayoutMap(shapes[self.layout_level][0]) if offset_map else None
        fused = bool(self.map_detail_levels) or self.layout_map is not None
        # Absent from checkpoints without fusion.
        self.map_fusion = MapFusion(bool(self.map_detail_levels), self.layout_map is not None) if fused else None
        self.score_layout_map = self._score_reads_layout_map(score_layout_map)
        # Unused by "gaussian_ad" / "map_max", which keep the 2-term buffers their checkpoints were saved with.
        self.score_normalisation = ScoreNormalisation(len(TERMS.get(self.image_score.value, TERMS["local"])))
        self.anomaly_map_generator = AnomalyMapGenerator(sigma=sigma, image_size=self.image_size)
        # The detail map is there to place defects one feature position wide: half the blur (measured better on
        # DeepPCB, 0.834 → 0.853, and equal elsewhere; docs/local_evidence.md).
        self.detail_map_generator = (
            AnomalyMapGenerator(sigma=sigma * DETAIL_BLUR_FRACTION, image_size=self.image_size)
            if self.map_detail_levels
            else None
        )
        self.register_buffer("is_fitted", torch.tensor(False))
        # Plain-bool mirror of ``is_fitted``: torch.export traces with fake buffers whose value is unknown.
        self._fitted = False
        self.register_load_state_dict_post_hook(GaussFTModel._sync_fitted)

    def _check_image_size(self, backbone: str) -> None:
        strides = self.feature_extractor.level_strides()
        deepest = max(self.used_levels, key=lambda lvl: strides[lvl])
        if min(self.image_size) < strides[deepest]:
            msg = (
                f"image_size {self.image_size} is too small for backbone '{backbone}': level {deepest} has stride "
                f"{strides[deepest]}, so both sides of image_size must be at least {strides[deepest]} px."
            )
            raise ValueError(msg)

    @staticmethod
    def _sync_fitted(module: GaussFTModel, incompatible_keys: object) -> None:
        del incompatible_keys
        module._fitted = bool(module.is_fitted)

    def set_fitted(self, fitted: bool) -> None:
        """Mark the Gaussians as fitted or not (buffer for checkpoints, bool for export-time checks)."""
        self.is_fitted.fill_(fitted)
        self._fitted = fitted

    def require_fitted(self, hint: str = "train it (engine.fit / anomalib train) or load a fitted checkpoint") -> None:
        """Raise :class:`ModelNotFittedError` unless the Gaussians are fitted."""
        if not bool(self.is_fitted):
            msg = f"GaussFT is not fitted: {hint}."
            raise ModelNotFittedError(msg)

    @property
    def image_level_dims(self) -> dict[int, int]:
        """``{level: feature width}`` of the image-score levels."""
        return {lvl: self.level_dims[lvl] for lvl in self.levels}

    def _map_groups(self, level: int) -> int:
        height, width = self.map_sizes[level]
        if self.map_gaussian == MapGaussian.REGIONAL:
            rows, cols = region_grid(height, width, self.map_regions)
            return rows * cols
        return height * width if self.map_gaussian == MapGaussian.PER_POSITION else 1

    def _region_index(self, level: int, height: int, width: int, device: torch.device) -> torch.Tensor | None:
        """Region of each position of a level's ``height × width`` map (``None`` unless regional)."""
        if self.map_gaussian != MapGaussian.REGIONAL:
            return None
        grid = region_grid(*self.map_sizes[level], self.map_regions)
        return region_index(height, width, grid, device)

    def gaussians(self) -> list[StreamingGaussian]:
        """All Gaussians of the model (image level, map level, detail map, then the layout Gaussians)."""
        maps = [*self.map_gaussians.values(), *self.detail_gaussians.values()]
        return [*self.image_gaussians.values(), *maps, *self.layout_gaussians()]

    # ---- features --------------------------------------------------------------------------------
    pooled = staticmethod(pooled)

    def extract(self, images: torch.Tensor) -> Features:
        """Feature maps of every level in use."""
        return self.feature_extractor(images, self.used_levels)

    def pooled_features(self, features: Features) -> Features:
        """``{level: (N, 1, C)}`` pooled features of the image-score levels."""
        return {lvl: pooled(features[lvl]) for lvl in self.levels}

    @torch.no_grad()
    def iter_features(
        self, loader: Iterable[Any], transform: Callable[[torch.Tensor], torch.Tensor] | None = None
    ) -> Iterator[FeatureBatch]:
        """``(batch, images, features)`` for every batch of ``loader`` (eval mode, no gradient).

        The one road from a loader of raw images to features: images are moved to the model's device and
        pre-processed with ``transform`` (the ``PreProcessor``'s). NaN/Inf features raise an error naming the
        batch's images.
        """
        self.eval()
        device = next(self.parameters()).device
        for batch in loader:
            images = batch.image.to(device)
            images = transform(images) if transform is not None else images
            features = self.extract(images)
            check_finite(features, getattr(batch, "image_path", None), images)
            yield FeatureBatch(batch, images, features)

    def _map_samples(
        self, level: int, features: torch.Tensor, detail: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(N, C, h, w)`` → samples for the level's map Gaussian and the group of each slot (regional).

        Each position first takes the mean of its ``map_neighbourhood`` × ``map_neighbourhood`` neighbourhood
        (PatchCore's local aggregation; at the border, of the positions inside the map); not for a ``detail`` map.
        """
        if not detail:
            features = neighbourhood_average(features, self.map_neighbourhood)
        n, c, h, w = features.shape
        if self.map_gaussian == MapGaussian.SHARED:
            return features.permute(0, 2, 3, 1).reshape(n * h * w, 1, c), None
        wrong_size = (h, w) != tuple(self.map_sizes[level])
        if self.map_gaussian == MapGaussian.PER_POSITION and not torch.compiler.is_compiling() and wrong_size:
            msg = (
                f"Per-position Gaussians were built for feature maps of {tuple(self.map_sizes[level])} at level "
                f"{level} (image_size {self.image_size}); got {(h, w)}. Feed images of the fitted size."
            )
            raise ValueError(msg)
        slots = features.reshape(n, c, h * w).transpose(1, 2)  # per position / regional: one slot per position
        return slots, self._region_index(level, h, w, features.device)

    # ---- scores ----------------------------------------------------------------------------------
    def level_distances(self, features: Features) -> torch.Tensor:
        """Mahalanobis distance of the pooled features per level, ``(N, len(levels))``."""
        squared = [g.squared_mahalanobis(pooled(features[int(k)])) for k, g in self.image_gaussians.items()]
        return torch.sqrt(torch.cat(squared, 1).clamp_min(0))

    def pooled_image_score(self, features: Features) -> torch.Tensor:
        """The paper's image score: Σ over levels of the pooled-feature Mahalanobis distance, ``(N,)``."""
        return self.level_distances(features).sum(dim=1)

    def level_maps(self, features: Features, detail: bool = False) -> list[torch.Tensor]:
        """Per-level maps ``sqrt(d² / C)`` of shape ``(N, 1, h, w)`` (of the detail levels with ``detail``)."""
        maps = []
        for lvl, gaussian in (self.detail_gaussians if detail else self.map_gaussians).items():
            feats = features[int(lvl)]
            n, c, h, w = feats.shape
            samples, index = self._map_samples(int(lvl), feats, detail)
            squared = gaussian.squared_mahalanobis(samples, group_index=index)
            maps.append(torch.sqrt(squared.clamp_min(0) / c).reshape(n, 1, h, w))
        return maps

    @property
    def fuses_maps(self) -> bool:
        """Whether the anomaly map fuses the averaged map with a detail or a layout map."""
        return self.map_fusion is not None

    def averaged_map(self, features: Features, image_size: tuple[int, int] | torch.Size) -> torch.Tensor:
        """The map of the neighbourhood-averaged map levels ``(N, 1, H, W)``: what the image score's map term reads."""
        return self.anomaly_map_generator(self.level_maps(features), image_size)

    def detail_map(self, features: Features, image_size: tuple[int, int] | torch.Size) -> torch.Tensor:
        """The map of the unaveraged detail levels ``(N, 1, H, W)``, blurred with half the map's ``sigma``."""
        if self.detail_map_generator is None:
            msg = "This model has no detail map (map_detail_levels=[])."
            raise ValueError(msg)
        return self.detail_map_generator(self.level_maps(features, detail=True), image_size)

    def fused_maps(
        self, features: Features, image_size: tuple[int, int] | torch.Size
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The maps fused with the averaged one, ``(detail, layout)`` ``(N, 1, H, W)``; ``None`` where absent."""
        detail = self.detail_map(features, image_size) if self.detail_map_generator is not None else None
        return detail, self.upsampled_layout_map(features, image_size)

    @property
    def normalised_score(self) -> bool:
        """Whether the image score is a sum of terms z-scored on held-out normals ("local", "combined")."""
        return self.image_score in (ImageScore.LOCAL, ImageScore.COMBINED)

    @property
    def normalised_on_held_out(self) -> bool:
        """Whether held-out normals fix constants of the score or the map (normalised score, fused map)."""
        return self.normalised_score or self.fuses_maps

    def raw_score_terms(self, features: Features, image_size: tuple[int, int] | torch.Size) -> torch.Tensor:
        """``(N, T)`` raw terms of the image score (``T = 1`` unless normalised): what forgetting detection ranks."""
        if self.normalised_score:
            return self.score_terms(features, self.averaged_map(features, image_size))
        if self.image_score == ImageScore.MAP_MAX:
            return self.averaged_map(features, image_size).amax(dim=(-3, -2, -1))[:, None]
        return self.pooled_image_score(features)[:, None]

    def score_terms(
        self,
        features: Features,
        averaged_map: torch.Tensor,
        level_distances: torch.Tensor | None = None,
        layout_map: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Raw terms of a normalised image score, ``(N, T)`` in ``image_score.TERMS`` order.

        "local": layout distance, mean of the map's top 1 %; "combined": the paper's pooled score before them
        (from ``level_distances`` when the caller has them already). With ``score_layout_map`` and the raw
        ``layout_map`` (:meth:`fused_maps`), the map term reads the averaged map plus the layout map's excess, both
        on their held-out scale; without ``layout_map`` (forgetting detection while fine-tuning, before the fusion
        constants exist) it reads the averaged map alone.
        """
        if self.layout_gaussian is None:
            msg = f"score_terms needs image_score='local' or 'combined' (this model has {self.image_score.value!r})."
            raise ValueError(msg)
        if self.score_layout_map and layout_map is not None:
            # The layout term's local evidence in the map term: measured +0.004 image AUROC on Magnetic Tile with
            # all images, within ±0.003 elsewhere (docs/local_evidence.md).
            averaged_map = self.map_fusion.scaled_averaged(averaged_map) + self.map_fusion.layout_excess(layout_map)
        terms = [self.layout_distance(features), top_fraction_mean(averaged_map)]
        if self.image_score == ImageScore.COMBINED:
            distances = self.level_distances(features) if level_distances is None else level_distances
            terms.insert(0, distances.sum(dim=1))
        return torch.stack(terms, dim=1)

    def forward(self, images: torch.Tensor) -> InferenceBatch:
        """Score images: ``pred_score`` ``(N,)`` and ``anomaly_map`` ``(N, 1, H, W)``."""
        tracing = torch.compiler.is_compiling() or torch.onnx.is_in_onnx_export()
        if not (getattr(self, "_fitted", False) if tracing else bool(self.is_fitted)):
            msg = "GaussFT is not fitted: train it (engine.fit / anomalib train) or load a fitted checkpoint first."
            raise ModelNotFittedError(msg)
        return self.predict_from_features(self.extract(images), images.shape[-2:])

    def predict_from_features(
        self,
        features: Features,
        image_size: tuple[int, int] | torch.Size,
        level_distances: torch.Tensor | None = None,
    ) -> InferenceBatch:
        """``pred_score`` and ``anomaly_map`` (at ``image_size``) from :meth:`extract`'s features.

        ``level_distances``: :meth:`level_distances` of the same features, when the caller has them already.
        """
        averaged = self.averaged_map(features, image_size)
        detail, layout = self.fused_maps(features, image_size)  # (None, None) without fusion
        anomaly_map = averaged if self.map_fusion is None else self.map_fusion(averaged, detail, layout)
        if self.normalised_score:  # reads the averaged map and the layout map, not the detail map (costs it, measured)
            pred_score = self.score_normalisation(self.score_terms(features, averaged, level_distances, layout))
        elif self.image_score == ImageScore.MAP_MAX:
            pred_score = averaged.amax(dim=(-3, -2, -1))
        else:
            distances = self.level_distances(features) if level_distances is None else level_distances
            pred_score = distances.sum(dim=1)
        return InferenceBatch(pred_score=pred_score, anomaly_map=anomaly_map)
