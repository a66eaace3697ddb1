"""Does the scale the two image-score terms are summed on matter? (issue #14, unaligned surfaces)

The ``local`` image score is ``z(L) + z(M')``: each term minus its mean over its standard deviation on the held-out
normals. L (a distance, ``√d²``) and M' (the top 1 % of the averaged map on its held-out tail scale plus the layout
map's excess) are right-skewed, and on KolektorSDD L is mostly nuisance: a few normal test images with a large L
then outrank real defects. Summing on a log scale turns the z-sum into a weighted geometric mean, which compresses
such tails. Candidates, all normal-only (held-out constants, no weight chosen by an anomaly):

* ``L + M'``: the package's score;
* ``log L + M'``: the layout distance's log z-scored (it is positive by construction);
* ``log L + log M``: both logs, with the map term on the raw ``sqrt(d²/C)`` map without the layout excess (M' can
  be ≤ 0, its tail scale puts the held-out median at 0);
* ``L + M'q`` / ``log L + log M'q``: M' with the averaged map divided by its held-out q99 (no median shift: always
  positive), the layout excess added as in the package;
* ``L + M' (MAD)``: median and median absolute deviation instead of mean and std.

Protocol of the layout studies (20 % held out fix the z-scores and the map tails with Gaussians fitted on the other
80 %; test images scored by Gaussians refitted on all training images).

    PYTHONPATH=src:benchmarks python benchmarks/score_scaling_study.py --tag n200 \
        --out docs/local_evidence/score_scaling
    PYTHONPATH=src:benchmarks python benchmarks/score_scaling_study.py --cache /work/data/cache/full --tag full \
        --datasets magnetic_tile,bsdata,elpv_mono,elpv_poly,kolektorsdd --out docs/local_evidence/score_scaling
    python benchmarks/score_scaling_study.py --table docs/local_evidence/score_scaling
"""

from __future__ import annotations

import torch

from layout_excess_score_study import terms_of
from layout_scale_study import auroc_record, run_study
from local_evidence_study import topk_mean, zscore

PIXEL_SAMPLE = 200_000  # held-out map pixels read for the q99 of ``M'q``


def mad_scaled(test: torch.Tensor, held: torch.Tensor) -> torch.Tensor:
    """``test`` minus the held-out median, over the held-out median absolute deviation."""
    median = held.median()
    return (test - median) / (held - median).abs().median()


def log_z(test: torch.Tensor, held: torch.Tensor) -> torch.Tensor:
    """z-score of ``log test`` against ``log held`` (both positive)."""
    return zscore(test.log(), held.log())


def record_of(data, seed: int, frac: float) -> dict:
    """AUROC of every way of putting L and the map term on one scale."""
    terms, (avg_held, avg_test), (excess_held, excess_test) = terms_of(data, seed, frac)
    (l_held, l_test), (m_held, m_test), (mp_held, mp_test) = terms["L"], terms["M"], terms["M'"]
    pixels = avg_held.flatten()
    q99 = torch.quantile(pixels[:: max(1, pixels.numel() // PIXEL_SAMPLE)], 0.99)
    mq_held, mq_test = topk_mean(avg_held / q99 + excess_held, 0.01), topk_mean(avg_test / q99 + excess_test, 0.01)
    scores = {
        "L + M' (default)": zscore(l_test, l_held) + zscore(mp_test, mp_held),
        "log L + M'": log_z(l_test, l_held) + zscore(mp_test, mp_held),
        "log L + log M": log_z(l_test, l_held) + log_z(m_test, m_held),
        "L + M'q": zscore(l_test, l_held) + zscore(mq_test, mq_held),
        "log L + log M'q": log_z(l_test, l_held) + log_z(mq_test, mq_held),
        "L + M' (MAD)": mad_scaled(l_test, l_held) + mad_scaled(mp_test, mp_held),
    }
    return auroc_record(data, scores)


def main(argv: list[str] | None = None) -> int:
    return run_study(argv, __doc__, "docs/local_evidence/score_scaling", record_of)


if __name__ == "__main__":
    raise SystemExit(main())
