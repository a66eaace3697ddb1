"""GaussFT: Gaussian anomaly detection on fine-tuned representations (Rippel et al., 2021).

Example:
    >>> from anomalib.data import MVTecAD
    >>> from anomalib.engine import Engine
    >>> from anomalib_gaussft import GaussFT
    >>> model = GaussFT(backbone="tf_efficientnet_lite0")
    >>> engine = Engine()
    >>> engine.train(model=model, datamodule=MVTecAD(category="bottle"))

"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from anomalib import LearningType
from anomalib.data import Batch
from anomalib.metrics import AUPRO, AUROC, Evaluator, F1Score
from anomalib.models.components import AnomalibModule
from anomalib.pre_processing import PreProcessor
from anomalib.visualization import Visualizer
from lightning.pytorch import Callback
from lightning.pytorch.utilities.types import STEP_OUTPUT
from torch import nn
from torchmetrics import MeanMetric

from . import hyperparameters as hp
from .calibration import CalibratedPostProcessor, Calibrator
from .distributed import DistributedFit, all_reduce_statistics, real_share, zero_loss
from .fitted_guards import FittedModelGuards
from .forgetting import ForgettingCallback
from .held_out import HeldOutSplit
from .held_out_fitting import HeldOutFitting
from .input_checks import check_finite, check_fit_data, non_finite_features_error
from .loss import GaussianLoss
from .pre_processor import GaussFTPreProcessor
from .pseudo_anomalies import PSEUDO_ANOMALIES
from .shuffle import SeededShuffle
from .torch_model import GaussFTModel
from .trainable_layers import fine_tuning_optimizer, freeze_batchnorm, set_trainable

logger = logging.getLogger(__name__)

__all__ = ["GaussFT"]


class GaussFT(HeldOutFitting, FittedModelGuards, AnomalibModule):
    """GaussFT anomaly detection model.

    Args:
        backbone: timm model name. Default: the paper's EfficientNet-B4.
        pre_trained: Use ImageNet weights (timm hub, or ``backbone_weights``).
        backbone_weights: Local ``.pth``/``.safetensors`` file with the backbone's weights
            (air-gapped machines); tensors are matched by name, else by position.
        image_size: Input size; default the backbone's native size (380 for B4).
        levels: Feature levels of the image score (default all; 9 for EfficientNets).
        map_levels: Feature levels of the anomaly map (default: stride-8/16 stages).
        map_gaussian: ``"regional"`` (one Gaussian per level and image region), ``"shared"`` (one per level)
            or ``"per_position"`` (PaDiM-style).
        map_regions: Regions per image side of ``"regional"`` map Gaussians.
        map_neighbourhood: Side of the neighbourhood over which each map position's features are averaged
            before its Gaussian (PatchCore's local aggregation); ``1`` = none.
        map_detail_levels: Levels whose unaveraged map is fused into the anomaly map: per pixel, the max of the
            averaged and the detail map, each scaled to its held-out normals' median and 99th percentile (keeps
            defects one feature position wide that the average dilutes). ``None``: the finest map level when
            ``map_neighbourhood > 1``; ``[]``: no fusion. The image score never reads the detail map.
        map_layout: Add the layout term per 3 × 3 cell (how unexpected each cell is given the others) to the
            anomaly map where it exceeds its held-out normals' tail (mean + 2.33 std of their pixels): large
            diffuse defects that the local maps miss. ``None``: on whenever the image score has a layout term
            ("local", "combined").
        score_layout_map: The image score's map term reads the averaged map plus the layout map's excess over its
            tail (both on their held-out scale) instead of the averaged map alone: an image whose layout is unusual
            in one cell also scores higher on the map term. ``None``: whenever there is a layout map.
        image_score: ``"local"``: z(layout distance) + z(mean of the map's top 1 %), z-scored on held-out
            normals; ``"combined"``: z(the paper's pooled score) added to them (better on unaligned surfaces,
            worse on aligned parts); ``"gaussian_ad"`` (the paper's pooled score) or ``"map_max"``.
        layout_grids: Pooling grids of the layout term (image score and layout map), each with its own Gaussian,
            their evidence averaged: ``2`` (default): two 3 × 3 grids one feature position apart (at 224 px), so
            that no defect depends on where one grid's cell borders fall; ``1``: the whole map on one grid (the
            default before r20; 4.3 MiB fewer statistics for lite0).
        sigma: Anomaly-map blur in pixels (the detail map gets half of it).
        fine_tune_epochs: Fine-tuning epochs; ``0`` gives the frozen Gaussian AD.
        learning_rate: Peak AdamW learning rate of the backbone.
        weight_decay: AdamW weight decay.
        lr_schedule: ``"warmup_cosine"`` (one epoch of linear warm-up, then cosine to 0) or ``"constant"``.
        trainable_levels: Levels whose layers are fine-tuned (EfficientNets only); ``None``: the deeper half
            (levels 5-8), every layer for other backbones.
        freeze_batchnorm: Keep BatchNorm running statistics fixed while fine-tuning.
        held_out_fraction: Fraction of the normal training images held out for forgetting detection.
        pseudo_anomalies: Augmentations that make pseudo-anomalies of held-out normals.
        patience: Epochs without improvement of the pseudo-anomaly AUROC before stopping; ``None``: train the
            whole budget.
        wise_alphas: Keep ``(1-α)·pretrained + α·fine-tuned`` weights for the α with the best pseudo-anomaly
            AUROC (WiSE-FT); ``None``: keep the best epoch's weights (the paper's rule).
        loss_gaussian: ``"cross_fit"``: each training image's loss uses Gaussians fitted on the other half
            of the training images (out-of-sample distances); ``"in_sample"``: on all of them.
        loss_distance: ``"mahalanobis"`` (the paper's loss) or ``"euclidean"`` (a center loss, for ablations).
        loss_features: ``"pooled"``: the loss pulls the pooled features of the image-score levels toward their
            Gaussians (the paper's); ``"local"``: every map position toward its region's Gaussian and the layout
            vector toward the layout Gaussian (what the "local" image score reads). With ``"local"`` and
            ``trainable_levels=None`` the map levels' stages are trained.
        false_alarm_rate: Target rate of false alarms on normal images. When set, image and mask
            thresholds are calibrated on the held-out normals (conformal p-value ≤ rate), which then
            take no part in the final fit; when ``None``, anomalib's F1-adaptive thresholds are used.
        seed: Seed of the held-out split and of the pseudo-anomalies.
        pixel_aupro: Add pixel AUPRO to the default test metrics (``evaluator=True``). Off by default: the
            test results then have the same keys as anomalib's stock models (PaDiM, PatchCore, DFM, ...),
            which anomalib's benchmark pipeline needs to put them in one table.
        pre_processor: Pre-processor, or ``True`` for the backbone's native size and normalisation.
        post_processor: Post-processor or flag.
        evaluator: Evaluator or flag.
        visualizer: Visualizer or flag.

    """

    def __init__(
        self,
        backbone: str = "tf_efficientnet_b4",
        pre_trained: bool = True,
        backbone_weights: str | None = None,
        image_size: hp.PositiveInt | Sequence[hp.PositiveInt] | None = None,
        levels: Sequence[hp.NonNegativeInt] | None = None,
        map_levels: Sequence[hp.NonNegativeInt] | None = None,
        map_gaussian: hp.MapGaussianName = "regional",
        map_regions: hp.PositiveInt = 10,
        map_neighbourhood: hp.PositiveInt = 3,
        map_detail_levels: Sequence[hp.NonNegativeInt] | None = None,
        map_layout: bool | None = None,
        score_layout_map: bool | None = None,
        image_score: hp.ImageScoreName = "local",
        layout_grids: hp.LayoutGridCount = 2,
        sigma: hp.NonNegativeFloat = 4.0,
        fine_tune_epochs: hp.NonNegativeInt = 6,
        learning_rate: hp.PositiveFloat = 3e-4,
        weight_decay: hp.NonNegativeFloat = 1e-4,
        lr_schedule: hp.LrScheduleName = "warmup_cosine",
        trainable_levels: Sequence[hp.NonNegativeInt] | None = None,
        freeze_batchnorm: bool = True,
        held_out_fraction: hp.OpenUnitInterval = 0.2,
        pseudo_anomalies: Sequence[hp.PseudoAnomalyName] = PSEUDO_ANOMALIES,
        patience: hp.PositiveInt | None = None,
        wise_alphas: Sequence[hp.ClosedUnitInterval] | None = hp.WISE_ALPHAS,
        loss_gaussian: hp.LossGaussianName = "cross_fit",
        loss_distance: hp.LossDistanceName = "mahalanobis",
        loss_features: hp.LossFeaturesName = "pooled",
        false_alarm_rate: hp.OpenUnitInterval | None = None,
        seed: hp.NonNegativeInt = 0,
        pixel_aupro: bool = False,
        pre_processor: nn.Module | bool = True,
        post_processor: nn.Module | bool = True,
        evaluator: Evaluator | bool = True,
        visualizer: Visualizer | bool = True,
    ) -> None:
        hp.check_hyperparameters(locals())
        if evaluator is True:
            evaluator = self.configure_evaluator(pixel_aupro=pixel_aupro)
        super().__init__(
            pre_processor=pre_processor, post_processor=post_processor, evaluator=evaluator, visualizer=visualizer
        )
        # Plain ints/floats (the CLI passes jsonargparse's restricted types, which weights_only checkpoints refuse).
        self.hparams.update(hp.plain(dict(self.hparams)))
        self.model: GaussFTModel = self.build_model()
        # The frozen fit has nothing to optimise: manual optimisation lets its steps return no loss (also under
        # DDP, where automatic optimisation refuses a skipped step).
        self.automatic_optimization = self.fine_tuning
        self.calibrator = Calibrator(len(self.model.levels))
        self.held_out: HeldOutSplit | None = None
        self.forgetting: ForgettingCallback | None = None
        self.trainable_levels: list[int] = []
        self.model.feature_extractor.requires_grad_(False)
        if self.fine_tuning:
            h = self.hparams
            extractor, local = self.model.feature_extractor, h.loss_features == "local"
            loss_levels = self.model.loss_levels(h.loss_features)
            self.trainable_levels = set_trainable(extractor, trainable_levels, loss_levels, span_loss_levels=local)
            shapes = {name: (g.groups, g.dim) for name, g in self.model.loss_targets(h.loss_features).items()}
            self.loss = GaussianLoss(shapes, h.loss_gaussian, h.loss_distance)
            self.forgetting = ForgettingCallback(h.patience, h.pseudo_anomalies, h.seed, h.wise_alphas)
        self.epoch_loss_metric = MeanMetric()  # DDP-synced mean of the epoch's training loss
        self._samples_seen = 0

    def build_model(self) -> GaussFTModel:
        """The torch model for the current hyperparameters (pretrained weights load when first needed)."""
        h = self.hparams
        return GaussFTModel(
            backbone=h.backbone,
            pre_trained=h.pre_trained,
            backbone_weights=str(h.backbone_weights) if h.backbone_weights else None,
            image_size=hp.as_image_size(h.image_size, h.backbone),
            **{key: h[key] for key in (*hp.STATISTICS_KEYS, "sigma")},
        )

    @property
    def fine_tuning(self) -> bool:
        """Whether the backbone is fine-tuned (``fine_tune_epochs > 0``)."""
        return self.hparams.fine_tune_epochs > 0

    @property
    def calibrating(self) -> bool:
        """Whether thresholds are calibrated on held-out normals (``false_alarm_rate`` set)."""
        return self.hparams.get("false_alarm_rate") is not None

    @property
    def normalising(self) -> bool:
        """Whether held-out normals fix the image score's z-scores (``"local"``, ``"combined"``) or the map fusion."""
        return self.model.normalised_on_held_out

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """The pre-processor's transform (resize, normalise) of raw images; identity without one."""
        return self.pre_processor.transform(images) if self.pre_processor is not None else images

    # ---- anomalib / Lightning configuration ------------------------------------------------------
    @staticmethod
    def configure_evaluator(pixel_aupro: bool = False) -> Evaluator:
        """Anomalib's default test metrics (image/pixel AUROC and F1), plus pixel AUPRO when ``pixel_aupro``."""
        test_metrics = [
            AUROC(fields=["pred_score", "gt_label"], prefix="image_"),
            F1Score(fields=["pred_label", "gt_label"], prefix="image_"),
            AUROC(fields=["anomaly_map", "gt_mask"], prefix="pixel_", strict=False),
            F1Score(fields=["pred_mask", "gt_mask"], prefix="pixel_", strict=False),
        ]
        if pixel_aupro:  # per-region overlap of the heatmaps
            test_metrics.append(AUPRO(fields=["anomaly_map", "gt_mask"], prefix="pixel_", strict=False))
        return Evaluator(test_metrics=test_metrics)

    def configure_post_processor(self) -> CalibratedPostProcessor:
        """Anomalib's post-processor; with ``false_alarm_rate`` its thresholds come from the calibration."""
        return CalibratedPostProcessor()

    def configure_pre_processor(self, image_size: tuple[int, int] | None = None) -> PreProcessor:  # type: ignore[override]
        """Resize to the backbone's native size and normalise with its own mean/std (timm's data config)."""
        backbone = self.hparams.get("backbone", "tf_efficientnet_b4")
        size = image_size or hp.as_image_size(self.hparams.get("image_size"), backbone)
        _, mean, std = hp.backbone_input_config(backbone)
        return GaussFTPreProcessor(size, mean, std)

    def configure_optimizers(self) -> dict[str, Any] | None:
        """AdamW on the trainable backbone layers with its per-step schedule; none for the frozen Gaussian AD."""
        if not self.fine_tuning:
            return None
        params = [p for p in self.model.feature_extractor.parameters() if p.requires_grad]
        h, trainer = self.hparams, self.trainer
        steps = int(trainer.estimated_stepping_batches)
        return fine_tuning_optimizer(params, h.learning_rate, h.weight_decay, h.lr_schedule, steps, trainer.max_epochs)

    def configure_callbacks(self) -> list[Callback]:
        """Anomalib's components, what DDP needs; when fine-tuning also a seeded shuffle and the forgetting check."""
        callbacks = [*super().configure_callbacks(), DistributedFit()]
        return [*callbacks, SeededShuffle(self.hparams.seed), self.forgetting] if self.fine_tuning else callbacks

    @property
    def trainer_arguments(self) -> dict[str, Any]:
        """Epoch budget of the fine-tuning (1 pass when frozen); several devices allowed."""
        return {"max_epochs": max(1, self.hparams.fine_tune_epochs), "num_sanity_val_steps": 0}

    @property
    def learning_type(self) -> LearningType:
        """GaussFT learns from normal images only."""
        return LearningType.ONE_CLASS

    # ---- fitting ------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        """Before fitting (not resuming: the checkpoint has them), load the backbone's pretrained weights."""
        if stage == "fit" and self.trainer.ckpt_path is None:
            self.model.feature_extractor.ensure_weights()

    def on_fit_start(self) -> None:
        """Check the training images; split off the held-out normals (forgetting, normalisation, calibration)."""
        check_fit_data(getattr(self.trainer, "datamodule", None))
        self.held_out = self.split_held_out()

    def on_train_epoch_start(self) -> None:
        """Reset the per-epoch state; fine-tuning: train mode with frozen BatchNorm."""
        self.epoch_loss_metric.reset()
        self._samples_seen = 0
        if not self.fine_tuning:
            self.model.reset_statistics()
            return
        self.model.train()
        if self.hparams.freeze_batchnorm:
            freeze_batchnorm(self.model)

    def training_step(self, batch: Batch, *args, **kwargs) -> torch.Tensor | None:
        """Frozen: accumulate statistics. Fine-tuning: loss of the images that are not held out."""
        del args, kwargs
        if not self.fine_tuning and self._trainer is not None:
            # Without an optimiser step global_step stays 0, and anomalib's ModelCheckpoint skips saving when it has
            # not moved: a step of Lightning's no-op optimiser counts the batch (as PaDiM's automatic loop does).
            self.optimizers().step()
        sampler = getattr(self._trainer.train_dataloader, "sampler", None) if self._trainer is not None else None
        real = real_share(sampler, self._samples_seen, len(batch.image_path))  # skip DDP sampler padding
        self._samples_seen += len(batch.image_path)
        held = self.held_out.is_held_out(batch.image_path) if self.held_out is not None else [False] * real
        keep = [index < real and not held[index] for index in range(len(batch.image_path))]
        if not any(keep):  # under DDP every rank must still run backward
            distributed = self._trainer is not None and self._trainer.world_size > 1
            return zero_loss(self.model.feature_extractor) if self.fine_tuning and distributed else None
        images = batch.image[torch.tensor(keep, device=batch.image.device)]
        paths = [str(p) for p, k in zip(batch.image_path, keep, strict=True) if k]
        if not self.fine_tuning:
            features = self.model.eval().extract(images)
            check_finite(features, paths, images)
            self.model.accumulate(features)
            return None
        if self.hparams.freeze_batchnorm:
            freeze_batchnorm(self.model)
        features = self.model.extract(images)
        folds = self.held_out.folds(paths, self.device) if self.held_out is not None else None
        kind = self.hparams.loss_features
        loss = self.loss(self.model.loss_samples(features, kind), self.model.loss_targets(kind), folds)
        if not torch.isfinite(loss):
            raise non_finite_features_error(paths, images)
        self.epoch_loss_metric.update(loss.detach(), weight=len(images))
        self.log("train_loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=len(images))
        return loss

    def epoch_loss(self) -> float:
        """Mean training loss of the current epoch over all images (and processes)."""
        return float(self.epoch_loss_metric.compute())

    def on_train_batch_end(self, outputs: Any, batch: Batch, batch_idx: int) -> None:  # noqa: ANN401
        """Frozen: after the last batch (before validation), fit the Gaussians. Fine-tuning: see ForgettingCallback."""
        del outputs, batch
        if self.fine_tuning or batch_idx + 1 < self.trainer.num_training_batches:
            return
        if self.trainer.world_size > 1:
            all_reduce_statistics(self.model.gaussians(), self.trainer.strategy, self.device)
        logger.info(
            "Fitting the Gaussians: %d image-score levels, %d map levels, %d detail-map levels.",
            len(self.model.levels),
            len(self.model.map_levels),
            len(self.model.map_detail_levels),
        )
        self.model.fit(keep_statistics=self.refitting)
        self.finish_held_out()

    def validation_step(self, batch: Batch, *args, **kwargs) -> STEP_OUTPUT:
        """Predict on validation images (the post-processor learns its normalisation from them)."""
        del args, kwargs
        predictions = self.model(batch.image)
        return batch.update(**predictions._asdict())

    # ---- inference --------------------------------------------------------------------------------
    def p_values(self, images: torch.Tensor, combination: str = "score") -> torch.Tensor:
        """Conformal p-values of pre-processed images (small = anomalous); needs ``false_alarm_rate`` at fit.

        ``combination``: ``"score"`` (default; the p-value of the image score, which ``pred_label`` uses),
        ``"levels"`` (one p-value per level, ``(N, L)``), or a calibrated combination of the per-level
        p-values: ``"fisher"``, ``"simes"``, ``"cauchy"``, ``"bonferroni"`` (docs/calibration.md).
        """
        return self.calibrator.p_values_of(self.model, images, combination)
