"""Check that the recommended issue-#14 scoring head exports: torch → ONNX (dynamo) → OpenVINO, same numbers.

Builds a stand-alone prototype of the recommended design (``LocalEvidenceHead``: the package's
``MultiLevelFeatureExtractor``; 9 pooled Gaussians; one "layout" Gaussian of level 5 adaptive-avg-pooled to
3 x 3 and flattened; regional map Gaussians (7 x 7 regions) on levels 3-5; map = mean of the upsampled
per-level ``sqrt(d²/C)`` maps, blurred; image score = z(pooled sum) + z(layout distance) + z(mean of the
map's top 1 %), z from held-out normals), fits it from the cached features of one set
(80 % fit / 20 % held out, as the study), exports it with ``torch.onnx.export(..., dynamo=True)`` at 224 px with a
dynamic batch, converts the ONNX file with OpenVINO and compares scores and maps on real test images. Also
times the torch forward (batch 1 and 16) against the shipped default head on the same backbone.

    PYTHONPATH=src HF_HUB_CACHE=/work/shared/hf-cache/hub HF_HUB_OFFLINE=1 \
        python benchmarks/local_evidence_export_check.py --set brick --out docs/local_evidence/export_check.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import local_evidence_study as les
from anomalib_gaussft.gaussft.feature_extractor import MultiLevelFeatureExtractor
from anomalib_gaussft.gaussft.gaussian import StreamingGaussian


class LocalEvidenceHead(nn.Module):
    """Prototype of the recommended GaussFT inference graph (plain tensor ops, static shapes)."""

    def __init__(
        self,
        extractor: MultiLevelFeatureExtractor,
        map_levels=(3, 4, 5),
        k: int = 1,
        regions: int = 7,
        sigma: float = 4.0,
        top_fraction: float = 0.01,
        image_size=(224, 224),
        layout_level: int = 5,
        layout_grid: int = 3,
    ) -> None:
        super().__init__()
        self.extractor = extractor
        self.map_levels = list(map_levels)
        self.k = k
        self.regions = regions
        self.image_size = tuple(image_size)
        self.top_k = max(1, round(top_fraction * image_size[0] * image_size[1]))
        shapes = extractor.level_shapes(self.image_size)
        self.pooled = nn.ModuleList([StreamingGaussian(1, shapes[lvl][0]) for lvl in range(9)])
        self.maps = nn.ModuleList([StreamingGaussian(regions * regions, shapes[lvl][0]) for lvl in self.map_levels])
        self.layout_level, self.layout_grid = layout_level, layout_grid
        self.layout = StreamingGaussian(1, shapes[layout_level][0] * layout_grid * layout_grid)
        self.map_shapes = {lvl: shapes[lvl][1:] for lvl in self.map_levels}
        self.register_buffer("blur_h", les.blur_matrix(sigma, image_size[0]).T.contiguous())
        self.register_buffer("blur_w", les.blur_matrix(sigma, image_size[1]).contiguous())
        # z-score constants of the two image-score components, from held-out normals
        self.register_buffer("score_mean", torch.zeros(3))
        self.register_buffer("score_std", torch.ones(3))

    def _local(self, x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(x, self.k, stride=1, padding=self.k // 2, count_include_pad=False) if self.k > 1 else x

    def _blocks(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        r = self.regions
        x = x.reshape(n, c, r, h // r, r, w // r).permute(0, 3, 5, 2, 4, 1)
        return x.reshape(n * (h // r) * (w // r), r * r, c)

    def _unblocks(self, v: torch.Tensor, n: int, h: int, w: int) -> torch.Tensor:
        r = self.regions
        return v.reshape(n, h // r, w // r, r, r).permute(0, 3, 1, 4, 2).reshape(n, 1, h, w)

    def layout_vector(self, x: torch.Tensor) -> torch.Tensor:
        return F.adaptive_avg_pool2d(x, self.layout_grid).flatten(1)[:, None]

    def components(self, images: torch.Tensor):
        feats = self.extractor(images, list(range(9)))
        layout = torch.sqrt(self.layout.squared_mahalanobis(self.layout_vector(feats[self.layout_level])).clamp_min(0))
        layout = layout[:, 0]
        pooled = torch.stack(
            [
                torch.sqrt(g.squared_mahalanobis(feats[i].mean((2, 3))[:, None]).clamp_min(0))[:, 0]
                for i, g in enumerate(self.pooled)
            ],
            1,
        ).sum(1)
        maps = []
        for lvl, g in zip(self.map_levels, self.maps, strict=True):
            x = self._local(feats[lvl])
            n, c, h, w = x.shape
            d = torch.sqrt(g.squared_mahalanobis(self._blocks(x)).clamp_min(0) / c)
            maps.append(
                F.interpolate(self._unblocks(d, n, h, w), size=self.image_size, mode="bilinear", align_corners=False)
            )
        amap = self.blur_h @ torch.stack(maps, 0).mean(0) @ self.blur_w  # (N, 1, H, W)
        local = amap.flatten(1).topk(self.top_k, dim=1).values.mean(1)
        return pooled, layout, local, amap

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pooled, layout, local, amap = self.components(images)
        z = (torch.stack([pooled, layout, local], 1) - self.score_mean) / self.score_std
        return z.sum(1), amap


def fit_from_cache(head: LocalEvidenceHead, data: les.SetData, seed: int = 0) -> None:
    fit_idx, _ = les.held_out_split(len(data.train), 0.2, seed)
    fit = data.train.take(fit_idx)
    for lvl, g in enumerate(head.pooled):
        g.update(fit.pooled[lvl][:, None])
        g.fit()
    for lvl, g in zip(head.map_levels, head.maps, strict=True):
        for sl in les.chunks(len(fit)):
            g.update(head._blocks(head._local(fit.maps[lvl][sl])))
        g.fit()
    head.layout.update(head.layout_vector(fit.maps[head.layout_level]))
    head.layout.fit()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--set", default="brick")
    parser.add_argument("--cache", default="/work/data/cache/local_evidence")
    parser.add_argument("--out", default="docs/local_evidence/export_check.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    from torchvision.transforms.v2 import Compose, Normalize, Resize

    from anomalib_gaussft.gaussft.hyperparameters import backbone_input_config
    from local_evidence_features import datamodule_and_train

    extractor = MultiLevelFeatureExtractor("tf_efficientnet_lite0", pre_trained=True).eval()
    extractor.ensure_weights()  # pretrained weights load lazily
    head = LocalEvidenceHead(extractor).eval()
    data = les.load_set(Path(args.cache), args.set)
    fit_from_cache(head, data)

    _, mean, std = backbone_input_config("tf_efficientnet_lite0")
    transform = Compose([Resize((224, 224), antialias=True), Normalize(mean=mean, std=std)])
    datamodule, _ = datamodule_and_train(args.set, 200)
    _, held_idx = les.held_out_split(len(datamodule.train_data), 0.2, 0)
    held = torch.stack([transform(datamodule.train_data[int(i)].image) for i in held_idx])
    with torch.no_grad():
        pooled, layout, local, _ = head.components(held)
    comps = torch.stack([pooled, layout, local], 1)
    head.score_mean.copy_(comps.mean(0))
    head.score_std.copy_(comps.std(0))
    test = torch.stack([transform(datamodule.test_data[i].image) for i in range(0, len(datamodule.test_data), 10)])

    with torch.no_grad():
        ref_score, ref_map = head(test)
    result: dict = {"set": args.set, "n_images": len(test), "torch_version": torch.__version__}
    with tempfile.TemporaryDirectory() as tmp:
        onnx_path = Path(tmp) / "head.onnx"
        start = time.perf_counter()
        batch = torch.export.Dim("batch", min=1, max=64)
        torch.onnx.export(
            head,
            (test[:2],),
            str(onnx_path),
            dynamo=True,
            opset_version=18,
            dynamic_shapes={"images": {0: batch}},
            input_names=["images"],
            output_names=["pred_score", "anomaly_map"],
        )
        result["onnx_export_s"] = time.perf_counter() - start
        result["onnx_mb"] = sum(p.stat().st_size for p in Path(tmp).iterdir()) / 2**20
        import openvino as ov

        core = ov.Core()
        model = ov.convert_model(str(onnx_path))
        result["openvino_cpu_default_precision"] = str(core.get_property("CPU", "INFERENCE_PRECISION_HINT"))
        for label, config in (("ov_default", {}), ("ov_f32", {"INFERENCE_PRECISION_HINT": "f32"})):
            out = core.compile_model(model, "CPU", config)(test.numpy())
            ov_score, ov_map = np.asarray(out[0]), np.asarray(out[1])
            result[f"{label}_max_abs_score_diff"] = float(np.abs(ov_score - ref_score.numpy()).max())
            result[f"{label}_max_abs_map_diff"] = float(np.abs(ov_map - ref_map.numpy()).max())
            result[f"{label}_score_rank_corr"] = float(
                np.corrcoef(np.argsort(np.argsort(ov_score)), np.argsort(np.argsort(ref_score.numpy())))[0, 1]
            )
    result["score_range"] = [float(ref_score.min()), float(ref_score.max())]
    result["map_range"] = [float(ref_map.min()), float(ref_map.max())]
    result["statistics_mb"] = (
        sum(
            t.numel() * t.element_size()
            for k, t in head.state_dict().items()
            if not k.startswith("extractor.") and "blur" not in k
        )
        / 2**20
    )

    # timing against the shipped default head (shared Gaussians, pooled score) on the same backbone
    from anomalib_gaussft.gaussft.torch_model import GaussFTModel

    default = GaussFTModel("tf_efficientnet_lite0", pre_trained=True, image_size=(224, 224)).eval()
    default.feature_extractor = extractor
    default.set_fitted(True)
    for batch_size in (1, 16):
        x = test[:batch_size] if len(test) >= batch_size else test.repeat(batch_size, 1, 1, 1)[:batch_size]
        for name, model in (("default", default), ("recommended", head)):
            with torch.inference_mode():
                for _ in range(2):
                    model(x)
                count, start = 0, time.perf_counter()
                while count < 3 or time.perf_counter() - start < 3.0:
                    model(x)
                    count += 1
            result[f"torch_img_per_s_b{batch_size}_{name}"] = count * batch_size / (time.perf_counter() - start)
    print(json.dumps(result, indent=1))
    Path(args.out).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
