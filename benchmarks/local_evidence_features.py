"""Cache frozen tf_efficientnet_lite0 features of the issue-#14 sets (one backbone pass per image).

For every set of ``local_evidence_baselines.DATASETS`` this writes ``CACHE/<set>.pt`` with, for the training
subset the baselines use (compare.py's seeded draw of at most 200 images) and for the complete test set:

* ``pooled[level]``: ``(N, C)`` float32 global-average-pooled features of all 9 levels (computed in float32
  from the full maps, exactly what GaussFT's image Gaussians see);
* ``maps[level]``: ``(N, C, h, w)`` float32 feature maps of levels 2..8;
* ``paths``, test ``labels`` and (sets with masks) ``masks``: ``(N, 224, 224)`` bool, the dataset's
  ground truth resized with nearest neighbour to 224 px, as compare.py scores pixels.

Images go through GaussFT's own pre-processing: anomalib's loader, ``Resize((224, 224), antialias=True)``,
``Normalize`` with the backbone's mean/std, then ``anomalib_gaussft``'s ``MultiLevelFeatureExtractor``.

Command::

    PYTHONPATH=src HF_HUB_CACHE=/work/shared/hf-cache/hub HF_HUB_OFFLINE=1 nice -n 10 \
        python benchmarks/local_evidence_features.py --cache /work/data/cache/local_evidence
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common
import compare_job
from local_evidence_baselines import DATASETS, count_train

MAP_LEVELS = (2, 3, 4, 5, 6, 7, 8)


def datamodule_and_train(name: str, train_images: int):
    """The datamodule and training subset exactly as compare.py's child builds them."""
    from lightning.pytorch.trainer.states import TrainerFn

    dataset = {"name": name, **DATASETS[name]}
    job = {"dataset": dataset, "settings": {"batch_size": 16}}
    datamodule = compare_job.build_datamodule(job)
    datamodule.setup(TrainerFn.FITTING)
    available = len(datamodule.train_data)
    n_train = min(train_images, count_train(dataset), available)
    order = np.random.default_rng(0).permutation(available)[:n_train]
    datamodule.train_data = datamodule.train_data.subsample(sorted(order.tolist()))
    return datamodule, dataset


@torch.no_grad()
def extract(dataset, extractor, transform, masks: bool, batch_size: int = 16) -> dict:
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=False, num_workers=0, collate_fn=dataset.collate_fn
    )
    pooled: dict[int, list] = {lvl: [] for lvl in range(9)}
    maps: dict[int, list] = {lvl: [] for lvl in MAP_LEVELS}
    paths, labels, gts = [], [], []
    for batch in loader:
        images = transform(batch.image)
        feats = extractor(images, list(range(9)))
        for lvl in range(9):
            pooled[lvl].append(feats[lvl].mean(dim=(2, 3)).float())
        for lvl in MAP_LEVELS:
            maps[lvl].append(feats[lvl].float().clone())
        paths += [str(p) for p in batch.image_path]
        labels.append(batch.gt_label.reshape(-1).int())
        if masks:
            gt = batch.gt_mask
            if gt is None:
                gt = torch.zeros(len(images), 224, 224)
            gt = gt.reshape(gt.shape[0], 1, *gt.shape[-2:]).float()
            if gt.shape[-2:] != (224, 224):
                gt = F.interpolate(gt, size=(224, 224), mode="nearest")
            gts.append(gt[:, 0] > 0.5)
    out = {
        "pooled": {lvl: torch.cat(v) for lvl, v in pooled.items()},
        "maps": {lvl: torch.cat(v) for lvl, v in maps.items()},
        "paths": paths,
        "labels": torch.cat(labels),
    }
    if masks:
        out["masks"] = torch.cat(gts)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", default=",".join(DATASETS))
    parser.add_argument("--train-images", type=int, default=200)
    parser.add_argument("--cache", default="/work/data/cache/local_evidence")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    from torchvision.transforms.v2 import Compose, Normalize, Resize

    from anomalib_gaussft.gaussft.feature_extractor import MultiLevelFeatureExtractor
    from anomalib_gaussft.gaussft.hyperparameters import backbone_input_config

    _, mean, std = backbone_input_config(common.BACKBONE)
    transform = Compose([Resize((224, 224), antialias=True), Normalize(mean=mean, std=std)])
    extractor = MultiLevelFeatureExtractor(common.BACKBONE, pre_trained=True).eval()
    extractor.ensure_weights()  # pretrained weights load lazily
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    for name in [d for d in args.datasets.split(",") if d]:
        target = cache / f"{name}.pt"
        if target.is_file():
            print(f"{name}: cached", flush=True)
            continue
        start = time.perf_counter()
        datamodule, dataset = datamodule_and_train(name, args.train_images)
        record = {
            "dataset": name,
            "train": extract(datamodule.train_data, extractor, transform, masks=False),
            "test": extract(datamodule.test_data, extractor, transform, masks=dataset["masks"]),
        }
        torch.save(record, str(target) + ".partial")
        Path(str(target) + ".partial").rename(target)
        n_train, n_test = len(record["train"]["paths"]), len(record["test"]["paths"])
        print(f"{name}: {n_train} train, {n_test} test images in {time.perf_counter() - start:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
