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
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import timm
import torch
from anomalib import LearningType
from anomalib.data import Batch
from anomalib.metrics import AUPRO, AUROC, Evaluator, F1Score
from anomalib.models.components import AnomalibModule
from anomalib.pre_processing import PreProcessor
from anomalib.visualization import Visualizer
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.types import STEP_OUTPUT
from torch import nn
from torch.utils.data import DataLoader, Subset
from torchvision.transforms.v2 import Compose, Normalize, Resize

from .calibration import (
    LEVEL_COMBINATIONS,
    CalibratedPostProcessor,
    calibrated_combination,
    conformal_p_values,
    conformal_threshold,
    level_p_values,
)
from .distributed import gather_workspaces, keep_rank_zero_workspace, real_share, unwrapped_model
from .fine_tuning import ForgettingMonitor, freeze_batchnorm, held_out_split, set_trainable
from .gaussian import StreamingGaussian
from .input_checks import check_dataloaders, check_fit_data, dataset_image_paths, non_finite_features_error
from .pseudo_anomalies import PSEUDO_ANOMALIES, PseudoAnomalyGenerator, validate_pseudo_anomalies
from .torch_model import GaussFTModel, ImageScore, LossDistance, MapGaussian, ModelNotFittedError

logger = logging.getLogger(__name__)

__all__ = ["GaussFT"]

LOSS_GAUSSIANS = ("cross_fit", "in_sample")
# Hyperparameters that change the shape or meaning of the fitted statistics.
ARCHITECTURE_KEYS = ("backbone", "image_size", "levels", "map_levels", "map_gaussian", "image_score")


def _normalise(value: Any) -> Any:  # noqa: ANN401
    """Compare list/tuple hyperparameters by value (checkpoints store tuples as lists)."""
    return [_normalise(v) for v in value] if isinstance(value, list | tuple) else value


def backbone_input_config(backbone: str) -> tuple[tuple[int, int], tuple[float, ...], tuple[float, ...]]:
    """Native input size, mean and std of a timm backbone's pretrained weights."""
    cfg = timm.get_pretrained_cfg(backbone.split(".")[0]) if timm.is_model(backbone.split(".")[0]) else None
    if cfg is None:
        return (224, 224), (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    return tuple(cfg.input_size[1:]), tuple(cfg.mean), tuple(cfg.std)


def _as_size(image_size: int | Sequence[int] | None, backbone: str) -> tuple[int, int]:
    if image_size is None:
        return backbone_input_config(backbone)[0]
    size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    if len(size) != 2 or any(not isinstance(s, int) or s < 1 for s in size):
        msg = f"image_size must be a positive int or (height, width), got {image_size!r}."
        raise ValueError(msg)
    return size


class GaussFT(AnomalibModule):
    """GaussFT anomaly detection model.

    Args:
        backbone: timm model name. Default: the paper's EfficientNet-B4.
        pre_trained: Use ImageNet weights (timm hub, or ``backbone_weights``).
        backbone_weights: Local ``.pth``/``.safetensors`` file with the backbone's weights
            (air-gapped machines); tensors are matched by name, else by position.
        image_size: Input size; default the backbone's native size (380 for B4).
        levels: Feature levels of the image score (default all; 9 for EfficientNets).
        map_levels: Feature levels of the anomaly map (default: stride-8/16 stages).
        map_gaussian: ``"shared"`` (one Gaussian per level) or ``"per_position"`` (PaDiM-style).
        image_score: ``"gaussian_ad"`` (paper) or ``"map_max"``.
        sigma: Anomaly-map blur in pixels.
        fine_tune_epochs: Maximum fine-tuning epochs; ``0`` gives the frozen Gaussian AD.
        learning_rate: AdamW learning rate of the backbone.
        weight_decay: AdamW weight decay.
        trainable_levels: Levels whose layers are fine-tuned (``None``: all; EfficientNets only).
        freeze_batchnorm: Keep BatchNorm running statistics fixed while fine-tuning.
        held_out_fraction: Fraction of the normal training images held out for forgetting detection.
        pseudo_anomalies: Augmentations that make pseudo-anomalies of held-out normals.
        patience: Epochs without improvement of the pseudo-anomaly AUROC before stopping.
        loss_gaussian: ``"cross_fit"``: each training image's loss uses Gaussians fitted on the other half
            of the training images (out-of-sample distances); ``"in_sample"``: on all of them.
        loss_distance: ``"mahalanobis"`` (the paper's loss) or ``"euclidean"`` (a center loss, for ablations).
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
        image_size: int | Sequence[int] | None = None,
        levels: Sequence[int] | None = None,
        map_levels: Sequence[int] | None = None,
        map_gaussian: str = "shared",
        image_score: str = "gaussian_ad",
        sigma: float = 4.0,
        fine_tune_epochs: int = 10,
        learning_rate: float = 3e-4,
        weight_decay: float = 1e-4,
        trainable_levels: Sequence[int] | None = None,
        freeze_batchnorm: bool = True,
        held_out_fraction: float = 0.2,
        pseudo_anomalies: Sequence[str] = PSEUDO_ANOMALIES,
        patience: int = 3,
        loss_gaussian: str = "cross_fit",
        loss_distance: str = "mahalanobis",
        false_alarm_rate: float | None = None,
        seed: int = 0,
        pixel_aupro: bool = False,
        pre_processor: nn.Module | bool = True,
        post_processor: nn.Module | bool = True,
        evaluator: Evaluator | bool = True,
        visualizer: Visualizer | bool = True,
    ) -> None:
        self._validate_config(locals())
        if evaluator is True:
            evaluator = self.configure_evaluator(pixel_aupro=pixel_aupro)
        super().__init__(
            pre_processor=pre_processor,
            post_processor=post_processor,
            evaluator=evaluator,
            visualizer=visualizer,
        )
        self.model: GaussFTModel = GaussFTModel(
            backbone=backbone,
            pre_trained=pre_trained,
            backbone_weights=str(backbone_weights) if backbone_weights else None,
            image_size=_as_size(image_size, backbone),
            levels=levels,
            map_levels=map_levels,
            map_gaussian=map_gaussian,
            image_score=image_score,
            sigma=sigma,
        )
        self.fine_tune_epochs = fine_tune_epochs
        # The frozen fit has nothing to optimise: manual optimisation lets its steps return no loss (also under
        # DDP, where automatic optimisation refuses a skipped step).
        self.automatic_optimization = self.fine_tuning
        if self.fine_tuning:
            self.trainable_levels = set_trainable(self.model.feature_extractor, trainable_levels, self.model.levels)
        else:
            self.model.feature_extractor.requires_grad_(False)
            self.trainable_levels = []
        self.monitor = ForgettingMonitor(patience=patience)
        self.pseudo_anomaly_generator = PseudoAnomalyGenerator(pseudo_anomalies, seed=seed)
        self._epoch_done = False
        self._final = False
        self._best_weights: dict[str, torch.Tensor] | None = None
        self._loaders: dict[str, DataLoader] = {}
        self._held_out_paths: set[str] = set()
        self._epoch_loss = [0.0, 0]
        self._limit_val_batches: int | float | None = None
        self._fold_of: dict[str, int] = {}
        self._fold_gaussians: list[dict[str, StreamingGaussian]] | None = None
        self._samples_seen = 0

    @staticmethod
    def _validate_config(args: dict[str, Any]) -> None:
        for name, value, enum in (
            ("map_gaussian", args["map_gaussian"], MapGaussian),
            ("image_score", args["image_score"], ImageScore),
            ("loss_distance", args["loss_distance"], LossDistance),
        ):
            if value not in {e.value for e in enum}:
                msg = f"{name} must be one of {[e.value for e in enum]}, got {value!r}."
                raise ValueError(msg)
        checks = {
            "fine_tune_epochs": isinstance(args["fine_tune_epochs"], int) and args["fine_tune_epochs"] >= 0,
            "learning_rate": args["learning_rate"] > 0,
            "weight_decay": args["weight_decay"] >= 0,
            "held_out_fraction": 0 < args["held_out_fraction"] < 1,
            "patience": isinstance(args["patience"], int) and args["patience"] >= 1,
            "sigma": args["sigma"] >= 0,
        }
        for name, ok in checks.items():
            if not ok:
                msg = f"Invalid value for {name}: {args[name]!r}."
                raise ValueError(msg)
        validate_pseudo_anomalies(args["pseudo_anomalies"])
        rate = args["false_alarm_rate"]
        if rate is not None and not 0 < rate < 1:
            msg = f"false_alarm_rate must lie in (0, 1) or be None, got {rate!r}."
            raise ValueError(msg)
        if args["loss_gaussian"] not in LOSS_GAUSSIANS:
            msg = f"loss_gaussian must be one of {list(LOSS_GAUSSIANS)}, got {args['loss_gaussian']!r}."
            raise ValueError(msg)

    @property
    def fine_tuning(self) -> bool:
        """Whether the backbone is fine-tuned (``fine_tune_epochs > 0``)."""
        return self.fine_tune_epochs > 0

    @property
    def calibrating(self) -> bool:
        """Whether thresholds are calibrated on held-out normals (``false_alarm_rate`` set)."""
        return self.hparams.get("false_alarm_rate") is not None

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
        """Resize to the backbone's native size and normalise with its own mean/std (timm config)."""
        backbone = self.hparams.get("backbone", "tf_efficientnet_b4")
        size = image_size or _as_size(self.hparams.get("image_size"), backbone)
        _, mean, std = backbone_input_config(backbone)
        return PreProcessor(transform=Compose([Resize(size, antialias=True), Normalize(mean=mean, std=std)]))

    def configure_optimizers(self) -> torch.optim.Optimizer | None:
        """AdamW on the trainable backbone layers; none for the frozen Gaussian AD."""
        if not self.fine_tuning:
            return None
        params = [p for p in self.model.feature_extractor.parameters() if p.requires_grad]
        return torch.optim.AdamW(params, lr=self.hparams.learning_rate, weight_decay=self.hparams.weight_decay)

    @property
    def trainer_arguments(self) -> dict[str, Any]:
        """Epoch budget of the fine-tuning (1 pass when frozen); several devices allowed."""
        return {"max_epochs": max(1, self.fine_tune_epochs), "num_sanity_val_steps": 0}

    @property
    def learning_type(self) -> LearningType:
        """GaussFT learns from normal images only."""
        return LearningType.ONE_CLASS

    # ---- data for the statistics and the forgetting check -----------------------------------
    def _preprocess(self, images: torch.Tensor) -> torch.Tensor:
        images = images.to(self.device)
        return self.pre_processor.transform(images) if self.pre_processor is not None else images

    def _train_dataset(self) -> Any:  # noqa: ANN401 - any map-style dataset with image paths
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is not None and hasattr(datamodule, "train_data"):
            return datamodule.train_data
        return self.trainer.train_dataloader.dataset

    @staticmethod
    def _image_paths(dataset: Any) -> list[str]:  # noqa: ANN401
        paths = dataset_image_paths(dataset)
        return paths if paths is not None else [str(dataset[i].image_path) for i in range(len(dataset))]

    def _accumulate(
        self, paths: Sequence[str], images: torch.Tensor, image_only: bool = False
    ) -> dict[int, torch.Tensor]:
        """``model.update_statistics`` whose NaN/Inf error names the batch's images."""
        try:
            return self.model.update_statistics(images, image_only=image_only)
        except FloatingPointError as err:
            raise non_finite_features_error(paths, images) from err

    def _setup_fine_tuning(self) -> None:
        dataset = self._train_dataset()
        paths = self._image_paths(dataset)
        fit_idx, held_idx = held_out_split(paths, self.hparams.held_out_fraction, self.hparams.seed)
        self._held_out_paths = {paths[i] for i in held_idx}
        # Two folds for the cross-fitted loss: alternate over the fit images in path order.
        self._fold_of = {path: rank % 2 for rank, path in enumerate(sorted(paths[i] for i in fit_idx))}
        if self.fine_tuning and self.hparams.loss_gaussian == "cross_fit":
            self._fold_gaussians = [
                {k: StreamingGaussian(1, g.dim).to(self.device) for k, g in self.model.image_gaussians.items()}
                for _ in range(2)
            ]
        datamodule = getattr(self.trainer, "datamodule", None)
        batch_size = getattr(datamodule, "eval_batch_size", None) or getattr(datamodule, "train_batch_size", None) or 8
        workers = getattr(datamodule, "num_workers", 0)
        collate = getattr(datamodule, "external_collate_fn", None) or getattr(dataset, "collate_fn", None)

        def loader(indices: list[int] | None) -> DataLoader:
            subset = dataset if indices is None else Subset(dataset, indices)
            return DataLoader(subset, batch_size=batch_size, shuffle=False, num_workers=workers, collate_fn=collate)

        self._loaders = {"fit": loader(fit_idx), "held_out": loader(held_idx), "all": loader(None)}
        logger.info(
            "%s on %d normal images; %d held out for %s (never trained on).",
            "Fine-tuning" if self.fine_tuning else "Fitting",
            len(fit_idx),
            len(held_idx),
            " and ".join(
                purpose
                for purpose, used in (("forgetting detection", self.fine_tuning), ("calibration", self.calibrating))
                if used
            ),
        )

    @torch.no_grad()
    def _refit(self, loader: DataLoader, image_only: bool) -> None:
        """Re-estimate the Gaussians from the current network (and, while fine-tuning, the fold Gaussians)."""
        self.model.eval()
        self.model.reset_statistics()
        folds = (self._fold_gaussians or []) if image_only else []
        for fold_gaussians in folds:
            for gaussian in fold_gaussians.values():
                gaussian.reset()
        for batch in loader:
            features = self._accumulate(batch.image_path, self._preprocess(batch.image), image_only=image_only)
            if not folds:
                continue
            fold = torch.tensor([self._fold_of.get(str(p), -1) for p in batch.image_path], device=self.device)
            for index, fold_gaussians in enumerate(folds):
                if (fold == index).any():
                    for lvl, gaussian in fold_gaussians.items():
                        gaussian.update(self.model.pooled(features[int(lvl)])[fold == index])
        self.model.fit(image_only=image_only)
        for gaussian in (g for fold_gaussians in folds for g in fold_gaussians.values()):
            gaussian.fit()
            gaussian.reset()

    @torch.no_grad()
    def pseudo_anomaly_auroc(self) -> dict[str, float]:
        """AUROC of held-out normals vs their pseudo-anomalies under the current image Gaussians."""
        from sklearn.metrics import roc_auc_score

        self.model.eval()
        normal, anomalous = [], {kind: [] for kind in self.pseudo_anomaly_generator.kinds}
        for index, batch in enumerate(self._loaders["held_out"]):
            normal.append(self._image_scores(batch.image))
            for kind, images in self.pseudo_anomaly_generator(batch.image, index).items():
                anomalous[kind].append(self._image_scores(images))
        normal_scores = torch.cat(normal)
        result = {}
        for kind, scores in anomalous.items():
            kind_scores = torch.cat(scores)
            labels = [0] * len(normal_scores) + [1] * len(kind_scores)
            result[kind] = float(roc_auc_score(labels, torch.cat([normal_scores, kind_scores]).cpu().numpy()))
        all_scores = torch.cat([normal_scores, *[torch.cat(s) for s in anomalous.values()]])
        labels = [0] * len(normal_scores) + [1] * (len(all_scores) - len(normal_scores))
        result["all"] = float(roc_auc_score(labels, all_scores.cpu().numpy()))
        return result

    def _image_scores(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.pooled_image_score(self.model.extract(self._preprocess(images)))

    # ---- Lightning hooks ----------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        """Under DDP, keep the frozen model unwrapped: it has no gradient to synchronise.

        PyTorch's ``DistributedDataParallel`` refuses a module without trainable parameters, which is what
        the frozen Gaussian AD is; its statistics are all-reduced explicitly at the end of the pass
        (:meth:`_all_reduce_statistics`). Lightning itself skips the wrapper outside fitting; for the frozen
        fit the strategy is told to do the same (Lightning has no public switch for this).
        """
        super().setup(stage)
        strategy = self._trainer.strategy if self._trainer is not None else None
        if stage == TrainerFn.FITTING and not self.fine_tuning and isinstance(strategy, DDPStrategy):
            strategy._setup_model = unwrapped_model

    def on_fit_start(self) -> None:
        """Split off the held-out normals and score the pretrained network (epoch 0 of the stopping rule)."""
        self._final = False
        check_fit_data(getattr(self.trainer, "datamodule", None))
        if not (self.fine_tuning or self.calibrating):
            return
        self._setup_fine_tuning()
        if not self.fine_tuning:
            return
        if self.trainer.ckpt_path is None or self.monitor.best_epoch < 0:  # a new run, not a resumed one
            self.monitor = ForgettingMonitor(patience=self.hparams.patience)
            self._best_weights = None
            self._evaluate_epoch(epoch=0, loss=math.nan)
        else:  # resumed: rebuild the loss's Gaussians from the restored weights, as the interrupted run had
            self._refit(self._loaders["fit"], image_only=True)
        self.model.train()

    def on_fit_end(self) -> None:
        """Under DDP, leave one results folder (rank 0's) behind anomalib's ``latest`` link."""
        if self._trainer is None or self.trainer.world_size <= 1 or not torch.distributed.is_initialized():
            return
        rank_dirs = gather_workspaces(self.trainer.default_root_dir)
        if self.trainer.is_global_zero:
            keep_rank_zero_workspace(rank_dirs)

    def on_train_epoch_start(self) -> None:
        """Reset the per-epoch state."""
        self._epoch_done = False
        self._epoch_loss = [0.0, 0]
        self._samples_seen = 0
        if not self.fine_tuning:
            self.model.reset_statistics()
            return
        # The training loader's shuffle draws from the global RNG when its iterator is created, right after
        # this hook: seeding it per epoch makes a resumed run see the same batches as an uninterrupted one.
        torch.manual_seed(self.hparams.seed * 100_003 + self.current_epoch)
        self.model.train()  # the previous epoch's evaluation left it in eval mode
        if self.hparams.freeze_batchnorm:
            freeze_batchnorm(self.model)

    def training_step(self, batch: Batch, *args, **kwargs) -> torch.Tensor | None:
        """Frozen: accumulate statistics. Fine-tuning: Mahalanobis loss of the non-held-out images."""
        del args, kwargs
        real = self._unpadded_count(len(batch.image_path))
        keep = [index < real and str(path) not in self._held_out_paths for index, path in enumerate(batch.image_path)]
        if not any(keep):
            return self._zero_loss()
        images = batch.image[torch.tensor(keep, device=batch.image.device)]
        paths = [str(p) for p, k in zip(batch.image_path, keep, strict=True) if k]
        if not self.fine_tuning:
            self.model.eval()
            self._accumulate(paths, images)
            return None
        if self.hparams.freeze_batchnorm:
            freeze_batchnorm(self.model)
        folds = torch.tensor([self._fold_of[p] for p in paths], device=self.device)
        loss = self.model.fine_tuning_loss(images, self._fold_gaussians, folds, self.hparams.loss_distance)
        if not torch.isfinite(loss):
            raise non_finite_features_error(paths, images)
        self._epoch_loss[0] += float(loss.detach()) * len(images)
        self._epoch_loss[1] += len(images)
        self.log("train_loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=len(images))
        return loss

    def _unpadded_count(self, batch_size: int) -> int:
        """How many of this batch's images are real (not DDP sampler padding): no image counted twice."""
        sampler = getattr(self._trainer.train_dataloader, "sampler", None) if self._trainer is not None else None
        real = real_share(sampler, self._samples_seen, batch_size)
        self._samples_seen += batch_size
        return real

    def _zero_loss(self) -> torch.Tensor | None:
        """A batch without trainable images: ``None``, or under DDP a zero loss that reaches every parameter.

        DDP's gradient all-reduce needs every rank to run backward at every step.
        """
        if not self.fine_tuning or self._trainer is None or self.trainer.world_size <= 1:
            return None
        return sum(p.sum() for p in self.model.feature_extractor.parameters() if p.requires_grad) * 0.0

    def on_train_batch_end(self, outputs: Any, batch: Batch, batch_idx: int) -> None:  # noqa: ANN401
        """End of an epoch's data: fit / evaluate before Lightning decides whether to validate."""
        del outputs, batch
        if batch_idx + 1 >= self.trainer.num_training_batches:
            self._end_of_epoch()

    def on_validation_start(self) -> None:
        """Safety net if the last training batch went unnoticed (validation needs a fitted model)."""
        if (
            self._trainer is not None
            and self.trainer.state.fn == TrainerFn.FITTING
            and not self.trainer.sanity_checking
        ):
            self._end_of_epoch()

    def on_train_epoch_end(self) -> None:
        """Safety net when no validation runs."""
        self._end_of_epoch()

    def _end_of_epoch(self) -> None:
        if self._epoch_done:
            return
        self._epoch_done = True
        if not self.fine_tuning:
            self._all_reduce_statistics()
            logger.info("Fitting the Gaussians of %d levels.", len(self.model.gaussians()))
            self.model.fit()
            if self.calibrating:
                self._calibrate()
            self._final = True
            self._release_training_state()
            return
        loss = self._epoch_loss[0] / max(1, self._epoch_loss[1])
        self._evaluate_epoch(epoch=self.current_epoch + 1, loss=loss)
        last_epoch = self.current_epoch + 1 >= (self.trainer.max_epochs or self.fine_tune_epochs)
        if self.monitor.should_stop or last_epoch:
            self._finalise_fine_tuning(reason="patience exhausted" if self.monitor.should_stop else "epoch budget used")
        else:
            # Intermediate epochs skip the datamodule's validation: it may hold real anomalies, it must not
            # steer fine-tuning, and the post-processor only needs the final model's outputs.
            if self._limit_val_batches is None:
                self._limit_val_batches = self.trainer.limit_val_batches
            self.trainer.limit_val_batches = 0

    def _evaluate_epoch(self, epoch: int, loss: float) -> None:
        start = time.perf_counter()
        self._refit(self._loaders["fit"], image_only=True)
        aurocs = self.pseudo_anomaly_auroc()
        improved = self.monitor.update(epoch, aurocs["all"], loss=loss, **{f"auroc_{k}": v for k, v in aurocs.items()})
        if improved:
            self._best_weights = {
                k: v.detach().cpu().clone() for k, v in self.model.feature_extractor.state_dict().items()
            }
        if epoch > 0:
            self.log_dict({"pseudo_auroc": aurocs["all"], "train_loss_epoch_mean": loss}, prog_bar=True)
        logger.info(
            "Epoch %d: train loss %.4f, pseudo-anomaly AUROC %.4f (%s)%s [%.1fs]",
            epoch,
            loss,
            aurocs["all"],
            ", ".join(f"{k} {v:.3f}" for k, v in aurocs.items() if k != "all"),
            " *best*" if improved else "",
            time.perf_counter() - start,
        )

    def _finalise_fine_tuning(self, reason: str) -> None:
        best = self.monitor.best_epoch
        logger.info(
            "Fine-tuning stops (%s): keeping epoch %d, pseudo-anomaly AUROC %.4f (epoch 0 = pretrained).",
            reason,
            best,
            self.monitor.best_score,
        )
        if self._best_weights is not None:
            self.model.feature_extractor.load_state_dict(self._best_weights)
        # With calibration the held-out normals must stay out of the final fit (split conformal).
        self._refit(self._loaders["fit" if self.calibrating else "all"], image_only=False)  # marks it fitted
        if self.calibrating:
            self._calibrate()
        self._final = True
        self._release_training_state()
        self.trainer.should_stop = True
        if self._limit_val_batches is not None:
            self.trainer.limit_val_batches = self._limit_val_batches
        if self.trainer.is_global_zero:
            self._write_training_curve()

    def _release_training_state(self) -> None:
        """Drop loaders, weight copies and fold Gaussians: a torch export pickles the whole module."""
        self._loaders = {}
        self._best_weights = None
        self._fold_gaussians = None

    @torch.no_grad()
    def _calibrate(self) -> None:
        """Score the held-out normals with the final model and fix the conformal thresholds."""
        self.model.eval()
        scores, map_max, map_min, level_distances = [], [], [], []
        for batch in self._loaders["held_out"]:
            images = self._preprocess(batch.image)
            features = self.model.extract(images)
            out = self.model.predict_from_features(features, images.shape[-2:])
            scores.append(out.pred_score)
            map_max.append(out.anomaly_map.amax(dim=(-3, -2, -1)))
            map_min.append(out.anomaly_map.amin(dim=(-3, -2, -1)))
            level_distances.append(self.model.level_distances(features))
        scores_t, map_max_t = torch.cat(scores), torch.cat(map_max)
        rate = self.hparams.false_alarm_rate
        image_threshold = conformal_threshold(scores_t, rate)
        pixel_threshold = conformal_threshold(map_max_t, rate)
        self.model.calibration_scores = scores_t.detach().clone()
        self.model.calibration_map_max = map_max_t.detach().clone()
        self.model.calibration_level_scores = torch.cat(level_distances).detach().clone()
        if isinstance(self.post_processor, CalibratedPostProcessor):
            self.post_processor.set_calibration(
                image_threshold,
                (scores_t.min(), scores_t.max()),
                pixel_threshold,
                (torch.cat(map_min).min(), map_max_t.max()),
            )
        logger.info(
            "Calibrated on %d held-out normal images for a false-alarm rate of %g: image threshold %.4f, "
            "mask threshold %.4f (a normal image gets a non-empty mask with probability ≤ %g).",
            len(scores_t),
            rate,
            float(image_threshold),
            float(pixel_threshold),
            rate,
        )

    def p_values(self, images: torch.Tensor, combination: str = "score") -> torch.Tensor:
        """Conformal p-values of pre-processed images (small = anomalous); needs ``false_alarm_rate`` at fit.

        ``combination``: ``"score"`` (default; the p-value of the image score, which ``pred_label`` uses),
        ``"levels"`` (one p-value per level, ``(N, L)``), or a combination of the per-level p-values
        calibrated on the same held-out normals: ``"fisher"``, ``"simes"``, ``"cauchy"``, ``"bonferroni"``
        (see docs/calibration.md for the measured comparison).
        """
        if self.model.calibration_scores.numel() == 0:
            msg = "No calibration: fit GaussFT with false_alarm_rate set to get p-values."
            raise ModelNotFittedError(msg)
        if combination not in ("score", "levels", *LEVEL_COMBINATIONS):
            msg = f"combination must be one of {['score', 'levels', *LEVEL_COMBINATIONS]}, got {combination!r}."
            raise ValueError(msg)
        with torch.no_grad():
            if combination == "score":
                return conformal_p_values(self.model(images).pred_score, self.model.calibration_scores)
            levels = self.model.level_distances(self.model.extract(images)).to(torch.float64)
            calibration = self.model.calibration_level_scores.to(torch.float64)
        if combination == "levels":
            return level_p_values(levels, calibration)
        return calibrated_combination(levels, calibration, combination)

    def _write_training_curve(self) -> None:
        from .training_curve import save_training_curve

        root = Path(self.trainer.default_root_dir)
        try:
            path = save_training_curve(self.monitor.history, self.monitor.best_epoch, root / "fine_tuning_curve.png")
            logger.info("Training curve written to %s", path)
        except Exception:
            logger.exception("Could not write the training curve.")

    def _all_reduce_statistics(self) -> None:
        """Sum the sufficient statistics over DDP processes so every rank fits the same Gaussians."""
        trainer = self._trainer
        if trainer is None or trainer.world_size <= 1:
            return
        for gaussian in self.model.gaussians():
            accumulators = gaussian.accumulators(device=self.device)
            # Any common reference point works (the moments are re-expressed exactly); use the mean shift.
            gaussian.shift_to(trainer.strategy.reduce(accumulators["shift"].clone(), reduce_op="mean"))
            for key, tensor in gaussian.accumulators().items():
                if key != "shift":
                    tensor.copy_(trainer.strategy.reduce(tensor, reduce_op="sum"))

    def validation_step(self, batch: Batch, *args, **kwargs) -> STEP_OUTPUT:
        """Predict on validation images (the post-processor learns its normalisation from them)."""
        del args, kwargs
        predictions = self.model(batch.image)
        return batch.update(**predictions._asdict())

    # ---- checkpoints (resume mid-fine-tuning) -------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Store the stopping rule's state and best weights so an interrupted run resumes exactly."""
        super().on_save_checkpoint(checkpoint)
        if self.fine_tuning:
            checkpoint["gaussft_fine_tuning"] = {
                "monitor": self.monitor.state_dict(),
                "best_weights": None if self._final else self._best_weights,
            }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse checkpoints of another architecture; restore the stopping rule's state."""
        saved = checkpoint.get("hyper_parameters", {})
        different = {
            key: (saved[key], self.hparams.get(key))
            for key in ARCHITECTURE_KEYS
            if key in saved and _normalise(saved[key]) != _normalise(self.hparams.get(key))
        }
        if different:
            details = ", ".join(f"{k}: checkpoint {v[0]!r} vs model {v[1]!r}" for k, v in different.items())
            msg = f"This GaussFT checkpoint was made with another configuration ({details}). Build the model with "
            msg += "the checkpoint's settings, or use GaussFT.load_from_checkpoint(path)."
            raise ValueError(msg)
        super().on_load_checkpoint(checkpoint)
        state = checkpoint.get("gaussft_fine_tuning")
        if state:
            self.monitor.load_state_dict(state["monitor"])
            self._best_weights = state["best_weights"]

    # ---- inference guards ---------------------------------------------------------------------
    def on_predict_start(self) -> None:
        """Fail early with a clear message if predicting with an unfitted model."""
        self._require_fitted()

    def on_test_start(self) -> None:
        """Fail early with a clear message if testing an unfitted model or on unusable images."""
        self._require_fitted()
        check_dataloaders(self.trainer.test_dataloaders, "test data")

    def to_torch(self, *args: Any, **kwargs: Any) -> Path:  # noqa: ANN401
        """Refuse to export an unfitted model (anomalib pickles the module without running it)."""
        self._require_fitted()
        return super().to_torch(*args, **kwargs)

    def to_onnx(self, *args: Any, **kwargs: Any) -> Path:  # noqa: ANN401
        """Refuse to export an unfitted model."""
        self._require_fitted()
        return super().to_onnx(*args, **kwargs)

    def to_openvino(self, *args: Any, **kwargs: Any) -> Path:  # noqa: ANN401
        """Refuse to export an unfitted model."""
        self._require_fitted()
        return super().to_openvino(*args, **kwargs)

    def _require_fitted(self) -> None:
        if not bool(self.model.is_fitted):
            msg = "GaussFT is not fitted: train it first or pass a fitted checkpoint (--ckpt_path)."
            raise ModelNotFittedError(msg)

    def load_backbone_weights(self, path: str | Path) -> None:
        """Replace the backbone weights with a local file (unfits the model)."""
        from .feature_extractor import load_local_weights

        load_local_weights(self.model.feature_extractor.model, path)
        self.model.set_fitted(False)
