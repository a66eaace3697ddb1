"""Should the image score's map term read the layout map's excess too? (issue #14, Magnetic Tile with all images)

The ``local`` image score is ``z(L) + z(M)``: L the layout Gaussian's distance, M the mean of the top 1 % of the
averaged map. With all training images L alone beats the sum on Magnetic Tile (0.991 vs 0.984): M, blind to the
layout, dilutes it. The heatmap already carries L's evidence where it is local: the layout map's excess over its
held-out tail (``map_layout``). Candidate: ``M' =`` the top-1 % mean of the averaged map on its held-out tail scale
(median → 0, q99 → 1) plus that excess, i.e. M of the averaged map with the layout map fused in. An image whose
layout is unusual in one cell then also scores higher on the map term, and only then.

Protocol of the layout studies (20 % held out fix the tails and the z-scores with Gaussians fitted on the other
80 %; test images scored by Gaussians refitted on all training images); the layout map as ``layout_map_study.py``
(conditional per-cell distance, Gaussian q99 tail: the package's).

    PYTHONPATH=src:benchmarks python benchmarks/layout_excess_score_study.py --cache /work/data/cache/full --tag full \
        --datasets magnetic_tile,bsdata,elpv_mono,elpv_poly,kolektorsdd --out docs/local_evidence/layout_excess_score
    PYTHONPATH=src:benchmarks python benchmarks/layout_excess_score_study.py --tag n200 \
        --out docs/local_evidence/layout_excess_score
    python benchmarks/layout_excess_score_study.py --table docs/local_evidence/layout_excess_score
"""

from __future__ import annotations

from layout_map_study import AVERAGED, layout_evidence
from layout_scale_study import auroc_record, run_study
from local_evidence_study import held_out_split, topk_mean, zscore
from multiscale_map_study import maps_of, pixel_tail


def terms_of(data, seed: int, frac: float) -> tuple[dict[str, tuple], tuple, tuple]:
    """(held-out, test) scores of L, M and M', and the averaged map and the layout excess they were read from."""
    fit_idx, held_idx = held_out_split(len(data.train), frac, seed)
    held = data.train.take(held_idx)
    avg_held, avg_test = maps_of(data, AVERAGED, fit_idx, held)
    evidence = layout_evidence(data, fit_idx, held)
    excess_held, excess_test = evidence["excess"]
    fused_held = pixel_tail(avg_held, avg_held, 0.99) + excess_held
    fused_test = pixel_tail(avg_held, avg_test, 0.99) + excess_test
    terms = {
        "L": evidence["distance"],
        "M": (topk_mean(avg_held, 0.01), topk_mean(avg_test, 0.01)),
        "M'": (topk_mean(fused_held, 0.01), topk_mean(fused_test, 0.01)),
    }
    return terms, (avg_held, avg_test), evidence["excess"]


def record_of(data, seed: int, frac: float) -> dict:
    """AUROC of L, M, M' and the two sums."""
    terms, _, _ = terms_of(data, seed, frac)
    z = {name: zscore(test, held_scores) for name, (held_scores, test) in terms.items()}
    scores = {name: test for name, (_held, test) in terms.items()}
    scores["L + M (default)"] = z["L"] + z["M"]
    scores["L + M'"] = z["L"] + z["M'"]
    return auroc_record(data, scores)


def main(argv: list[str] | None = None) -> int:
    return run_study(argv, __doc__, "docs/local_evidence/layout_excess_score", record_of)


if __name__ == "__main__":
    raise SystemExit(main())
