"""Clear errors instead of silent misuse: unfitted models, and checkpoints of another configuration."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from .hyperparameters import ARCHITECTURE_KEYS, same_value
from .input_checks import check_dataloaders

if TYPE_CHECKING:
    from .torch_model import GaussFTModel


class FittedModelGuards:
    """Mixin of :class:`GaussFT`: refuse to test, predict or export before fitting; refuse foreign checkpoints."""

    model: GaussFTModel

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse checkpoints of another architecture, naming every setting that differs."""
        saved = checkpoint.get("hyper_parameters", {})
        different = {
            key: (saved[key], self.hparams.get(key))
            for key in ARCHITECTURE_KEYS
            if key in saved and not same_value(saved[key], self.hparams.get(key))
        }
        if different:
            details = ", ".join(f"{k}: checkpoint {v[0]!r} vs model {v[1]!r}" for k, v in different.items())
            msg = f"This GaussFT checkpoint was made with another configuration ({details}). Build the model with "
            msg += "the checkpoint's settings, or use GaussFT.load_from_checkpoint(path)."
            raise ValueError(msg)
        super().on_load_checkpoint(checkpoint)

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
        self.model.require_fitted("train it first or pass a fitted checkpoint (--ckpt_path)")
