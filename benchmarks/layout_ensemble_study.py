"""Layout terms of two or more crops, averaged: the border crop without choosing a border? (issue #14)

The border-crop study (``layout_crop_study.py``) found that each set wants another border dropped before the layout
term's 3 × 3 pooling of the level-5 map: BSData the bottom and right (DFM's crop), KolektorSDD the top and left, ELPV
none. Here several crops each get their own layout Gaussian and the layout evidence is their mean: the whole-layout
distance L is the mean of the crops' distances, the heatmap's layout map the mean of their (upsampled) cell maps,
then the package's held-out tail and z-scores as usual. Opposite corners make the crops symmetric under a 180°
rotation, so no border is preferred. Each crop costs one more layout Gaussian (3.9 MiB + 0.4 MiB for lite0).

Protocol of the layout studies (20 % held out fix the z-scores and tails with Gaussians fitted on the other 80 %;
test images scored by Gaussians refitted on all training images). Per-image scores are kept for paired intervals.

    PYTHONPATH=src:benchmarks python benchmarks/layout_ensemble_study.py --tag n200 \\
        --datasets magnetic_tile,bsdata,kolektorsdd,deeppcb,elpv_mono,elpv_poly,brick,grass,gravel \\
        --out docs/local_evidence/layout_ensemble
    PYTHONPATH=src:benchmarks python benchmarks/layout_ensemble_study.py --map-regions 10 --tag n200_r10 \
        --datasets magnetic_tile,bsdata,kolektorsdd,deeppcb,elpv_mono,elpv_poly,brick,grass,gravel \
        --out docs/local_evidence/layout_ensemble
    python benchmarks/layout_ensemble_study.py --table docs/local_evidence/layout_ensemble
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch

import conditional_map_study
import layout_map_study
from conditional_map_study import fused_heatmap
from layout_crop_study import PACKAGE_LAYOUT_VECTORS, cropped_layout_vectors, local_maps_of, with_per_image_scores
from layout_scale_study import auroc_record, mean_std_table, run_study, seed_runs
from local_evidence_study import auroc, topk_mean, zscore
from results_table import paired_bootstrap

CROPS = {
    "none": (slice(None), slice(None)),
    "br2": (slice(0, 12), slice(0, 12)),
    "tl2": (slice(2, 14), slice(2, 14)),
    "tr2": (slice(0, 12), slice(2, 14)),
    "bl2": (slice(2, 14), slice(0, 12)),
    "br1": (slice(0, 13), slice(0, 13)),
    "tl1": (slice(1, 14), slice(1, 14)),
}
ENSEMBLES = {
    "none": ("none",),
    "br2": ("br2",),
    "tl2": ("tl2",),
    "br2 + tl2": ("br2", "tl2"),
    "tr2 + bl2": ("tr2", "bl2"),
    "4 corners 2": ("br2", "tl2", "tr2", "bl2"),
    "br1 + tl1": ("br1", "tl1"),
    "none + br2 + tl2": ("none", "br2", "tl2"),
    "br2 + tl2, one Gaussian": ("br2 | shared", "tl2 | shared"),
    "4 corners 2, one Gaussian": ("br2 | shared4", "tl2 | shared4", "tr2 | shared4", "bl2 | shared4"),
}
# the paired intervals of the table: (tag, ensemble) against r19's rule (tag n200, no crop)
INTERVALS = (
    ("n200", "br1 + tl1"),
    ("n200", "4 corners 2"),
    ("n200", "4 corners 2, one Gaussian"),
    ("n200_r10", "br1 + tl1"),
)
# one Gaussian fitted on the vectors of several crops (shifted copies), scoring each crop with it
SHARED = {"shared": ("br2", "tl2"), "shared4": ("br2", "tl2", "tr2", "bl2")}


def stacked_layout_vectors(crops: tuple[str, ...]):
    """Every image's layout vectors of ``crops``, stacked: what a Gaussian shared by the crops is fitted on."""
    parts = [cropped_layout_vectors(*CROPS[c]) for c in crops]
    return lambda split, index: torch.cat([part(split, index) for part in parts])


def crop_evidence(data, fit_idx: np.ndarray, held) -> dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """Per crop, ``(held-out, test)``: the raw layout map at image size (``"map"``) and the distance L."""
    evidence = {}
    try:
        for name, (rows, cols) in CROPS.items():
            layout_map_study.layout_vectors = cropped_layout_vectors(rows, cols)
            fitted = layout_map_study.fit_layout(data.train, fit_idx)
            refitted = layout_map_study.fit_layout(data.train, np.arange(len(data.train)))
            evidence[name] = scored(data, held, fitted, refitted)
        for shared, crops in SHARED.items():
            layout_map_study.layout_vectors = stacked_layout_vectors(crops)
            fitted = layout_map_study.fit_layout(data.train, fit_idx)
            refitted = layout_map_study.fit_layout(data.train, np.arange(len(data.train)))
            for crop in crops:
                layout_map_study.layout_vectors = cropped_layout_vectors(*CROPS[crop])
                evidence[f"{crop} | {shared}"] = scored(data, held, fitted, refitted)
    finally:
        layout_map_study.layout_vectors = PACKAGE_LAYOUT_VECTORS
    return evidence


def scored(data, held, fitted: tuple, refitted: tuple) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The raw layout map at image size and the distance L, ``(held-out, test)``: held-out images scored by the
    ``fitted`` Gaussian (mean, covariance), test images by the ``refitted`` one."""
    return {
        "map": (
            layout_map_study.to_image(layout_map_study.cell_maps(held, *fitted, "cond")),
            layout_map_study.to_image(layout_map_study.cell_maps(data.test, *refitted, "cond")),
        ),
        "distance": (
            layout_map_study.image_distances(held, *fitted).float(),
            layout_map_study.image_distances(data.test, *refitted).float(),
        ),
    }


def mean_of(evidence: dict, crops: tuple[str, ...], key: str) -> tuple[torch.Tensor, torch.Tensor]:
    return tuple(torch.stack([evidence[c][key][i] for c in crops]).mean(0) for i in (0, 1))


def add_layout_variant(
    name: str, data, s_avg: tuple, local: tuple | None, layout_maps: tuple, distances: tuple, scores: dict, pixels: dict
) -> None:
    """Add one layout variant's test scores (``L``, ``z(L) + z(M')``) to ``scores`` and its heatmap's pixel AUROC to
    ``pixels``; each tuple is ``(held-out, test)``: the averaged maps, the raw layout maps and the distances L."""
    (s_avg_h, s_avg_t), (map_h, map_t), (l_h, l_t) = s_avg, layout_maps, distances
    tail = layout_map_study.gaussian_tail
    e_h, e_t = (tail(map_h, map_h) - 1).relu(), (tail(map_h, map_t) - 1).relu()
    m_h, m_t = topk_mean(s_avg_h + e_h, 0.01), topk_mean(s_avg_t + e_t, 0.01)
    scores[f"L, {name}"] = l_t
    scores[f"L + M', {name}"] = zscore(l_t, l_h) + zscore(m_t, m_h)
    if local is not None:
        pixels[f"pixel: {name}"] = auroc(data.masks.numpy(), fused_heatmap(*local, e_t).numpy())


def record_of(data, seed: int, frac: float) -> dict:
    """Image AUROC of L and ``z(L) + z(M')``, pixel AUROC of the r19 heatmap, for each ensemble of crops."""
    fit_idx, held, (s_avg_h, s_avg_t), local = local_maps_of(data, seed, frac)
    evidence = crop_evidence(data, fit_idx, held)
    scores, pixels = {}, {}
    for name, crops in ENSEMBLES.items():
        layout_maps, distances = mean_of(evidence, crops, "map"), mean_of(evidence, crops, "distance")
        add_layout_variant(name, data, (s_avg_h, s_avg_t), local, layout_maps, distances, scores, pixels)
    record = auroc_record(data, scores)
    record["results"].update(pixels)
    return with_per_image_scores(record, data, scores)


def column(record: dict) -> str:
    """A table column: the set and its training images, and the tag where the maps differ from the package's."""
    tag = "" if record["tag"] in ("n200", "full") else f", {record['tag']}"
    return f"{record['dataset']} ({record['n_train']}{tag})"


def write_table(folder: Path) -> str:
    """Markdown: image and pixel AUROC (mean ± std over seeds) and seed 0's paired 95 % intervals of some ensembles
    (``INTERVALS``) against r19's rule (12 × 12 map regions, one grid)."""
    runs = seed_runs(folder, lambda _record, rule: rule, column)
    parts = [
        mean_std_table("image AUROC", runs, [r for r in runs if r.startswith("L")], lambda row: row),
        mean_std_table("pixel AUROC", runs, [r for r in runs if r.startswith("pixel: ")], lambda row: row[7:]),
    ]
    lines = [
        "| seed 0, `z(L) + z(M')` − r19's (12 × 12 regions, one grid) [95 % CI] | "
        + " | ".join(f"{name} ({tag})" for tag, name in INTERVALS)
        + " |",
        "|---|" + "---:|" * len(INTERVALS),
    ]
    for path in sorted(folder.glob("n200_*_seed0.json")):
        base_record = json.loads(path.read_text())
        if base_record["tag"] != "n200":  # n200_r10_* files match the pattern too
            continue
        labels = np.asarray(base_record["labels"])
        base = np.asarray(base_record["scores"]["L + M', none"])
        cells = []
        for tag, name in INTERVALS:
            other = folder / path.name.replace("n200_", f"{tag}_", 1)
            if not other.exists():
                cells.append("–")
                continue
            scores = np.asarray(json.loads(other.read_text())["scores"][f"L + M', {name}"])
            diff, lo, hi = paired_bootstrap(labels, scores, base)
            cells.append(f"{diff:+.3f} [{lo:+.3f}, {hi:+.3f}]")
        lines.append(f"| {base_record['dataset']} | " + " | ".join(cells) + " |")
    parts.append("\n".join(lines))
    return "\n\n".join(parts) + "\n"


def main(argv: list[str] | None = None) -> int:
    """``--map-regions R`` (before the other options): the averaged and detail maps on an R × R grid of regions
    instead of the package's 12 × 12, to price the extra layout Gaussians within the statistics budget."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--map-regions" in argv:
        at = argv.index("--map-regions")
        conditional_map_study.REGIONS = int(argv[at + 1])
        del argv[at : at + 2]
    return run_study(argv, __doc__, "docs/local_evidence/layout_ensemble", record_of, write_table)


if __name__ == "__main__":
    raise SystemExit(main())
