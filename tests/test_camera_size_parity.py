"""Exported models score full-size camera images like the torch model: the exported graph resizes with the same
antialiasing (``AntialiasedResize``) as the torch pre-processor, instead of anomalib's non-antialiased export."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from anomalib.data import MVTecAD
from anomalib.deploy import ExportType
from anomalib.engine import Engine

from anomalib_gaussft import GaussFT
from anomalib_gaussft.gaussft.pre_processor import AntialiasedResize
from conftest import TINY_BACKBONE


@pytest.mark.parametrize("shape", [(2, 3, 900, 900), (1, 3, 900, 640), (1, 3, 40, 50), (1, 3, 64, 64)])
def test_antialiased_resize_matches_torch(shape: tuple[int, ...]) -> None:
    images = torch.rand(*shape, generator=torch.Generator().manual_seed(0))
    expected = F.interpolate(images, size=(64, 80), mode="bilinear", antialias=True, align_corners=False)
    torch.testing.assert_close(AntialiasedResize((64, 80))(images), expected, rtol=0, atol=2e-6)


@pytest.mark.slow
def test_openvino_and_onnx_match_torch_on_camera_size_images(texture_root: Path, tmp_path: Path) -> None:
    import openvino as ov

    model = GaussFT(backbone=TINY_BACKBONE, pre_trained=False, image_size=64, fine_tune_epochs=0)
    engine = Engine(default_root_dir=tmp_path, logger=False, enable_progress_bar=False)
    datamodule = MVTecAD(root=texture_root, category="brick", train_batch_size=8, eval_batch_size=8, num_workers=0)
    engine.fit(model=model, datamodule=datamodule)
    xml = engine.export(model, ExportType.OPENVINO, export_root=tmp_path / "ov")
    onnx_file = engine.export(model, ExportType.ONNX, export_root=tmp_path / "onnx")
    # Real test images blown up to camera sizes (square and not), with sensor-like noise.
    test_images = torch.stack([item.image for item in datamodule.test_data][:3])
    model.eval()
    for size in ((900, 900), (900, 640)):
        raw = F.interpolate(test_images, size=size, mode="bilinear", align_corners=False)
        raw = (raw + 0.02 * torch.randn(raw.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
        with torch.no_grad():
            expected = model(raw)  # the torch model: pre-processor (antialiased resize), model, post-processor
            # The Lightning loops' torchvision transform and the exportable one agree.
            torch.testing.assert_close(
                model.pre_processor.export_transform(raw), model.pre_processor.transform(raw), rtol=0, atol=1e-5
            )
        for path in (xml, onnx_file):
            compiled = ov.Core().compile_model(str(path), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
            outputs = {port.any_name: value for port, value in compiled(raw.numpy()).items()}
            score_error = np.abs(outputs["pred_score"].reshape(-1) - expected.pred_score.numpy().reshape(-1)).max()
            map_error = np.abs(outputs["anomaly_map"].reshape(-1) - expected.anomaly_map.numpy().reshape(-1)).max()
            print(f"{path.suffix} {size}: max |score diff| {score_error:.2e}, max |map diff| {map_error:.2e}")
            assert score_error < 1e-3, (path.suffix, size, score_error)
            assert map_error < 1e-2, (path.suffix, size, map_error)
