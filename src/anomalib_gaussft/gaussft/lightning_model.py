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
from pathlib import Path
from typing import Any

import timm
from anomalib import LearningType
from anomalib.data import Batch
from anomalib.metrics import Evaluator
from anomalib.models.components import AnomalibModule
from anomalib.pre_processing import PreProcessor
from anomalib.visualization import Visualizer
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.types import STEP_OUTPUT
from torch import nn
from torchvision.transforms.v2 import Compose, Normalize, Resize

from .torch_model import GaussFTModel, ImageScore, MapGaussian

logger = logging.getLogger(__name__)

__all__ = ["GaussFT"]


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
        pre_processor: nn.Module | bool = True,
        post_processor: nn.Module | bool = True,
        evaluator: Evaluator | bool = True,
        visualizer: Visualizer | bool = True,
    ) -> None:
        self._validate_choices(map_gaussian, image_score)
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
        self._epoch_finished = False

    @staticmethod
    def _validate_choices(map_gaussian: str, image_score: str) -> None:
        for name, value, enum in (
            ("map_gaussian", map_gaussian, MapGaussian),
            ("image_score", image_score, ImageScore),
        ):
            if value not in {e.value for e in enum}:
                msg = f"{name} must be one of {[e.value for e in enum]}, got {value!r}."
                raise ValueError(msg)

    def configure_pre_processor(self, image_size: tuple[int, int] | None = None) -> PreProcessor:  # type: ignore[override]
        """Resize to the backbone's native size and normalise with its own mean/std (timm config)."""
        backbone = self.hparams.get("backbone", "tf_efficientnet_b4")
        size = image_size or _as_size(self.hparams.get("image_size"), backbone)
        _, mean, std = backbone_input_config(backbone)
        return PreProcessor(transform=Compose([Resize(size, antialias=True), Normalize(mean=mean, std=std)]))

    @staticmethod
    def configure_optimizers() -> None:
        """The frozen Gaussian AD needs no optimizer."""
        return

    # ---- fitting -----------------------------------------------------------------------------
    def on_train_epoch_start(self) -> None:
        """Start a fresh accumulation of the Gaussian statistics."""
        self._epoch_finished = False
        self.model.reset_statistics()

    def training_step(self, batch: Batch, *args, **kwargs) -> None:
        """Accumulate the Gaussian statistics of a batch of normal images."""
        del args, kwargs
        self.model.feature_extractor.eval()
        self.model.update_statistics(batch.image)

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

    def _finish_epoch(self) -> None:
        if self._epoch_finished:
            return
        self._epoch_finished = True
        self._all_reduce_statistics()
        logger.info("Fitting the Gaussians of %d levels.", len(self.model.gaussians()))
        self.model.fit()

    def on_validation_start(self) -> None:
        """Lightning validates before ``on_train_epoch_end``: fit first."""
        if (
            self._trainer is not None
            and self.trainer.state.fn == TrainerFn.FITTING
            and not self.trainer.sanity_checking
        ):
            self._finish_epoch()

    def on_train_epoch_end(self) -> None:
        """Fit when no validation ran."""
        self._finish_epoch()

    def validation_step(self, batch: Batch, *args, **kwargs) -> STEP_OUTPUT:
        """Predict on validation images (the post-processor learns its normalisation from them)."""
        del args, kwargs
        predictions = self.model(batch.image)
        return batch.update(**predictions._asdict())

    @property
    def trainer_arguments(self) -> dict[str, Any]:
        """One pass over the training data; no gradient clipping; several devices allowed."""
        return {"max_epochs": 1, "num_sanity_val_steps": 0, "gradient_clip_val": 0}

    @property
    def learning_type(self) -> LearningType:
        """GaussFT learns from normal images only."""
        return LearningType.ONE_CLASS

    def load_backbone_weights(self, path: str | Path) -> None:
        """Replace the backbone weights with a local file (unfits the model)."""
        from .feature_extractor import load_local_weights

        load_local_weights(self.model.feature_extractor.model, path)
        self.model.is_fitted.fill_(False)

    def on_predict_start(self) -> None:
        """Fail early with a clear message if predicting with an unfitted model."""
        self._require_fitted()

    def on_test_start(self) -> None:
        """Fail early with a clear message if testing an unfitted model."""
        self._require_fitted()

    def _require_fitted(self) -> None:
        if not bool(self.model.is_fitted):
            from .torch_model import ModelNotFittedError

            msg = "GaussFT is not fitted: train it first or pass a fitted checkpoint (--ckpt_path)."
            raise ModelNotFittedError(msg)
