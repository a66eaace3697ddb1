"""Checkpoints and exports: clear errors for unfitted models, the checkpoint's architecture, quiet ONNX export."""

from __future__ import annotations

import contextlib
import csv
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lightning.pytorch.trainer.states import TrainerFn

from .calibration import Calibrator
from .hyperparameters import ARCHITECTURE_KEYS, ARCHITECTURE_LEGACY, same_value
from .input_checks import UnusableImagesError, check_dataloaders, skip_unusable_images

if TYPE_CHECKING:
    from .torch_model import GaussFTModel

logger = logging.getLogger(__name__)

# The ONNX opset GaussFT exports with: torch's exporter builds opset-18 graphs; anomalib's default (14) makes it
# down-convert, which fails for Pad and prints a traceback although the export succeeds.
ONNX_OPSET = 18
INT8_RECOMMENDED_IMAGES = 300  # anomalib's advice for post-training quantization


@contextlib.contextmanager
def quiet_onnx_export() -> Iterator[None]:
    """Silence onnxscript's per-pass INFO lines (hundreds per export) while exporting."""
    loggers = [logging.getLogger(name) for name in ("onnxscript", "onnx_ir")]
    levels = [each.level for each in loggers]
    for each in loggers:
        each.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for each, level in zip(loggers, levels, strict=True):
            each.setLevel(level)


class FittedModelGuards:
    """Mixin of :class:`GaussFT`: refuse to test, predict or export before fitting; take a checkpoint's architecture.

    A checkpoint fixes the architecture its statistics belong to (``ARCHITECTURE_KEYS``). Loaded to test, predict,
    validate or export, it rebuilds the model with those settings (so ``anomalib test --model GaussFT --ckpt_path X``
    needs no backbone flags); resuming a fit with other settings is an error naming every difference.
    """

    model: GaussFTModel

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Adopt the checkpoint's architecture (or refuse it when resuming a fit), then restore the components."""
        fitting = self._trainer is not None and self.trainer.state.fn == TrainerFn.FITTING
        if not fitting and bool(self.model.is_fitted) and not bool(checkpoint["state_dict"].get("model.is_fitted", 1)):
            self._keep_finished_model(checkpoint)
        saved = {**ARCHITECTURE_LEGACY, **checkpoint.get("hyper_parameters", {})}
        different = {
            key: (saved[key], self.hparams.get(key))
            for key in ARCHITECTURE_KEYS
            if key in saved and not same_value(saved[key], self.hparams.get(key))
        }
        if different:
            details = ", ".join(f"{k}: checkpoint {v[0]!r} vs model {v[1]!r}" for k, v in different.items())
            if fitting:
                msg = f"Cannot resume: this GaussFT checkpoint was made with other settings ({details}). Resume with "
                msg += "the checkpoint's settings, or start a new run without --ckpt_path."
                raise ValueError(msg)
            logger.warning("Using the checkpoint's architecture (%s).", details)
            self.adopt_architecture({key: saved[key] for key in different})
        super().on_load_checkpoint(checkpoint)

    def _keep_finished_model(self, checkpoint: dict[str, Any]) -> None:
        """Make ``checkpoint`` restore this (finished) model: its weights, statistics and component states.

        anomalib's ``Engine.train`` tests with the ``ckpt_path`` it resumed from: the interrupted run's checkpoint,
        while this process has just finished that run.
        """
        logger.warning("The checkpoint holds an unfinished fine-tuning; using the model this run finished instead.")
        finished: dict[str, Any] = {}
        super().on_save_checkpoint(finished)  # anomalib's component configs (thresholds, normalisation)
        checkpoint.update({k: v for k, v in finished.items() if k.startswith("anomalib_")})
        checkpoint["state_dict"] = self.state_dict()
        callbacks = checkpoint.get("callbacks", {})  # the pre/post-processor are callbacks with states too
        for component in (self.pre_processor, self.post_processor, self.evaluator, self.visualizer):
            if getattr(component, "state_key", None) in callbacks:
                callbacks[component.state_key] = component.state_dict()

    def adopt_architecture(self, settings: dict[str, Any]) -> None:
        """Rebuild the model (and what depends on its levels and input size) with other architecture settings."""
        self.hparams.update(settings)
        self.model = self.build_model()
        self.calibrator = Calibrator(len(self.model.levels))
        if self.pre_processor is not None:  # in place: Lightning already holds it as a callback
            fresh = self.configure_pre_processor()
            self.pre_processor.transform, self.pre_processor.export_transform = fresh.transform, fresh.export_transform

    def on_predict_start(self) -> None:
        """Refuse an unfitted model; set unreadable images aside (named at the end) so that the rest is scored."""
        self._require_fitted()
        self.skipped_images = skip_unusable_images(self.trainer.predict_dataloaders)
        for path, reason in self.skipped_images.items():
            logger.warning("Skipping %s: %s", path, reason)

    def on_predict_end(self) -> None:
        """After scoring every readable image: list the skipped ones in a file, and fail so that a script can tell."""
        if not getattr(self, "skipped_images", None):
            return
        listing = Path(self.trainer.default_root_dir) / "skipped_images.csv"
        listing.parent.mkdir(parents=True, exist_ok=True)
        with listing.open("w", newline="") as handle:
            csv.writer(handle).writerows([("image_path", "reason"), *self.skipped_images.items()])
        error = UnusableImagesError(
            self.skipped_images, f"prediction data (skipped, and listed in {listing}; every other image was scored)"
        )
        error.predictions = self.trainer.predict_loop.predictions  # the readable images' results
        raise error

    def on_test_start(self) -> None:
        """Fail early with a clear message if testing an unfitted model or on unusable images."""
        self._require_fitted()
        check_dataloaders(self.trainer.test_dataloaders, "test data")

    def to_torch(self, *args: Any, **kwargs: Any) -> Path:  # noqa: ANN401
        """Refuse to export an unfitted model (anomalib pickles the module without running it)."""
        self._require_fitted()
        return super().to_torch(*args, **kwargs)

    def to_onnx(self, *args: Any, **kwargs: Any) -> Path:  # noqa: ANN401
        """Export to ONNX (opset 18 unless given), quietly; refuse an unfitted model."""
        self._require_fitted()
        kwargs.setdefault("opset_version", ONNX_OPSET)
        with quiet_onnx_export():
            return super().to_onnx(*args, **kwargs)

    def to_openvino(self, *args: Any, **kwargs: Any) -> Path:  # noqa: ANN401
        """Refuse to export an unfitted model."""
        self._require_fitted()
        return super().to_openvino(*args, **kwargs)

    @staticmethod
    def _post_training_quantization_ov(model: Any, datamodule: Any = None) -> Any:  # noqa: ANN401
        """INT8 post-training quantization as anomalib's, with the Gaussian head's matrix products kept in float.

        The backbone's convolutions are where int8 pays. The matrix products (resize, whitening, blur) are a small
        share of the compute, and with a static input size NNCF's bias correction fails on them ("cannot reshape
        array of size 672 into shape (1,3,1,1)" at 224 px), so they are left out (``nncf.IgnoredScope``). The
        rest is anomalib's ``_post_training_quantization_ov``.
        """
        import nncf

        if datamodule is None:
            msg = "Datamodule must be provided for OpenVINO INT8_PTQ compression"
            raise ValueError(msg)
        datamodule.setup("fit")
        if model.input(0).partial_shape[0].is_static:
            datamodule.train_batch_size = model.input(0).shape[0]
        dataloader = datamodule.val_dataloader()
        if len(dataloader.dataset) < INT8_RECOMMENDED_IMAGES:
            logger.warning("INT8 quantization: >300 images recommended, found %d.", len(dataloader.dataset))
        head = nncf.IgnoredScope(types=["MatMul", "Einsum"], validate=False)
        return nncf.quantize(model, nncf.Dataset(dataloader, lambda batch: batch["image"]), ignored_scope=head)

    def _require_fitted(self) -> None:
        self.model.require_fitted("train it first or pass a fitted checkpoint (--ckpt_path)")
