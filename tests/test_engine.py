"""GaussFT through anomalib's Engine on a tiny generated MVTec-layout dataset."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from anomalib.data import MVTecAD
from anomalib.engine import Engine

from anomalib_gaussft import GaussFT
from conftest import TINY_BACKBONE


def _datamodule(root: Path) -> MVTecAD:
    return MVTecAD(root=root, category="brick", train_batch_size=8, eval_batch_size=8, num_workers=0)


@pytest.mark.slow
def test_engine_fit_test_predict(texture_root: Path, tmp_path: Path) -> None:
    model = GaussFT(backbone=TINY_BACKBONE, pre_trained=False, image_size=64, pixel_aupro=True)
    engine = Engine(default_root_dir=tmp_path, logger=False, accelerator="cpu", devices=1)
    engine.fit(model=model, datamodule=_datamodule(texture_root))
    assert bool(model.model.is_fitted)
    assert model.model.image_gaussians["0"].num_samples.item() == 16  # every training image, once

    results = engine.test(model=model, datamodule=_datamodule(texture_root))
    assert {"image_AUROC", "pixel_AUROC", "pixel_AUPRO"} <= set(results[0])
    assert 0.0 <= results[0]["image_AUROC"] <= 1.0

    predictions = engine.predict(model=model, datamodule=_datamodule(texture_root))
    batch = predictions[0]
    assert batch.anomaly_map.shape[-2:] == (64, 64)
    assert batch.pred_label is not None
    assert batch.pred_mask is not None
    assert list((tmp_path).rglob("images/**/*.png")), "the visualizer saved no heatmap images"

    ckpt = engine.trainer.checkpoint_callback.best_model_path or str(tmp_path / "gaussft.ckpt")
    if not Path(ckpt).exists():
        engine.trainer.save_checkpoint(ckpt)
    restored = GaussFT.load_from_checkpoint(ckpt, weights_only=True)
    images = torch.rand(2, 3, 64, 64)
    restored.eval()
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(restored.model(images).pred_score, model.model(images).pred_score, rtol=0, atol=0)
