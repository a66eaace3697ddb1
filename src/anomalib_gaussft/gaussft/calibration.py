"""Normal-only thresholds with a controlled false-alarm rate (split conformal prediction).

With ``n`` held-out normal images that took no part in the fit, the conformal p-value of a new
score ``s`` is ``(1 + #{calibration scores ≥ s}) / (n + 1)``. For exchangeable normal images,
flagging ``p ≤ α`` raises a false alarm with probability at most ``α``. The decision is a plain
threshold on the score, so anomalib's post-processor (and an exported model) applies it unchanged.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import torch
from anomalib.models.components.base import DynamicBufferMixin
from anomalib.post_processing import PostProcessor
from lightning.pytorch import LightningModule, Trainer

if TYPE_CHECKING:
    from .torch_model import GaussFTModel

logger = logging.getLogger(__name__)


def smallest_achievable_rate(n_calibration: int) -> float:
    """The smallest false-alarm rate ``n`` calibration images can certify: ``1 / (n + 1)``."""
    return 1.0 / (n_calibration + 1)


def check_achievable_rate(n_calibration: int, false_alarm_rate: float) -> None:
    """Raise a ``ValueError`` naming the allowed range when ``n`` calibration images cannot certify the rate."""
    if n_calibration < 1:
        msg = "No calibration scores: hold out normal images (held_out_fraction) to calibrate thresholds."
        raise ValueError(msg)
    smallest = smallest_achievable_rate(n_calibration)
    if false_alarm_rate < smallest:
        msg = (
            f"false_alarm_rate={false_alarm_rate} cannot be honoured with {n_calibration} held-out calibration images: "
            f"the smallest achievable rate is 1/(n+1) = {smallest:.4f} (allowed: [{smallest:.4f}, 1)). Add normal "
            "training images, raise held_out_fraction, or raise false_alarm_rate."
        )
        raise ValueError(msg)


def conformal_threshold(calibration_scores: torch.Tensor, false_alarm_rate: float) -> torch.Tensor:
    """Score threshold ``t`` such that ``score > t`` ⟺ conformal p-value ``≤ false_alarm_rate``."""
    n = calibration_scores.numel()
    check_achievable_rate(n, false_alarm_rate)
    allowed_at_or_above = math.floor(false_alarm_rate * (n + 1) + 1e-9) - 1  # p ≤ α ⟺ #{cal ≥ s} ≤ this
    ordered = torch.sort(calibration_scores.flatten()).values
    return ordered[n - 1 - allowed_at_or_above].clone()


LEVEL_COMBINATIONS = ("fisher", "simes", "cauchy", "bonferroni")


def level_p_values(scores: torch.Tensor, calibration: torch.Tensor) -> torch.Tensor:
    """Per-level conformal p-values ``(N, L)`` of level scores ``(N, L)`` against calibration ``(n, L)``."""
    at_or_above = (calibration[None, :, :] >= scores[:, None, :]).sum(1)
    return (1 + at_or_above).to(torch.float64) / (calibration.shape[0] + 1)


def conformal_p_values(scores: torch.Tensor, calibration_scores: torch.Tensor) -> torch.Tensor:
    """``(1 + #{calibration ≥ s}) / (n + 1)`` for every score."""
    p_values = level_p_values(scores.reshape(-1, 1), calibration_scores.reshape(-1, 1))
    return p_values.reshape(scores.shape)


def combine_p_values(p_values: torch.Tensor, method: str) -> torch.Tensor:
    """Combine per-level p-values ``(N, L)`` into one per image with its nominal null distribution.

    Fisher (chi² with 2L degrees of freedom; assumes independent levels), Simes (valid for positively
    dependent levels), the Cauchy combination test (Liu & Xie 2020; robust to dependence for small p) and
    Bonferroni (``L · min p``; valid under any dependence).
    """
    n_levels = p_values.shape[1]
    if method == "fisher":
        # The χ²(2L) survival function of -2 Σ log p, as scipy.stats.combine_pvalues(method="fisher") (equal to
        # 1e-15, tested); in torch because the full-conformal loop calls it per image: scipy's per-call overhead
        # made it 10x slower on small batches (measured).
        return torch.special.gammaincc(torch.tensor(float(n_levels), dtype=p_values.dtype), -torch.log(p_values).sum(1))
    if method == "simes":
        ordered = torch.sort(p_values, dim=1).values
        ranks = torch.arange(1, n_levels + 1, dtype=p_values.dtype, device=p_values.device)
        return (n_levels * ordered / ranks).amin(1).clamp(max=1)
    if method == "cauchy":
        statistic = torch.tan((0.5 - p_values) * math.pi).mean(1)
        return 0.5 - torch.atan(statistic) / math.pi
    if method == "bonferroni":
        return (n_levels * p_values.amin(1)).clamp(max=1)
    msg = f"Unknown level combination {method!r}; choose one of {list(LEVEL_COMBINATIONS)}."
    raise ValueError(msg)


def calibrated_combination(scores: torch.Tensor, calibration: torch.Tensor, method: str) -> torch.Tensor:
    """Conformal p-values ``(N,)`` of the combined per-level statistic ``-log(combined p)``.

    Full conformal over the ``n + 1`` images (the calibration images and the one being tested): every image's
    per-level p-value counts the other ``n`` images, so all ``n + 1`` combined statistics are computed the
    same way and stay exchangeable for a normal image; the usual guarantee ``P(p ≤ α) ≤ α`` then holds
    whatever the dependence between levels. Cost ``O(N · n · L)``.
    """
    n = calibration.shape[0]
    # Per level, how many *other* calibration images score at or above each calibration image.
    others = (calibration[None, :, :] >= calibration[:, None, :]).sum(1) - 1  # (n, L)
    # Both sides divide the same integer counts in float64, so equal counts give bit-equal p-values (ties
    # between the tested image and a calibration image must stay ties for the n + 1 images to be exchangeable).
    test_p = level_p_values(scores, calibration)  # (N, L)
    at_or_above = others[None] + (scores[:, None, :] >= calibration[None, :, :])  # (N, n, L)
    calibration_p = (1 + at_or_above).to(torch.float64) / (n + 1)
    test_statistic = -torch.log(combine_p_values(test_p, method))
    flat = calibration_p.reshape(-1, calibration.shape[1])
    calibration_statistic = -torch.log(combine_p_values(flat, method)).reshape(len(scores), n)
    return (1 + (calibration_statistic >= test_statistic[:, None]).sum(1)).to(torch.float64) / (n + 1)


class Calibrator(DynamicBufferMixin):
    """Scores of held-out normal images that took no part in the fit, and the p-values they give.

    Buffers (saved in checkpoints, resized on load): ``scores`` ``(n,)``, the image scores, and
    ``level_scores`` ``(n, L)``, the per-level distances of the same images.

    Args:
        n_levels: Number of image-score levels.

    """

    def __init__(self, n_levels: int) -> None:
        super().__init__()
        self.register_buffer("scores", torch.empty(0))
        self.register_buffer("level_scores", torch.empty(0, n_levels))

    @property
    def is_calibrated(self) -> bool:
        """Whether calibration scores are stored."""
        return self.scores.numel() > 0

    @torch.no_grad()
    def calibrate(
        self,
        model: GaussFTModel,
        loader: Iterable[Any],
        transform: Callable[[torch.Tensor], torch.Tensor] | None,
        false_alarm_rate: float,
    ) -> dict[str, torch.Tensor]:
        """Score held-out normals (``loader``) with the final ``model``; store them; return conformal thresholds.

        The image threshold is conformal on ``pred_score``, the mask threshold on each image's anomaly-map
        maximum, so a normal image gets a label, or a non-empty mask, with probability at most
        ``false_alarm_rate``. Also returns the min/max normalisation ranges for the post-processor.
        """
        scores, map_max, map_min, levels = [], [], [], []
        for item in model.iter_features(loader, transform):
            level_distances = model.level_distances(item.features)
            predictions = model.predict_from_features(item.features, item.images.shape[-2:], level_distances)
            scores.append(predictions.pred_score)
            map_max.append(predictions.anomaly_map.amax(dim=(-3, -2, -1)))
            map_min.append(predictions.anomaly_map.amin(dim=(-3, -2, -1)))
            levels.append(level_distances)
        scores_t, map_max_t = torch.cat(scores), torch.cat(map_max)
        self.scores = scores_t.detach().clone()
        self.level_scores = torch.cat(levels).detach().clone()
        thresholds = {
            "image_threshold": conformal_threshold(scores_t, false_alarm_rate),
            "image_range": (scores_t.min(), scores_t.max()),
            "pixel_threshold": conformal_threshold(map_max_t, false_alarm_rate),
            "pixel_range": (torch.cat(map_min).min(), map_max_t.max()),
        }
        logger.info(
            "Calibrated on %d held-out normal images for a false-alarm rate of %g: image threshold %.4f, mask "
            "threshold %.4f (a normal image gets a non-empty mask with probability ≤ %g).",
            len(scores_t),
            false_alarm_rate,
            float(thresholds["image_threshold"]),
            float(thresholds["pixel_threshold"]),
            false_alarm_rate,
        )
        return thresholds

    @torch.no_grad()
    def p_values_of(self, model: GaussFTModel, images: torch.Tensor, combination: str = "score") -> torch.Tensor:
        """:meth:`p_values` of pre-processed ``images`` scored by ``model``."""
        if not self.is_calibrated:
            from .torch_model import ModelNotFittedError

            msg = "No calibration: fit GaussFT with false_alarm_rate set to get p-values."
            raise ModelNotFittedError(msg)
        features = model.extract(images)
        distances = model.level_distances(features)
        predictions = model.predict_from_features(features, images.shape[-2:], level_distances=distances)
        return self.p_values(predictions.pred_score, distances, combination)

    def p_values(self, scores: torch.Tensor, level_scores: torch.Tensor, combination: str = "score") -> torch.Tensor:
        """Conformal p-values (small = anomalous) of image scores ``(N,)`` and level scores ``(N, L)``.

        ``combination``: ``"score"`` (the p-value of the image score, which ``pred_label`` uses), ``"levels"``
        (one p-value per level, ``(N, L)``), or a calibrated combination of the per-level p-values:
        ``"fisher"``, ``"simes"``, ``"cauchy"``, ``"bonferroni"`` (see docs/calibration.md).
        """
        choices = ["score", "levels", *LEVEL_COMBINATIONS]
        if combination not in choices:
            msg = f"combination={combination!r} is invalid: allowed is one of {choices}."
            raise ValueError(msg)
        if combination == "score":
            return conformal_p_values(scores, self.scores)
        levels, calibration = level_scores.to(torch.float64), self.level_scores.to(torch.float64)
        if combination == "levels":
            return level_p_values(levels, calibration)
        return calibrated_combination(levels, calibration, combination)


class CalibratedPostProcessor(PostProcessor):
    """anomalib's post-processor, with thresholds and normalisation fixed by a normal-only calibration.

    Until :meth:`set_calibration` is called it behaves exactly like :class:`PostProcessor`
    (F1-adaptive thresholds learnt from the validation split). Afterwards the validation split no
    longer changes the thresholds, so a datamodule without anomalous images works too.
    """

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.register_buffer("is_calibrated", torch.tensor(False))

    def set_calibration(
        self,
        image_threshold: torch.Tensor,
        image_range: tuple[torch.Tensor, torch.Tensor],
        pixel_threshold: torch.Tensor,
        pixel_range: tuple[torch.Tensor, torch.Tensor],
    ) -> None:
        """Fix raw thresholds and min/max normalisation ranges."""
        self._image_threshold.copy_(image_threshold)
        self._pixel_threshold.copy_(pixel_threshold)
        self.image_min.copy_(image_range[0])
        self.image_max.copy_(image_range[1])
        self.pixel_min.copy_(pixel_range[0])
        self.pixel_max.copy_(pixel_range[1])
        self.is_calibrated.fill_(True)

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Learn from validation only while uncalibrated."""
        if bool(self.is_calibrated):
            for metric in (
                self._image_threshold_metric,
                self._pixel_threshold_metric,
                self._image_min_max_metric,
                self._pixel_min_max_metric,
            ):
                metric.reset()
            return
        super().on_validation_epoch_end(trainer, pl_module)
