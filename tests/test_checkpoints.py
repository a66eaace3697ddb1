"""Every training run, frozen or fine-tuned, writes anomalib's checkpoint, and the checkpoint alone restores it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from anomalib.data import MVTecAD
from anomalib.engine import Engine

from anomalib_gaussft import GaussFT
from conftest import TINY_BACKBONE


@pytest.mark.slow
@pytest.mark.parametrize("epochs", [0, 2], ids=["frozen", "fine-tuned"])
def test_every_training_run_writes_a_checkpoint_that_restores_it(
    texture_root: Path, tmp_path: Path, epochs: int
) -> None:
    model = GaussFT(backbone=TINY_BACKBONE, pre_trained=False, image_size=64, fine_tune_epochs=epochs, patience=5)
    datamodule = MVTecAD(root=texture_root, category="brick", train_batch_size=4, eval_batch_size=8, num_workers=0)
    engine = Engine(default_root_dir=tmp_path, logger=False, enable_progress_bar=False)
    engine.fit(model=model, datamodule=datamodule)
    checkpoints = sorted(tmp_path.rglob("weights/lightning/model.ckpt"))
    assert len(checkpoints) == 1, "anomalib's ModelCheckpoint wrote no checkpoint"

    restored = GaussFT.load_from_checkpoint(checkpoints[0], weights_only=True)
    assert bool(restored.model.is_fitted)
    images = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, actual = model.eval()(images), restored.eval()(images)  # pre-processing, model, post-processing
    torch.testing.assert_close(actual.pred_score, expected.pred_score, rtol=0, atol=0)
    torch.testing.assert_close(actual.anomaly_map, expected.anomaly_map, rtol=0, atol=0)
    torch.testing.assert_close(actual.pred_label, expected.pred_label)
