"""Can the paper's pooled score P join the image score without its cost on aligned sets? (issue #14)

The ``local`` score ``z(L) + z(M')`` trails PatchCore on KolektorSDD and DeepPCB, unaligned surfaces where the
layout term L is noise and P (the paper's sum of pooled Mahalanobis distances) is the strongest term. Adding
``z(P)`` (``image_score: combined``) wins there and costs ELPV and Magnetic Tile. Candidates that let P speak only
where it is unusual, or weigh the terms by how they covary on normal images; every constant comes from the
held-out normals:

* ``+ relu(z(P) - t)``: P added by its excess over a Gaussian tail ``t`` (q99, q95, q90 of a standard normal) or
  over the held-out maximum, the form the heatmap's layout map is added by;
* ``GLS``: the best linear unbiased combination ``wᵀz`` with ``w = Σ⁻¹1``, ``Σ`` the held-out covariance of the
  z-scored terms (the sum when the terms are uncorrelated);
* ``Mahalanobis``: ``zᵀΣ⁻¹z`` of the terms (two-sided), and of their positive parts;
* ``max(z(L), z(P)) + z(M')``: whichever global term is more unusual.

Protocol of the layout studies (20 % held out fix the z-scores with Gaussians fitted on the other 80 %; test
images scored by Gaussians refitted on all training images).

    PYTHONPATH=src:benchmarks python benchmarks/score_combination_study.py --tag n200 \
        --out docs/local_evidence/score_combination
    python benchmarks/score_combination_study.py --table docs/local_evidence/score_combination
"""

from __future__ import annotations

import numpy as np
import torch

from layout_excess_score_study import terms_of
from layout_scale_study import auroc_record, run_study
from local_evidence_study import held_out_split, pooled_distances, zscore

GAUSSIAN_TAILS = {"q99": 2.326, "q95": 1.645, "q90": 1.282}  # standard normal quantiles


def pooled_term(data, seed: int, frac: float) -> tuple[torch.Tensor, torch.Tensor]:
    """P on the held-out normals (Gaussians of the other 80 %) and on the test images (Gaussians of all)."""
    fit_idx, held_idx = held_out_split(len(data.train), frac, seed)
    (held,) = pooled_distances(data.train, fit_idx, [data.train.take(held_idx)])
    (test,) = pooled_distances(data.train, np.arange(len(data.train)), [data.test])
    return held.sum(1), test.sum(1)


def covariance_rules(held: torch.Tensor, test: torch.Tensor, name: str) -> dict[str, torch.Tensor]:
    """GLS and Mahalanobis combinations of z-scored terms ``(N, k)`` with their held-out covariance."""
    cov = torch.cov(held.T.double()) + 1e-6 * torch.eye(held.shape[1], dtype=torch.float64)
    precision = torch.linalg.inv(cov)
    test, positive = test.double(), test.double().clamp_min(0)
    return {
        f"GLS {name}": (test @ (precision @ torch.ones(held.shape[1], dtype=torch.float64))).float(),
        f"Mahalanobis {name}": torch.einsum("ni,ij,nj->n", test, precision, test).float(),
        f"Mahalanobis of positive parts {name}": torch.einsum("ni,ij,nj->n", positive, precision, positive).float(),
    }


def record_of(data, seed: int, frac: float) -> dict:
    """AUROC of every combination of z(P), z(L), z(M')."""
    terms, _, _ = terms_of(data, seed, frac)
    raw = {"P": pooled_term(data, seed, frac), "L": terms["L"], "M'": terms["M'"]}
    held = {name: zscore(h, h) for name, (h, _t) in raw.items()}
    test = {name: zscore(t, h) for name, (h, t) in raw.items()}
    local = test["L"] + test["M'"]
    scores = {"L + M' (default)": local, "P + L + M' (combined)": local + test["P"]}
    for name, tail in GAUSSIAN_TAILS.items():
        scores[f"L + M' + relu(P - {name})"] = local + (test["P"] - tail).clamp_min(0)
    scores["L + M' + relu(P - held-out max)"] = local + (test["P"] - held["P"].max()).clamp_min(0)
    # all three terms: for two z-scored terms GLS is their plain sum (equal variances make Σ⁻¹1 ∝ 1)
    stacked = [torch.stack([split[n] for n in ("P", "L", "M'")], 1) for split in (held, test)]
    scores.update(covariance_rules(*stacked, "P L M'"))
    scores["max(L, P) + M'"] = torch.maximum(test["L"], test["P"]) + test["M'"]
    return auroc_record(data, scores)


def main(argv: list[str] | None = None) -> int:
    return run_study(argv, __doc__, "docs/local_evidence/score_combination", record_of)


if __name__ == "__main__":
    raise SystemExit(main())
