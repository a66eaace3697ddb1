"""Heatmaps of frozen GaussFT beside a baseline's on real defects, one figure per set (docs/results.md).

Same jobs as ``local_evidence_baselines.py`` (lite0, 224 px, the seeded ≤ 200-image training subset, complete test
set), fitted in this process. The pictures are not chosen by how they look: per set, ``--anomalous`` defective test
images drawn with ``--seed`` and one normal test image drawn the same way. Each model's colours run from the median
to the maximum of its maps over *all* normal test images of the set (one scale per model and set): a pixel at full
red is above anything the model produced on a normal test image. Each panel gives the image's pixel AUROC under
that model (defective images) and its image score's rank among the test images.

    PYTHONPATH=src:benchmarks HF_HUB_CACHE=/work/shared/hf-cache/hub HF_HUB_OFFLINE=1 \
        python benchmarks/heatmap_gallery.py --datasets bsdata,magnetic_tile,kolektorsdd,deeppcb --out docs/images
"""

from __future__ import annotations

import argparse
import io
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812
from PIL import Image

import common
import compare
import compare_job
from local_evidence_baselines import DATASETS, count_train

LABELS = {"gaussft_frozen": "GaussFT (frozen default)", "padim": "PaDiM", "patchcore": "PatchCore", "dfm": "DFM"}


def fitted(spec: dict[str, Any], job: dict[str, Any], workdir: Path) -> tuple[Any, Any]:
    """The model of ``spec`` fitted on the job's training subset, and the job's datamodule."""
    from lightning import seed_everything
    from lightning.pytorch.trainer.states import TrainerFn

    seed_everything(0, workers=True)
    datamodule = compare_job.build_datamodule(job)
    datamodule.setup(TrainerFn.FITTING)
    compare_job.subsample(datamodule, job)
    model = common.build_model(spec["kind"], {"evaluator": False, "visualizer": False, **spec["kwargs"]})
    engine = compare_job.fitting_engine(workdir)
    engine.fit(model=model, datamodule=datamodule)
    return model, datamodule


def test_outputs(model: Any, datamodule: Any) -> dict[str, np.ndarray]:
    """Images (224 px), masks, maps, scores and labels of every test image, in loader order."""
    images, masks, maps, scores, labels, paths = [], [], [], [], [], []
    for batch, output in common.iter_raw_outputs(model, datamodule.test_dataloader()):
        amap = output.anomaly_map.float().reshape(len(batch.image), -1, *output.anomaly_map.shape[-2:])[:, :1]
        size = amap.shape[-2:]
        images.append(F.interpolate(batch.image.float(), size=size, mode="bilinear", antialias=True).clamp(0, 1))
        gt = batch.gt_mask if batch.gt_mask is not None else torch.zeros(len(batch.image), *size)
        masks.append(F.interpolate(gt.reshape(len(gt), 1, *gt.shape[-2:]).float(), size=size, mode="nearest") > 0.5)
        maps.append(amap)
        scores.append(output.pred_score.reshape(-1).float())
        labels.append(batch.gt_label.reshape(-1).int())
        paths += [str(p) for p in batch.image_path]
    return {
        "image": torch.cat(images).permute(0, 2, 3, 1).numpy(),
        "mask": torch.cat(masks)[:, 0].numpy(),
        "map": torch.cat(maps)[:, 0].numpy(),
        "score": torch.cat(scores).numpy(),
        "label": torch.cat(labels).numpy(),
        "path": np.array(paths),
    }


def picks(labels: np.ndarray, anomalous: int, seed: int) -> list[int]:
    """``anomalous`` defective test images and one normal one, drawn with ``seed``."""
    rng = np.random.default_rng(seed)
    bad = rng.permutation(np.flatnonzero(labels == 1))[:anomalous]
    good = rng.permutation(np.flatnonzero(labels == 0))[:1]
    return [*sorted(bad.tolist()), *good.tolist()]


def pixel_auroc(amap: np.ndarray, mask: np.ndarray) -> float | None:
    if mask.all() or not mask.any():
        return None
    return common.auroc(mask.reshape(-1).astype(np.int8), amap.reshape(-1))


def draw(name: str, outputs: dict[str, dict[str, Any]], chosen: list[int], out: Path) -> Path:
    """One figure: the images with their masks, then one row per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(outputs)
    first = outputs[models[0]]
    fig, axes = plt.subplots(
        len(models) + 1, len(chosen), figsize=(2.4 * len(chosen), 2.5 * (len(models) + 1)), squeeze=False
    )
    for col, index in enumerate(chosen):
        ax = axes[0, col]
        ax.imshow(first["image"][index])
        if first["mask"][index].any():
            ax.contour(first["mask"][index], levels=[0.5], colors="yellow", linewidths=0.8)
        kind = "defective" if first["label"][index] else "normal"
        ax.set_title(f"{kind}\n{Path(first['path'][index]).name}", fontsize=7)
    for row, model in enumerate(models, start=1):
        result = outputs[model]
        normal_maps = result["map"][result["label"] == 0]
        low, high = float(np.median(normal_maps)), float(normal_maps.max())
        ranks = result["score"].argsort().argsort()  # 0: the lowest score
        for col, index in enumerate(chosen):
            ax = axes[row, col]
            ax.imshow(result["image"][index].mean(-1), cmap="gray")
            heat = np.clip((result["map"][index] - low) / (high - low), 0, 1)
            ax.imshow(heat, cmap="jet", alpha=0.45 * (heat > 0) + 0.1, vmin=0, vmax=1)
            if result["mask"][index].any():
                ax.contour(result["mask"][index], levels=[0.5], colors="white", linewidths=0.6)
            auc = pixel_auroc(result["map"][index], result["mask"][index])
            top = len(ranks) - ranks[index]
            ax.set_xlabel(
                (f"pixel AUROC {auc:.3f}, " if auc is not None else "") + f"score rank {top}/{len(ranks)}", fontsize=7
            )
        label = LABELS.get(model, model)
        if model == "patchcore":
            label += f" ({100 * result['coreset_ratio']:g} % coreset)"
        axes[row, 0].set_ylabel(label, fontsize=8)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    scale = "colour: median → max of the normal test maps; rank 1 = highest score"
    fig.suptitle(f"{name}: random test images ({scale})", fontsize=9)
    fig.tight_layout()
    path = out / f"heatmaps_{name}.png"
    buffer = io.BytesIO()
    fig.savefig(buffer, dpi=110)
    plt.close(fig)
    # a 256-colour palette: a third of the RGB file's size for the docs, the colours barely change
    Image.open(buffer).convert("RGB").quantize(256, method=Image.Quantize.MEDIANCUT).save(path, optimize=True)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", default="bsdata,magnetic_tile,kolektorsdd,deeppcb")
    parser.add_argument("--models", default="gaussft_frozen,padim", help="compare.py model names")
    parser.add_argument("--coreset-ratio", type=float, default=0.02, help="PatchCore's, where it is in --models")
    parser.add_argument("--anomalous", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train-images", type=int, default=200)
    parser.add_argument("--out", type=Path, default=Path("docs/images"))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    specs = compare.model_specs(
        compare.parse_args(["--models", args.models, "--coreset-ratio", str(args.coreset_ratio)])
    )
    args.out.mkdir(parents=True, exist_ok=True)
    settings = {"backbone": common.BACKBONE, "image_size": common.IMAGE_SIZE, "batch_size": 16}
    for name in args.datasets.split(","):
        dataset = {"name": name, **DATASETS[name]}
        job = {"dataset": dataset, "n_train": min(args.train_images, count_train(dataset)), "settings": settings}
        outputs = {}
        for spec in specs:
            with tempfile.TemporaryDirectory() as workdir:
                model, datamodule = fitted(spec, job, Path(workdir))
                outputs[spec["name"]] = test_outputs(model, datamodule)
                outputs[spec["name"]]["coreset_ratio"] = spec["kwargs"].get("coreset_sampling_ratio")
            print(f"{name}: {spec['name']} scored {len(outputs[spec['name']]['label'])} test images", flush=True)
        chosen = picks(outputs[specs[0]["name"]]["label"], args.anomalous, args.seed)
        print(f"{name}: wrote {draw(name, outputs, chosen, args.out)}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
