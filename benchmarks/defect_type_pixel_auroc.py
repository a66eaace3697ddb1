"""Which defects set a set's pixel AUROC? Pixel AUROC of the default heatmap per defect type (issue #14).

Pixel AUROC pools every test pixel, so a type whose masks cover much of the image outweighs the others. Per type,
this scores the pixels of that type's images and of every normal test image, and gives the type's share of all
defect pixels. The heatmap is the package's r19 default computed from cached frozen lite0 features (the studies'
pipeline, ``conditional_map_study.py``, on the package's held-out split of ``--seed``: it equals the end-to-end
fit), beside the averaged map alone and the map Gaussians conditioned on the image's appearance (``k = 8``). The
defect type is the test image's folder (``test/<type>/``).

    PYTHONPATH=src:benchmarks python benchmarks/defect_type_pixel_auroc.py --dataset magnetic_tile \
        --out docs/local_evidence/defect_types/magnetic_tile.md
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

import conditional_map_study
from conditional_map_study import AVERAGED, DETAIL, fused_heatmap, local_map, maxed_local_maps, split_of
from layout_map_study import layout_evidence
from local_evidence_study import auroc, load_set
from multiscale_map_study import pixel_tail


def heatmaps(data, seed: int, k: int) -> dict[str, torch.Tensor]:
    """The default heatmap and the averaged map alone of the test images, local maps conditioned on ``k`` components."""
    fit_idx, held_idx = split_of(data, seed, 0.2)
    held = data.train.take(held_idx)
    avg_h, avg_t = local_map(data, AVERAGED, fit_idx, held, 8, k)
    scaled = (pixel_tail(avg_h, avg_h, 0.99), pixel_tail(avg_h, avg_t, 0.99))
    h_h, h_t = maxed_local_maps(scaled, local_map(data, DETAIL, fit_idx, held, 8, k))
    _e_h, e_t = layout_evidence(data, fit_idx, held)["excess"]
    return {"heatmap": fused_heatmap(h_h, h_t, e_t), "averaged map alone": avg_t}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="magnetic_tile")
    parser.add_argument("--cache", default="/work/data/cache/local_evidence")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    conditional_map_study.SPLIT["held_out"] = "package"
    data = load_set(Path(args.cache), args.dataset)
    types = np.array([Path(p).parent.name for p in data.test_paths])
    maps = {f"default {name}": m for name, m in heatmaps(data, args.seed, 0).items()}
    maps.update({f"conditioned (k = 8) {name}": m for name, m in heatmaps(data, args.seed, 8).items()})
    masks, normal = data.masks.numpy(), types == "good"
    total = masks.sum()
    head = ["defect type", "images", "mean mask area", "share of defect pixels", *maps]
    lines = [f"| {' | '.join(head)} |", "|---|" + "---:|" * (len(head) - 1)]
    rows = [("all", np.ones(len(types), dtype=bool))] + [(t, types == t) for t in sorted(set(types) - {"good"})]
    for name, chosen in rows:
        keep = chosen | normal
        defective = chosen & ~normal
        cells = [
            str(int(defective.sum())),
            f"{100 * masks[defective].mean():.2f} %",
            f"{100 * masks[defective].sum() / total:.0f} %",
            *(f"{auroc(masks[keep], m.numpy()[keep]):.3f}" for m in maps.values()),
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    title = f"Pixel AUROC per defect type, {args.dataset}, {len(data.train)} training images"
    title += f", the package's held-out split of seed {args.seed}"
    text = f"{title}\n\n" + "\n".join(lines) + "\n"
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
