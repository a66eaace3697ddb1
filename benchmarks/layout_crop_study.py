"""Does a border crop of the layout term help beyond BSData? (issue #14, DFM's lead on BSData)

DFM's pooling (kernel 4, stride 4 on the 14 × 14 level-5 map) uses rows and columns 0..11 and drops the last two:
the image's right and bottom 16 px. On BSData that crop is most of DFM's lead over GaussFT's image score
(docs/local_evidence.md, "Why DFM wins on BSData"). TF-ported EfficientNets pad ``same`` asymmetrically (the extra
row and column of zeros at the bottom and right of every stride-2 convolution), so the crop could be a general
remedy rather than luck. This study crops the level-5 map before the layout term's 3 × 3 pooling, for L alone and
for the default score ``z(L) + z(M')``:

* ``none``: the package's (the whole 14 × 14 map);
* ``bottom-right 2``: rows and columns 0..11 (DFM's);
* ``top-left 2``: rows and columns 2..13;
* ``1 each side``: rows and columns 1..12;
* ``2 each side``: rows and columns 2..11.

The heatmap's layout map reads the same cropped vector (its 3 × 3 cells upsampled over the whole image, as the
package's), so pixel AUROC of the r19 heatmap is reported too.

Protocol of the layout studies (20 % held out fix the z-scores with Gaussians fitted on the other 80 %; test images
scored by Gaussians refitted on all training images).

    PYTHONPATH=src:benchmarks python benchmarks/layout_crop_study.py --tag n200 \\
        --datasets magnetic_tile,bsdata,kolektorsdd,deeppcb,elpv_mono,elpv_poly,brick,grass,gravel \\
        --out docs/local_evidence/layout_crop
    PYTHONPATH=src:benchmarks python benchmarks/layout_crop_study.py --cache /work/data/cache/full --tag full \\
        --datasets magnetic_tile,bsdata,kolektorsdd,elpv_mono,elpv_poly --out docs/local_evidence/layout_crop
    python benchmarks/layout_crop_study.py --table docs/local_evidence/layout_crop
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812

import layout_map_study
from conditional_map_study import AVERAGED, DETAIL, fused_heatmap, local_map, maxed_local_maps
from layout_scale_study import auroc_record, mean_std_table, run_study, seed_runs
from local_evidence_study import auroc, held_out_split, topk_mean, zscore
from multiscale_map_study import pixel_tail
from results_table import paired_bootstrap

CROPS = {
    "none": (slice(None), slice(None)),
    "bottom-right 2": (slice(0, 12), slice(0, 12)),
    "top-left 2": (slice(2, 14), slice(2, 14)),
    "1 each side": (slice(1, 13), slice(1, 13)),
    "2 each side": (slice(2, 12), slice(2, 12)),
}
PACKAGE_LAYOUT_VECTORS = layout_map_study.layout_vectors


def cropped_layout_vectors(rows: slice, cols: slice):
    """``layout_map_study.layout_vectors`` of the level-5 map cropped to ``rows`` × ``cols`` before the pooling."""

    def vectors(split, index) -> torch.Tensor:
        maps = split.maps[layout_map_study.LAYOUT_LEVEL][index][:, :, rows, cols]
        return F.adaptive_avg_pool2d(maps, layout_map_study.GRID).flatten(1).double()

    return vectors


def local_maps_of(data, seed: int, frac: float) -> tuple:
    """What every layout variant is fused with, on the studies' held-out split of ``seed``: ``(fit_idx, held-out
    images, (held, test) averaged maps on their held-out scale, (held, test) maxed local maps or None without
    masks)``."""
    fit_idx, held_idx = held_out_split(len(data.train), frac, seed)
    held = data.train.take(held_idx)
    avg_h, avg_t = local_map(data, AVERAGED, fit_idx, held, 8, 0)
    s_avg = pixel_tail(avg_h, avg_h, 0.99), pixel_tail(avg_h, avg_t, 0.99)
    local = None
    if data.masks is not None:
        local = maxed_local_maps(s_avg, local_map(data, DETAIL, fit_idx, held, 8, 0))
    return fit_idx, held, s_avg, local


def with_per_image_scores(record: dict, data, scores: dict) -> dict:
    """``record`` with the labels and the per-image test scores of the ``L + M'`` rules (for paired intervals)."""
    record["labels"] = np.asarray(data.labels).astype(int).tolist()
    record["scores"] = {name: score.tolist() for name, score in scores.items() if name.startswith("L + M'")}
    return record


def record_of(data, seed: int, frac: float) -> dict:
    """AUROC of L and of ``z(L) + z(M')``, and pixel AUROC of the heatmap, with the layout read from each crop."""
    fit_idx, held, (s_avg_h, s_avg_t), local = local_maps_of(data, seed, frac)
    scores, pixels = {}, {}
    try:
        for name, (rows, cols) in CROPS.items():
            # the layout studies read layout vectors through this module attribute
            layout_map_study.layout_vectors = cropped_layout_vectors(rows, cols)
            evidence = layout_map_study.layout_evidence(data, fit_idx, held)
            (e_h, e_t), (l_h, l_t) = evidence["excess"], evidence["distance"]
            m_h, m_t = topk_mean(s_avg_h + e_h, 0.01), topk_mean(s_avg_t + e_t, 0.01)
            scores[f"L, {name}"] = l_t
            scores[f"L + M', {name}"] = zscore(l_t, l_h) + zscore(m_t, m_h)
            if local is not None:
                pixels[f"pixel: {name}"] = auroc(data.masks.numpy(), fused_heatmap(*local, e_t).numpy())
    finally:
        layout_map_study.layout_vectors = PACKAGE_LAYOUT_VECTORS
    record = auroc_record(data, scores)
    record["results"].update(pixels)
    return with_per_image_scores(record, data, scores)  # for paired intervals against the package's (no crop)


def write_table(folder: Path) -> str:
    """Markdown: image and pixel AUROC (mean ± std over seeds), and seed 0's paired 95 % intervals against no crop
    (200-image runs)."""
    runs = seed_runs(folder, lambda _record, rule: rule, lambda r: f"{r['dataset']} ({r['n_train']})")
    parts = [
        mean_std_table("image AUROC", runs, [r for r in runs if r.startswith("L")], lambda row: row),
        mean_std_table("pixel AUROC", runs, [r for r in runs if r.startswith("pixel: ")], lambda row: row[7:]),
    ]
    lines = ["| L + M', seed 0: crop − none [95 % CI] | " + " | ".join(CROPS) + " |", "|---|" + "---:|" * len(CROPS)]
    for path in sorted(folder.glob("n200_*_seed0.json")):
        record = json.loads(path.read_text())
        labels, scores = np.asarray(record["labels"]), record["scores"]
        base = np.asarray(scores["L + M', none"])
        cells = []
        for crop in CROPS:
            diff, lo, hi = paired_bootstrap(labels, np.asarray(scores[f"L + M', {crop}"]), base)
            cells.append(f"{diff:+.3f} [{lo:+.3f}, {hi:+.3f}]")
        lines.append(f"| {record['dataset']} | " + " | ".join(cells) + " |")
    parts.append("\n".join(lines))
    return "\n\n".join(parts) + "\n"


def main(argv: list[str] | None = None) -> int:
    return run_study(argv, __doc__, "docs/local_evidence/layout_crop", record_of, write_table)


if __name__ == "__main__":
    raise SystemExit(main())
