"""Shrink each regional map Gaussian towards the map's pooled covariance instead of a scaled identity? (issue #14)

Every map level has a 12 × 12 grid of regional Gaussians (``map_regions``). At 200 training images a region of
level 4 or 5 sees one or two positions per image, a few hundred samples for 80-112 dimensions, and Ledoit-Wolf
shrinks its covariance towards ``μI``: correlations between channels are shrunk away with the noise. Each region
could instead borrow from the other 143: shrink towards the *pooled within-region covariance* ``T`` (every
position of every image about its own region's mean), the classic target of a hierarchical (empirical Bayes)
model. On an unaligned texture the regions differ in noise only and the weight goes to ``T`` (many times the
samples); on an aligned part they keep what is their own.

The weight is Ledoit-Wolf's with the target swapped: ``α_r = Σ Var(s_ij) / ‖S_r − T‖²_F`` (Schäfer & Strimmer's
form; the numerator, the estimated variance of the empirical covariance's entries, does not depend on the target
and comes from the same streamed moments), clipped to [0, 1]. ``T`` has all the positions' samples and gets its own
(small) Ledoit-Wolf shrinkage towards ``μI``. Variants:

* ``lw`` the package's Ledoit-Wolf towards ``μI`` per region (default);
* ``pooled`` the above, towards ``T``;
* ``tied`` ``T`` for every region (regional means, one covariance);
* ``lw_min0.3`` Ledoit-Wolf towards ``μI`` with its weight at least 0.3, ``identity`` with weight 1 (a scaled
  Euclidean distance to the region's mean): is the default's shrinkage too weak?

Each is applied to both map Gaussians of the default heatmap (the 3 × 3-averaged map of levels 3-5 and the detail
map of level 3). Reported: pixel AUROC of the averaged map alone and of the default heatmap
(``max(s_avg, s_det) + relu(s_layout − 1)``), image AUROC of the map term M' and of the default score
``z(L) + z(M')``. Protocol of the layout studies (20 % held out: tails and z-scores from the 80 % fit; test images
scored after the refit on all training images).

    PYTHONPATH=src:benchmarks python benchmarks/covariance_target_study.py --tag n200 \
        --out docs/local_evidence/covariance_target
    PYTHONPATH=src:benchmarks python benchmarks/covariance_target_study.py --cache /work/data/cache/full --tag full \
        --datasets magnetic_tile,bsdata,elpv_mono,elpv_poly,kolektorsdd --out docs/local_evidence/covariance_target
    python benchmarks/covariance_target_study.py --table docs/local_evidence/covariance_target
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import numpy as np
import torch

from anomalib_gaussft.gaussft.gaussian import ledoit_wolf_from_moments, robust_cholesky
from layout_map_study import AVERAGED, DETAIL, held_out_protocol
from layout_scale_study import mean_std_table, run_study, seed_runs
from local_evidence_study import (
    MapConfig,
    UnitScorer,
    auroc,
    fit_units,
    full_map,
    topk_mean,
    unit_maps,
    zscore,
)
from multiscale_map_study import pixel_tail

TARGETS = ("lw", "pooled", "tied", "lw_min0.3", "identity")


def entry_variance_sum(acc: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per group: (Σ_ij estimated Var(s_ij) of the empirical covariance, Σ_k ‖x_k − m‖⁴), Ledoit-Wolf's numerator.

    The centred fourth moment is expanded from the streamed moments as in ``ledoit_wolf_from_moments``.
    """
    n = acc["count"]
    mean = acc["sum_x"] / n[:, None]
    empirical = acc["sum_outer"] / n[:, None, None] - mean[:, :, None] * mean[:, None, :]
    c = (mean * mean).sum(-1)
    sum_a = torch.diagonal(acc["sum_outer"], dim1=-2, dim2=-1).sum(-1)
    sum_b = (acc["sum_x"] * mean).sum(-1)
    sum_b2 = torch.einsum("gi,gij,gj->g", mean, acc["sum_outer"], mean)
    sum_ab = (acc["sum_sq_norm_x"] * mean).sum(-1)
    fourth = acc["sum_sq_norm_sq"] - 4 * sum_ab + 4 * sum_b2 + 2 * c * sum_a - 4 * c * sum_b + n * c * c
    return (fourth / n - (empirical * empirical).sum((-2, -1))) / n, fourth


def fit_towards(scorer: UnitScorer, target: str) -> None:
    """Fit the scorer's Gaussian (accumulated) with its covariances shrunk towards ``target`` (module docstring)."""
    g = scorer.g
    acc = g.accumulators()
    moments = {k: v for k, v in acc.items() if k != "shift"}
    mean, empirical, shrunk, shrinkage = ledoit_wolf_from_moments(**moments)
    if target.startswith("lw_min") or target == "identity":
        floor = 1.0 if target == "identity" else float(target.removeprefix("lw_min"))
        alpha = shrinkage.clamp_min(floor)
        mu = torch.diagonal(empirical, dim1=-2, dim2=-1).mean(-1)
        eye = torch.eye(g.dim, dtype=torch.float64)
        shrunk = (1 - alpha)[:, None, None] * empirical + (alpha * mu)[:, None, None] * eye
        g.alpha_mean = float(shrinkage.mean())
    elif target != "lw":
        n = acc["count"]
        pooled = (n[:, None, None] * empirical).sum(0) / n.sum()
        variance_sum, fourth = entry_variance_sum(acc)
        # the pooled covariance's own Ledoit-Wolf shrinkage towards μI, from the pooled moments
        total = n.sum()
        dim = pooled.shape[-1]
        mu = torch.diagonal(pooled).mean()
        pooled_beta = (fourth.sum() / total - (pooled * pooled).sum()) / total
        eye = torch.eye(dim, dtype=pooled.dtype)
        pooled_alpha = (pooled_beta / ((pooled - mu * eye) ** 2).sum()).clamp(0, 1)
        pooled = (1 - pooled_alpha) * pooled + pooled_alpha * mu * eye
        if target == "tied":
            shrunk = pooled.expand_as(empirical).clone()
        else:
            distance = ((empirical - pooled) ** 2).sum((-2, -1))
            alpha = (variance_sum / distance.clamp_min(1e-300)).clamp(0, 1)
            shrunk = (1 - alpha)[:, None, None] * empirical + alpha[:, None, None] * pooled
            g.alpha_mean = float(alpha.mean())
    factor, _ = robust_cholesky(shrunk)
    identity = torch.eye(g.dim, dtype=torch.float64).expand_as(factor)
    g.mean.copy_((mean + acc["shift"]).float())
    g.whitening.copy_(torch.linalg.solve_triangular(factor, identity, upper=False).float())
    g.num_samples.fill_(int(acc["count"].min()))
    g.reset()


def maps_of(data, cfg: MapConfig, fit_idx: np.ndarray, held, target: str, sigma: float = 4.0):
    """(held-out maps from the 80 % fit, test maps from the refit on all training images), 224 px, blurred."""
    fit_scorer = partial(fit_towards, target=target)
    fitted = fit_units(data.train, fit_idx, cfg, fit_scorer)
    held_map = full_map(unit_maps(held, cfg, fitted), sigma)
    alphas = [getattr(s.g, "alpha_mean", float("nan")) for s in fitted]
    refitted = fit_units(data.train, np.arange(len(data.train)), cfg, fit_scorer)
    return held_map, full_map(unit_maps(data.test, cfg, refitted), sigma), alphas


def record_of(data, seed: int, frac: float) -> dict:
    """Pixel and image AUROC of every covariance target."""
    fit_idx, held, layout = held_out_protocol(data, seed, frac)
    excess_held, excess_test = layout["excess"]
    layout_h, layout_t = layout["distance"]
    labels = np.asarray(data.labels)
    masks = None if data.masks is None else data.masks.numpy()
    results, alphas = {}, {}
    for target in TARGETS:
        avg_h, avg_t, alpha_avg = maps_of(data, AVERAGED, fit_idx, held, target)
        m_held = topk_mean(pixel_tail(avg_h, avg_h, 0.99) + excess_held, 0.01)
        m_test = topk_mean(pixel_tail(avg_h, avg_t, 0.99) + excess_test, 0.01)
        results[f"{target}: image, M'"] = auroc(labels, m_test.numpy())
        results[f"{target}: image, z(L) + z(M')"] = auroc(
            labels, (zscore(layout_t, layout_h) + zscore(m_test, m_held)).numpy()
        )
        alphas[target] = alpha_avg
        if masks is None:
            continue
        det_h, det_t, _ = maps_of(data, DETAIL, fit_idx, held, target, 2.0)
        heatmap = torch.maximum(pixel_tail(avg_h, avg_t, 0.99), pixel_tail(det_h, det_t, 0.99)) + excess_test
        results[f"{target}: pixel, averaged map"] = auroc(masks, avg_t.numpy())
        results[f"{target}: pixel, default heatmap"] = auroc(masks, heatmap.numpy())
    return {"results": results, "pooled_alpha_mean_per_level": alphas["pooled"]}


def write_table(folder: Path) -> str:
    """Markdown: per measure, one row per covariance target, mean ± std over seeds per set (training images)."""
    runs = seed_runs(folder, lambda _record, rule: rule, lambda r: f"{r['dataset']} ({r['n_train']})")
    measures = ("image, z(L) + z(M')", "image, M'", "pixel, default heatmap", "pixel, averaged map")
    tables = [mean_std_table(m, runs, [f"{t}: {m}" for t in TARGETS], lambda row: row.split(":")[0]) for m in measures]
    return "\n\n".join(tables) + "\n"


def main(argv: list[str] | None = None) -> int:
    return run_study(argv, __doc__, "docs/local_evidence/covariance_target", record_of, write_table)


if __name__ == "__main__":
    raise SystemExit(main())
