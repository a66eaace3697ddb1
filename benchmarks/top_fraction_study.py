"""How much of the map should the image score's map term read? (issue #14, small vs large defects)

The ``local`` image score is ``z(L) + z(M')``, M' the mean of the top 1 % of the fused map (the averaged map on its
held-out tail scale plus the layout map's excess). 1 % was set when the score was designed and never varied: at
224 px it is the 502 brightest pixels, about the area of a defect 22 px across. A crack on a commutator
(KolektorSDD) or a missing PCB track (DeepPCB) covers far fewer pixels, so most of the top 1 % is normal structure
that dilutes it; an uneven area on a tile (Magnetic Tile) covers more. Candidates: the top 0.1 % to 5 % and the
maximum. Normal-only: the fraction is one constant for every set, its z-score from the held-out normals.

Protocol of the layout studies (20 % held out fix the tails and the z-scores with Gaussians fitted on the other
80 %; test images scored by Gaussians refitted on all training images).

    PYTHONPATH=src:benchmarks python benchmarks/top_fraction_study.py --tag n200 --out docs/local_evidence/top_fraction
    python benchmarks/top_fraction_study.py --table docs/local_evidence/top_fraction
"""

from __future__ import annotations

from layout_excess_score_study import terms_of
from layout_scale_study import auroc_record, run_study
from local_evidence_study import topk_mean, zscore
from multiscale_map_study import pixel_tail

FRACTIONS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.05)


def record_of(data, seed: int, frac: float) -> dict:
    """AUROC of ``z(L) + z(M'_q)`` and of ``M'_q`` alone for every top fraction ``q``, and with the map's maximum."""
    terms, (avg_held, avg_test), (excess_held, excess_test) = terms_of(data, seed, frac)
    fused_held = pixel_tail(avg_held, avg_held, 0.99) + excess_held
    fused_test = pixel_tail(avg_held, avg_test, 0.99) + excess_test
    l_held, l_test = terms["L"]
    scores = {}
    for name, read in [
        *((f"top {100 * q:g} %", lambda m, q=q: topk_mean(m, q)) for q in FRACTIONS),
        ("max", lambda m: m.flatten(1).amax(dim=1)),
    ]:
        held, test = read(fused_held), read(fused_test)
        label = f"{name} (default)" if name == "top 1 %" else name
        scores[f"L + M' {label}"] = zscore(l_test, l_held) + zscore(test, held)
        scores[f"M' {label} alone"] = test
    return auroc_record(data, scores)


def main(argv: list[str] | None = None) -> int:
    return run_study(argv, __doc__, "docs/local_evidence/top_fraction", record_of)


if __name__ == "__main__":
    raise SystemExit(main())
