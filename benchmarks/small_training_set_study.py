"""Fewer map regions for small training sets? (issue #14: the defaults at 50 training images)

End to end at 50 training images (``docs/results/n50``) the default heatmap falls behind PatchCore's on Magnetic Tile
and KolektorSDD. Each of the 12 × 12 regional map Gaussians then sees 40 fit images × one or two positions for
40-112 dimensions and rests almost wholly on Ledoit-Wolf shrinkage; coarser regions give each Gaussian more samples
at the price of less position-specific statistics. This measures the default pipeline (3 × 3-averaged map of
levels 3-5 maxed with the level-3 detail map, plus the layout map's excess; image score ``z(L) + z(M')``) with
``map_regions`` 12 (default), 7 and 4 for both map Gaussians, on random subsets of the cached training images.

Protocol of the layout studies within each subset (20 % held out fix the tails and z-scores with Gaussians
fitted on the other 80 %; test images scored after the refit on the whole subset); ``seed`` draws the subset
(``np.random.default_rng(seed).permutation``) and the held-out split.

    PYTHONPATH=src:benchmarks python benchmarks/small_training_set_study.py --train-images 50 --tag n50 \
        --out docs/local_evidence/small_training_sets
    PYTHONPATH=src:benchmarks python benchmarks/small_training_set_study.py --train-images 100 --tag n100 \
        --out docs/local_evidence/small_training_sets
    python benchmarks/small_training_set_study.py --table docs/local_evidence/small_training_sets
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import numpy as np
import torch

from layout_map_study import held_out_protocol
from layout_scale_study import mean_std_table, run_study, seed_runs
from local_evidence_study import MapConfig, auroc, topk_mean, zscore
from multiscale_map_study import maps_of, pixel_tail

REGIONS = (12, 7, 4)
TRAIN_IMAGES = 50


def record_of(data, seed: int, frac: float) -> dict:
    """Pixel and image AUROC of the default pipeline with every region grid, on a subset of the training images."""
    subset = np.random.default_rng(seed).permutation(len(data.train))[: min(TRAIN_IMAGES, len(data.train))]
    data = dataclasses.replace(data, train=data.train.take(np.sort(subset)))
    fit_idx, held, layout = held_out_protocol(data, seed, frac)
    excess_held, excess_test = layout["excess"]
    layout_h, layout_t = layout["distance"]
    labels = np.asarray(data.labels)
    results = {}
    for regions in REGIONS:
        averaged = MapConfig(gaussian=f"region{regions}", k=3)
        avg_h, avg_t = maps_of(data, averaged, fit_idx, held)
        m_held = topk_mean(pixel_tail(avg_h, avg_h, 0.99) + excess_held, 0.01)
        m_test = topk_mean(pixel_tail(avg_h, avg_t, 0.99) + excess_test, 0.01)
        score = zscore(layout_t, layout_h) + zscore(m_test, m_held)
        results[f"regions {regions}: image"] = auroc(labels, score.numpy())
        if data.masks is None:
            continue
        detail = MapConfig(levels=(3,), gaussian=f"region{regions}")
        det_h, det_t = maps_of(data, detail, fit_idx, held, 2.0)
        heatmap = torch.maximum(pixel_tail(avg_h, avg_t, 0.99), pixel_tail(det_h, det_t, 0.99)) + excess_test
        results[f"regions {regions}: pixel"] = auroc(data.masks.numpy(), heatmap.numpy())
    return {"results": results, "train_images": len(data.train)}


def write_table(folder: Path) -> str:
    """Markdown: image and pixel AUROC, mean ± std over subsets, one row per tag × region grid."""
    runs = seed_runs(folder, lambda record, rule: f"{record['tag']} {rule}", lambda record: record["dataset"])
    tables = [
        mean_std_table(f"{m} AUROC", runs, [r for r in runs if r.endswith(m)], lambda r, m=m: r.removesuffix(": " + m))
        for m in ("image", "pixel")
    ]
    return "\n\n".join(tables) + "\n"


def main(argv: list[str] | None = None) -> int:
    global TRAIN_IMAGES  # record_of's signature is run_study's: the subset size travels as a module setting
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--train-images", type=int, default=TRAIN_IMAGES)
    known, rest = parser.parse_known_args(argv)
    TRAIN_IMAGES = known.train_images
    return run_study(rest, __doc__, "docs/local_evidence/small_training_sets", record_of, write_table)


if __name__ == "__main__":
    raise SystemExit(main())
