"""Normal-only thresholds: conformal false-alarm control, normal-only training, export parity."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from anomalib.data import Folder
from anomalib.engine import Engine
from scipy.stats import binomtest

from anomalib_gaussft import GaussFT
from anomalib_gaussft.gaussft.calibration import conformal_p_values, conformal_threshold
from conftest import TINY_BACKBONE


@pytest.mark.parametrize("rate", [0.01, 0.05, 0.1])
def test_false_alarm_rate_matches_target(rate: float) -> None:
    """Over many calibration draws, fresh normal samples are flagged at rate ≈ target (marginal guarantee)."""
    generator = torch.Generator().manual_seed(0)
    n_cal, draws, per_draw = 199, 300, 200
    flagged = 0
    for _ in range(draws):
        calibration = torch.randn(n_cal, generator=generator, dtype=torch.float64)
        fresh = torch.randn(per_draw, generator=generator, dtype=torch.float64)
        threshold = conformal_threshold(calibration, rate)
        flagged += int((fresh > threshold).sum())
        assert torch.equal(fresh > threshold, conformal_p_values(fresh, calibration) <= rate)
    total = draws * per_draw
    # With n = 199 the conformal rate is exactly floor(rate * 200) / 200 = rate for these targets.
    interval = binomtest(flagged, total, rate).proportion_ci(confidence_level=0.999)
    assert interval.low <= rate <= interval.high, (flagged / total, rate)


def test_unachievable_rate_names_the_smallest_achievable_one() -> None:
    with pytest.raises(ValueError, match=r"smallest achievable rate is 1/\(n\+1\) = 0\.0909"):
        conformal_threshold(torch.randn(10), 0.05)


def _fit_normal_only(texture_root: Path, tmp_path: Path) -> tuple[GaussFT, Engine, Folder]:
    """Fit a calibrated GaussFT on a folder of good images only (Folder's defaults carve test/val from them)."""
    datamodule = Folder(
        name="normal_only",
        root=texture_root / "brick",
        normal_dir="train/good",
        train_batch_size=8,
        eval_batch_size=8,
        num_workers=0,
        seed=0,
    )
    model = GaussFT(
        backbone=TINY_BACKBONE,
        pre_trained=False,
        image_size=64,
        fine_tune_epochs=0,
        false_alarm_rate=0.25,
        held_out_fraction=0.3,
    )
    engine = Engine(default_root_dir=tmp_path, logger=False)
    engine.fit(model=model, datamodule=datamodule)
    return model, engine, datamodule


@pytest.mark.slow
def test_normal_only_training_gives_labels_and_masks(texture_root: Path, tmp_path: Path) -> None:
    model, engine, datamodule = _fit_normal_only(texture_root, tmp_path)
    n_train = len(datamodule.train_data)
    n_calibration = model.model.calibration_scores.numel()
    assert n_calibration == round(0.3 * n_train)
    # The held-out calibration images are not part of the fit (split conformal).
    assert model.model.image_gaussians["0"].num_samples.item() == n_train - n_calibration
    predictions = engine.predict(model=model, data_path=texture_root / "brick" / "test")
    labels = torch.cat([p.pred_label for p in predictions])
    masks = torch.cat([p.pred_mask for p in predictions])
    assert labels.dtype == torch.bool
    assert masks.shape[-2:] == (64, 64)
    assert 0 < int(labels.sum()) < len(labels)  # a working decision, not all or nothing

    with torch.no_grad():
        model.eval()
        images = torch.cat([p.image for p in predictions])  # already pre-processed by the PreProcessor callback
        raw = model.model(images).pred_score
        p_values = model.p_values(images)
    assert torch.equal(labels.cpu(), (p_values <= 0.25).cpu())
    assert torch.equal(labels.cpu(), (raw > model.post_processor._image_threshold).cpu())


@pytest.mark.slow
def test_openvino_export_keeps_the_calibrated_labels(texture_root: Path, tmp_path: Path) -> None:
    import openvino as ov
    from anomalib.deploy import ExportType

    model, engine, datamodule = _fit_normal_only(texture_root, tmp_path)
    xml = engine.export(model, ExportType.OPENVINO, export_root=tmp_path, onnx_kwargs={"opset_version": 18})
    images = torch.cat(
        [
            torch.stack([item.image for item in datamodule.test_data]),
            torch.rand(4, 3, 64, 64),  # off-distribution inputs: should be flagged
        ]
    )
    model.eval()
    with torch.no_grad():
        torch_labels = model(images).pred_label
    compiled = ov.Core().compile_model(str(xml), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    outputs = compiled(images.numpy())
    names = [output.get_any_name() for output in compiled.outputs]
    ov_labels = torch.as_tensor(outputs[compiled.outputs[names.index("pred_label")]]).reshape(-1).bool()
    assert torch.equal(ov_labels, torch_labels.reshape(-1).bool())
    assert torch_labels.any()
