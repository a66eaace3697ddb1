"""The fit steps that use the held-out normals: split, refit targets, final fit, score normalisation, calibration."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch
from anomalib.data import Batch

from .calibration import CalibratedPostProcessor, check_achievable_rate
from .held_out import HeldOutSplit
from .held_out_normalisation import normalise_on_held_out
from .hyperparameters import ImageScore
from .image_score import UNNORMALISED_WARNING

if TYPE_CHECKING:
    from .lightning_model import GaussFT

logger = logging.getLogger(__name__)


class HeldOutFitting:
    """Mixin of :class:`GaussFT`: everything the held-out normal images are used for, in the order of a fit.

    The held-out normals are never trained on. They serve forgetting detection (fine-tuning), the z-scores of
    the "local" image score, and the conformal thresholds (``false_alarm_rate``).
    """

    def split_held_out(self: GaussFT) -> HeldOutSplit | None:
        """The held-out split when anything needs it; ``None`` for the plain frozen fit (or too few images)."""
        if not (self.fine_tuning or self.calibrating or self.normalising):
            return None
        try:
            held_out = HeldOutSplit.from_trainer(self.trainer, self.hparams.held_out_fraction, self.hparams.seed)
        except ValueError:
            if self.fine_tuning or self.calibrating:
                raise
            logger.warning(UNNORMALISED_WARNING)  # the frozen fit still works, on every image
            return None
        logger.info(held_out.describe(self.fine_tuning, self.calibrating, self.normalising))
        if self.calibrating:  # refuse an unachievable rate now, not after fine-tuning
            check_achievable_rate(len(held_out.held_out_indices), self.hparams.false_alarm_rate)
        return held_out

    def refit_targets(self: GaussFT) -> None:
        """Re-estimate the model's and the loss's fold Gaussians on the fit images (current network).

        Only the pooled Gaussians when neither the loss nor the image score reads the maps (the faster pass).
        """
        self.loss.reset()
        kind = self.hparams.loss_features

        def update_folds(batch: Batch, features: dict[int, torch.Tensor]) -> None:
            folds = self.held_out.folds(batch.image_path, self.device)
            self.loss.update(self.model.loss_samples(features, kind), folds)

        pooled_only = kind == "pooled" and self.model.image_score == ImageScore.GAUSSIAN_AD
        loader = self.held_out.loader("fit")
        on_features = update_folds if self.loss.cross_fitted else None
        self.model.fit_from(loader, self.preprocess, image_only=pooled_only, on_features=on_features, quiet=True)
        self.model.set_fitted(False)  # usable only after finish_fit (score normalisation, final refit)
        if self.loss.cross_fitted:
            self.loss.fit()

    def finish_fit(self: GaussFT) -> None:
        """Final fit of every Gaussian with the kept network, then :meth:`finish_held_out`."""
        part = "fit" if self.calibrating or self.normalising else "all"
        self.model.fit_from(self.held_out.loader(part), self.preprocess, keep_statistics=self.refitting)
        self.finish_held_out()

    @property
    def refitting(self: GaussFT) -> bool:
        """Whether the held-out pass adds the held-out normals to the fit (not with calibration: split conformal)."""
        return self.normalising and self.held_out is not None and not self.calibrating

    def finish_held_out(self: GaussFT) -> None:
        """After the fit: normalise the score terms (and refit on every image), calibrate, drop the dataset."""
        if self.held_out is None:
            return
        if self.normalising:
            normalise_on_held_out(self.model, self.held_out.loader("held_out"), self.preprocess, self.refitting)
        if self.calibrating:
            self.calibrate()
        self.held_out.release()

    def calibrate(self: GaussFT) -> None:
        """Score the held-out normals with the final model and fix the conformal thresholds."""
        loader = self.held_out.loader("held_out")
        thresholds = self.calibrator.calibrate(self.model, loader, self.preprocess, self.hparams.false_alarm_rate)
        if isinstance(self.post_processor, CalibratedPostProcessor):
            self.post_processor.set_calibration(**thresholds)
