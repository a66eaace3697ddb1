"""How much do the held-out constants move the heatmap, and which estimate of them is stable? (issue #14)

The default heatmap is ``max(s_avg, s_det) + relu(s_layout − 1)``: each map on the scale of its held-out normals
(``(m − median) / (q99 − median)``; the layout map ``(m − mean) / (2.326 · std)``), the held-out 20 % scored by
Gaussians fitted on the other 80 %. End to end, the frozen default's Magnetic Tile pixel AUROC was 0.823, 0.807 and
0.801 on held-out seeds 0-2 (200 images; the Gaussians are refitted on all images, so only the constants differ):
the averaged map's scale ``q99 − median`` was 0.46, 0.80 and 0.66. The q99 of 40 images' pooled pixels is set by
the few images with the brightest normal structure.

Estimators of the constants, per held-out draw (``seed``):

* ``pooled`` (the package's): quantiles of the pooled pixels of the held-out 20 % (one fold of five);
* ``per_image``: the median over the held-out images of each image's own median and q99 (the typical normal
  image's 99th percentile), the layout map's moments as the package's;
* ``kfold``: every training image scored out of fold (five folds, each scored by Gaussians fitted on the other
  four), pooled quantiles and moments over all of them; the image score's z-scores too: five times the held-out
  images for the same fits of moments;
* ``kfold_per_image``: both;
* ``kfold_layout``: only the layout map's moments and the layout term's z-score out of fold over every training
  image (kept layout vectors suffice: no second pass through the backbone), the rest as ``pooled``.

``--train-images N``: each draw first takes a random subset of N cached training images (``seed`` draws it, as in
``small_training_set_study.py``), so the held-out fold is N/5 images; test images are then scored by the Gaussians
refitted on that subset.

Reported per set over ``--seeds`` draws: pixel AUROC of the default heatmap and image AUROC of ``z(L) + z(M')``
(mean, std and worst draw), and the averaged map's scale. Test images are scored by the Gaussians refitted on all
training images (the same for every draw), as in the other layout studies.

    PYTHONPATH=src:benchmarks python benchmarks/fusion_constants_study.py --tag n200 --seeds 0,1,2,3,4,5,6,7,8,9 \
        --out docs/local_evidence/fusion_constants
    PYTHONPATH=src:benchmarks python benchmarks/fusion_constants_study.py --tag n50 --train-images 50 \
        --seeds 0,1,2,3,4,5,6,7,8,9 --out docs/local_evidence/fusion_constants
    python benchmarks/fusion_constants_study.py --table docs/local_evidence/fusion_constants
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import numpy as np
import torch

from anomalib_gaussft.gaussft.map_fusion import LAYOUT_TAIL_Z, MAX_PIXELS, PIXELS_PER_IMAGE
from layout_map_study import AVERAGED, DETAIL, cell_maps, fit_layout, image_distances, to_image
from layout_scale_study import mean_std_table, run_study, seed_runs
from local_evidence_study import auroc, fit_units, full_map, topk_mean, unit_maps, zscore

FOLDS = 5  # one fold is the package's held-out 20 %
ESTIMATORS = ("pooled", "per_image", "kfold", "kfold_per_image", "kfold_layout")
BLUR = {"averaged": 4.0, "detail": 2.0}  # the package's blur of each map (the detail map: σ / 2)
TRAIN_IMAGES: int | None = None  # --train-images: a random subset per draw (None: every cached training image)


def folds_of(n: int, seed: int) -> list[np.ndarray]:
    """Five disjoint folds of ``range(n)``; fold 0 is the layout studies' held-out 20 % of this seed."""
    order = np.random.default_rng(1000 + seed).permutation(n)
    n_held = max(2, round(0.2 * n))
    rest = np.array_split(order[n_held:], FOLDS - 1)
    return [np.sort(order[:n_held]), *(np.sort(r) for r in rest)]


def scored(data, fit_idx: np.ndarray, split) -> dict[str, torch.Tensor]:
    """Maps, layout map and L of the images of ``split`` under Gaussians fitted on ``data.train[fit_idx]``."""
    out = {
        name: full_map(unit_maps(split, cfg, fit_units(data.train, fit_idx, cfg)), BLUR[name])
        for name, cfg in (("averaged", AVERAGED), ("detail", DETAIL))
    }
    mean, covariance = fit_layout(data.train, fit_idx)
    out["layout"] = to_image(cell_maps(split, mean, covariance, "cond"))
    out["L"] = image_distances(split, mean, covariance).float()
    return out


def out_of_fold(data, fold: np.ndarray) -> dict[str, torch.Tensor]:
    """The images of ``fold`` scored by Gaussians fitted on every other training image."""
    return scored(data, np.setdiff1d(np.arange(len(data.train)), fold), data.train.take(fold))


_TEST_MAPS: dict[str, dict[str, torch.Tensor]] = {}  # per loaded set: the same for every draw


def test_maps(data) -> dict[str, torch.Tensor]:
    """The test images scored by Gaussians fitted on all training images (cached per set; not for subsets)."""
    if TRAIN_IMAGES is not None:
        return scored(data, np.arange(len(data.train)), data.test)
    if data.name not in _TEST_MAPS:
        _TEST_MAPS.clear()  # one set at a time
        _TEST_MAPS[data.name] = scored(data, np.arange(len(data.train)), data.test)
    return _TEST_MAPS[data.name]


def subsampled(maps: torch.Tensor) -> torch.Tensor:
    """``(N, P)`` evenly strided pixels of each map, as the package keeps them (``PIXELS_PER_IMAGE``)."""
    flat = maps.flatten(1)
    return flat[:, :: max(1, flat.shape[1] // PIXELS_PER_IMAGE)].double()


def centre_and_scale(maps: torch.Tensor, per_image: bool) -> tuple[float, float]:
    """(median, q99 − median) of normal maps: of the pooled pixels, or medians over images of each image's own."""
    pixels = subsampled(maps)
    q = torch.tensor([0.5, 0.99], dtype=torch.float64)
    if per_image:
        median, tail = torch.quantile(pixels, q, dim=1).median(dim=1).values
    else:
        flat = pixels.flatten()
        median, tail = torch.quantile(flat[:: -(-len(flat) // MAX_PIXELS)], q)
    return float(median), float(tail - median)


def heatmaps_and_scores(
    normal: dict[str, torch.Tensor],
    test: dict[str, torch.Tensor],
    per_image: bool,
    layout_normal: dict[str, torch.Tensor] | None = None,
):
    """The default heatmap and image score of the test images under constants from the ``normal`` out-of-fold maps.

    ``layout_normal``: the out-of-fold layout maps and ``L`` the layout constants come from (default: ``normal``).
    """
    layout_normal = normal if layout_normal is None else layout_normal
    scaled, scales = {}, {}
    for name in ("averaged", "detail"):
        centre, scales[name] = centre_and_scale(normal[name], per_image)
        scaled[name] = ((normal[name] - centre) / scales[name], (test[name] - centre) / scales[name])
    layout = subsampled(layout_normal["layout"]).flatten()
    layout_scale = LAYOUT_TAIL_Z * layout.std()
    excess = [((m - layout.mean()) / layout_scale - 1).relu().float() for m in (normal["layout"], test["layout"])]
    heatmap = torch.maximum(scaled["averaged"][1], scaled["detail"][1]) + excess[1]
    m_normal = topk_mean(scaled["averaged"][0] + excess[0], 0.01)
    m_test = topk_mean(scaled["averaged"][1] + excess[1], 0.01)
    score = zscore(test["L"], layout_normal["L"]) + zscore(m_test, m_normal)
    return heatmap, score, scales["averaged"]


def record_of(data, seed: int, frac: float) -> dict:
    """Pixel and image AUROC, and the averaged map's scale, under every estimator of the constants."""
    if frac != 0.2:
        msg = "this study's folds hold out 20 % each"
        raise ValueError(msg)
    if TRAIN_IMAGES is not None:
        subset = np.random.default_rng(seed).permutation(len(data.train))[: min(TRAIN_IMAGES, len(data.train))]
        data = dataclasses.replace(data, train=data.train.take(np.sort(subset)))
    folds = [out_of_fold(data, fold) for fold in folds_of(len(data.train), seed)]
    every = {key: torch.cat([f[key] for f in folds]) for key in folds[0]}
    test = test_maps(data)
    labels = np.asarray(data.labels)
    masks = None if data.masks is None else data.masks.numpy()
    results, scales = {}, {}
    for estimator in ESTIMATORS:
        normal = every if estimator in ("kfold", "kfold_per_image") else folds[0]
        layout_normal = every if estimator == "kfold_layout" else None
        heatmap, score, scales[estimator] = heatmaps_and_scores(
            normal, test, estimator.endswith("per_image"), layout_normal
        )
        results[f"{estimator}: image"] = auroc(labels, score.numpy())
        if masks is not None:
            results[f"{estimator}: pixel"] = auroc(masks, heatmap.numpy())
    return {"results": results, "averaged_scale": scales, "train_images": len(data.train)}


def write_table(folder: Path) -> str:
    """Markdown: per measure, one row per estimator, mean ± std over the draws per set; then the worst draw, and the
    paired difference to ``pooled``."""
    runs = seed_runs(
        folder, lambda _record, rule: rule, lambda r: f"{r['dataset']} ({r.get('train_images', r['n_train'])})"
    )
    parts = []
    for measure in ("pixel", "image"):
        rows = [f"{e}: {measure}" for e in ESTIMATORS]
        parts.append(mean_std_table(f"{measure} AUROC", runs, rows, lambda row: row.split(":")[0]))
        columns = list(dict.fromkeys(c for r in rows for c in runs.get(r, {})))
        lines = [f"| worst draw, {measure} | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
        for row in rows:
            cells = [f"{min(runs[row][c]):.3f}" if c in runs.get(row, {}) else "–" for c in columns]
            lines.append(f"| {row.split(':')[0]} | " + " | ".join(cells) + " |")
        parts.append("\n".join(lines))
        parts.append(paired_difference_table(runs, measure, columns))
    return "\n\n".join(parts) + "\n"


def paired_difference_table(runs: dict[str, dict[str, list[float]]], measure: str, columns: list[str]) -> str:
    """Markdown: each estimator minus ``pooled`` on the same draw, mean ± std over draws (and the lowest)."""
    base = runs.get(f"pooled: {measure}", {})
    lines = [f"| − pooled, same draw, {measure} | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
    for estimator in ESTIMATORS[1:]:
        cells = []
        for column in columns:
            values = runs.get(f"{estimator}: {measure}", {}).get(column)
            if not values or len(values) != len(base.get(column, [])):
                cells.append("–")
                continue
            diff = np.asarray(values) - np.asarray(base[column])
            cells.append(f"{diff.mean():+.3f} ± {diff.std():.3f} ({diff.min():+.3f})")
        lines.append(f"| {estimator} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    global TRAIN_IMAGES  # record_of's signature is run_study's: the subset size travels as a module setting
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--train-images", type=int, default=None)
    known, rest = parser.parse_known_args(argv)
    TRAIN_IMAGES = known.train_images
    return run_study(rest, __doc__, "docs/local_evidence/fusion_constants", record_of, write_table)


if __name__ == "__main__":
    raise SystemExit(main())
