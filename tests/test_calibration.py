"""Normal-only thresholds: conformal false-alarm control, normal-only training, export parity."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from anomalib.data import Folder
from anomalib.engine import Engine
from scipy.stats import binomtest

from anomalib_gaussft import GaussFT
from anomalib_gaussft.gaussft.calibration import (
    LEVEL_COMBINATIONS,
    calibrated_combination,
    combine_p_values,
    conformal_p_values,
    conformal_threshold,
    level_p_values,
)
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


def test_level_combinations_match_references() -> None:
    import numpy as np
    from scipy.stats import combine_pvalues

    p = torch.rand(40, 9, generator=torch.Generator().manual_seed(0), dtype=torch.float64).clamp_min(1e-6)
    fisher = [combine_pvalues(row, method="fisher").pvalue for row in p.numpy()]
    torch.testing.assert_close(combine_p_values(p, "fisher"), torch.tensor(fisher, dtype=torch.float64))
    ordered = np.sort(p.numpy(), 1)
    simes = np.minimum(1, (9 * ordered / np.arange(1, 10)).min(1))
    torch.testing.assert_close(combine_p_values(p, "simes"), torch.from_numpy(simes))
    cauchy = 0.5 - np.arctan(np.tan((0.5 - p.numpy()) * np.pi).mean(1)) / np.pi
    torch.testing.assert_close(combine_p_values(p, "cauchy"), torch.from_numpy(cauchy))
    torch.testing.assert_close(combine_p_values(p, "bonferroni"), (9 * p.min(1).values).clamp(max=1))
    with pytest.raises(ValueError, match="tippett"):
        combine_p_values(p, "tippett")


@pytest.mark.parametrize("method", LEVEL_COMBINATIONS)
def test_combined_level_p_values_control_false_alarms(method: str) -> None:
    """Correlated levels, one fresh normal per calibration draw (independent trials): P(p ≤ α) ≤ α."""
    generator = torch.Generator().manual_seed(1)
    correlation = torch.full((4, 4), 0.6, dtype=torch.float64) + 0.4 * torch.eye(4, dtype=torch.float64)
    mix = torch.linalg.cholesky(correlation)
    draws = 3000
    p = torch.cat(
        [
            calibrated_combination(
                torch.randn(1, 4, generator=generator, dtype=torch.float64) @ mix.T,
                torch.randn(99, 4, generator=generator, dtype=torch.float64) @ mix.T,
                method,
            )
            for _ in range(draws)
        ]
    )
    for rate in (0.01, 0.05, 0.1):
        flagged = int((p <= rate + 1e-12).sum())
        interval = binomtest(flagged, draws, rate).proportion_ci(confidence_level=0.999)
        assert interval.low <= rate, (method, rate, flagged / draws)  # never anti-conservative
        if method in ("fisher", "cauchy"):  # continuous statistics: exact, not merely conservative
            assert interval.high >= rate, (method, rate, flagged / draws)


def test_unachievable_rate_names_the_smallest_achievable_one() -> None:
    with pytest.raises(ValueError, match=r"smallest achievable rate is 1/\(n\+1\) = 0\.0909"):
        conformal_threshold(torch.randn(10), 0.05)


@pytest.mark.slow
def test_unachievable_rate_is_refused_before_the_first_epoch(texture_root: Path, tmp_path: Path) -> None:
    """16 training images hold out 3: a 1% rate cannot be certified; fine-tuning must not run first."""
    model = GaussFT(backbone=TINY_BACKBONE, pre_trained=False, image_size=64, fine_tune_epochs=5, false_alarm_rate=0.01)
    datamodule = Folder(
        name="rate", root=texture_root / "brick", normal_dir="train/good", num_workers=0, train_batch_size=8, seed=0
    )
    engine = Engine(default_root_dir=tmp_path, logger=False, enable_progress_bar=False)
    with pytest.raises(ValueError, match=r"false_alarm_rate=0\.01 .* held-out calibration images.*allowed"):
        engine.fit(model=model, datamodule=datamodule)
    assert engine.trainer.current_epoch == 0
    assert model.forgetting.history == []  # not even the pretrained network was evaluated


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
    n_calibration = model.calibrator.scores.numel()
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
        per_level = model.p_values(images, combination="levels")
        fisher = model.p_values(images, combination="fisher")
        distances = model.model.level_distances(model.model.extract(images)).double()
    assert torch.equal(labels.cpu(), (p_values <= 0.25).cpu())
    calibration = model.calibrator.level_scores.double()
    assert calibration.shape == (n_calibration, len(model.model.levels))
    torch.testing.assert_close(per_level, level_p_values(distances, calibration))
    torch.testing.assert_close(fisher, calibrated_combination(distances, calibration, "fisher"))
    with pytest.raises(ValueError, match="combination"):
        model.p_values(images, combination="stouffer")
    assert torch.equal(labels.cpu(), (raw > model.post_processor.image_threshold).cpu())


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
