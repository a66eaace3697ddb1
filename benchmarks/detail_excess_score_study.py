"""Should the image score's map term read the detail map's excess too? (issue #14, small defects: BSData)

The default map term M' is the top-1 % mean of the averaged map (3 × 3 neighbourhood means) on its held-out tail
scale plus the layout map's excess; the unaveraged detail map (level 3, the heatmap's sharp part) stays out of the
score because, through the heatmap's max, it cost ELPV and KolektorSDD. BSData's pits are a few pixels wide, where
the detail map is sharper. Candidates, each a top-1 % mean:

* ``M' + detail excess``: ``s_avg + relu(s_det − 1) + relu(s_layout − 1)``: the detail map speaks only above its own
  held-out 99th percentile, so its texture noise below that level never reaches the score;
* ``heatmap``: the default heatmap itself, ``max(s_avg, s_det) + relu(s_layout − 1)``.

Protocol of the layout studies (20 % held out fix the tails and z-scores with Gaussians fitted on the other 80 %;
test images scored by Gaussians refitted on all training images).

    PYTHONPATH=src:benchmarks python benchmarks/detail_excess_score_study.py --tag n200 \
        --out docs/local_evidence/detail_excess_score
    PYTHONPATH=src:benchmarks python benchmarks/detail_excess_score_study.py --cache /work/data/cache/full --tag full \
        --datasets magnetic_tile,bsdata,elpv_mono,elpv_poly,kolektorsdd --out docs/local_evidence/detail_excess_score
    python benchmarks/detail_excess_score_study.py --table docs/local_evidence/detail_excess_score
"""

from __future__ import annotations

import numpy as np
import torch

from layout_map_study import AVERAGED, DETAIL, layout_evidence
from layout_scale_study import run_study
from local_evidence_study import auroc, held_out_split, topk_mean, zscore
from multiscale_map_study import maps_of, pixel_tail


def record_of(data, seed: int, frac: float) -> dict:
    """AUROC of L with each map term, and of each map term alone."""
    fit_idx, held_idx = held_out_split(len(data.train), frac, seed)
    held = data.train.take(held_idx)
    avg_held, avg_test = maps_of(data, AVERAGED, fit_idx, held)
    det_held, det_test = maps_of(data, DETAIL, fit_idx, held, 2.0)
    evidence = layout_evidence(data, fit_idx, held)
    excess = dict(zip(("held", "test"), evidence["excess"], strict=True))
    s_avg = {"held": pixel_tail(avg_held, avg_held, 0.99), "test": pixel_tail(avg_held, avg_test, 0.99)}
    s_det = {"held": pixel_tail(det_held, det_held, 0.99), "test": pixel_tail(det_held, det_test, 0.99)}
    maps = {
        "M' (default)": {k: s_avg[k] + excess[k] for k in ("held", "test")},
        "M' + detail excess": {k: s_avg[k] + (s_det[k] - 1).relu() + excess[k] for k in ("held", "test")},
        "heatmap": {k: torch.maximum(s_avg[k], s_det[k]) + excess[k] for k in ("held", "test")},
    }
    layout = evidence["distance"]
    labels = np.asarray(data.labels)
    results = {}
    for name, pair in maps.items():
        top_held, top_test = topk_mean(pair["held"], 0.01), topk_mean(pair["test"], 0.01)
        results[f"{name} alone"] = auroc(labels, top_test.numpy())
        results[f"L + {name}"] = auroc(labels, (zscore(layout[1], layout[0]) + zscore(top_test, top_held)).numpy())
    return {"results": results}


def main(argv: list[str] | None = None) -> int:
    return run_study(argv, __doc__, "docs/local_evidence/detail_excess_score", record_of)


if __name__ == "__main__":
    raise SystemExit(main())
