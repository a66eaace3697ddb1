"""Does fitting the layout term on slightly shifted copies of each image make it generalise? (issue #14)

The ``local`` image score is ``z(L) + z(M)``: L is one joint Gaussian of level 5 pooled to 3 × 3 (1008 dims on
lite0), fitted on at most a few hundred images, so its covariance rests on shrinkage, and its held-out normals
lie 2-3 × farther than the images it was fitted on (``layout_scale_study.py``). A part is never placed twice
in exactly the same spot, and DFM's BSData score moves by 0.012 when its pooling window moves by one feature
position (``local_evidence.md``, "Why DFM wins on BSData"): the layout vector is sensitive to small shifts.

Candidate (fit-time only; test images are scored unshifted, so the model, its export and its inference cost
would not change): every training image also contributes its level-5 map shifted by a fraction of a feature
position (16 px at 224) before the 3 × 3 pooling; the shifted copies teach the Gaussian the directions along
which normal parts move. ``shift`` is a separable linear interpolation between the map and its copy moved by
one position (replicate padding at the border).

Shift sets (``dy, dx`` in feature positions): ``none`` (the package's L), ``cross0.25`` / ``cross0.5`` (the
four axis shifts), ``grid0.5`` (the 3 × 3 grid of ``{-0.5, 0, 0.5}²``) and ``grid1`` (whole positions). Scored
as each layout alone and as ``z(L') + z(M)``, with the protocol of ``layout_scale_study.py`` (held-out 20 %
fix the z-scores with Gaussians on the other 80 %; the test images are scored by Gaussians refitted on all).

Two normal-only signals are recorded beside the AUROCs, to see whether either could choose a shift set per data
set: each layout's held-out negative log-likelihood (``held_out_nll``: mean ``(d² + log det Σ) / 2`` of the
held-out normals under the 80 % fit) and ``cell_contrast``, how much the training images' mean layout differs
between cells relative to how much images differ per cell (≈ 0 for a stationary texture).

    PYTHONPATH=src:benchmarks python benchmarks/layout_shift_study.py --tag n200 --out docs/local_evidence/layout_shift
    PYTHONPATH=src:benchmarks python benchmarks/layout_shift_study.py --cache /work/data/cache/full --tag full \
        --datasets magnetic_tile,bsdata,elpv_mono,elpv_poly,kolektorsdd --out docs/local_evidence/layout_shift
    python benchmarks/layout_shift_study.py --table docs/local_evidence/layout_shift
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812

from anomalib_gaussft.gaussft.gaussian import StreamingGaussian
from layout_scale_study import map_term, run_study
from local_evidence_study import auroc, chunks, held_out_split, zscore

LEVEL, GRID = 5, 3  # the package's layout term
SHIFTS: dict[str, list[tuple[float, float]]] = {
    "none": [(0.0, 0.0)],
    "cross0.25": [(0.0, 0.0), (0.25, 0.0), (-0.25, 0.0), (0.0, 0.25), (0.0, -0.25)],
    "cross0.5": [(0.0, 0.0), (0.5, 0.0), (-0.5, 0.0), (0.0, 0.5), (0.0, -0.5)],
    "grid0.5": [(dy, dx) for dy in (-0.5, 0.0, 0.5) for dx in (-0.5, 0.0, 0.5)],
    "grid1": [(dy, dx) for dy in (-1.0, 0.0, 1.0) for dx in (-1.0, 0.0, 1.0)],
}


def shift_axis(x: torch.Tensor, d: float, dim: int) -> torch.Tensor:
    """``x`` moved by ``d`` ∈ [-1, 1] positions along ``dim`` (linear interpolation, replicate padding)."""
    if d == 0:
        return x
    n = x.shape[dim]
    padded = torch.cat([x.narrow(dim, 0, 1), x, x.narrow(dim, n - 1, 1)], dim)
    moved = padded.narrow(dim, 1 - int(np.sign(d)), n)  # content moves by one position in the sign of d
    return (1 - abs(d)) * x + abs(d) * moved


def layout_vectors(maps: torch.Tensor, shift: tuple[float, float]) -> torch.Tensor:
    """``(n, C · 9)`` layout vectors of level-5 maps ``(n, C, H, W)`` shifted by ``(dy, dx)``."""
    moved = shift_axis(shift_axis(maps, shift[0], 2), shift[1], 3)
    return F.adaptive_avg_pool2d(moved, GRID).flatten(1)


def shifted_layout_distances(train, fit_idx: np.ndarray, splits: list, shifts: list[tuple[float, float]]):
    """Distances of each split's unshifted layout vectors to a Gaussian fitted on ``fit_idx`` under ``shifts``."""
    maps = train.maps[LEVEL]
    gaussian = StreamingGaussian(1, maps.shape[1] * GRID * GRID)
    fit = torch.as_tensor(fit_idx)
    for sl in chunks(len(fit)):
        batch = maps[fit[sl]]
        for shift in shifts:
            gaussian.update(layout_vectors(batch, shift)[:, None])
    gaussian.fit()
    log_det = -2 * torch.log(torch.diagonal(gaussian.whitening[0].double())).sum()
    out = []
    for split in splits:
        d = [
            gaussian.squared_mahalanobis(layout_vectors(split.maps[LEVEL][sl], (0.0, 0.0))[:, None])
            for sl in chunks(len(split))
        ]
        out.append(torch.cat(d)[:, 0].clamp_min(0).sqrt())
    return out, float(log_det)


def cell_contrast(train) -> float:
    """How much the mean layout differs between the 3 × 3 cells, relative to how much images differ per cell.

    The variance over cells of the training images' mean layout vector over the variance over images of each
    cell (both averaged over channels): a normal-only test of whether the images share a layout (a stationary
    texture or a part imaged anywhere ≈ 0).
    """
    x = F.adaptive_avg_pool2d(train.maps[LEVEL].double(), GRID).flatten(2)  # (n, C, 9)
    return float(x.mean(0).var(1).mean() / x.var(0).mean())


def evaluate(data, seed: int, frac: float) -> tuple[dict[str, float], dict[str, float]]:
    """AUROC of every layout alone and with M; the held-out/fit median distance ratio of every layout."""
    fit_idx, held_idx = held_out_split(len(data.train), frac, seed)
    held, fitted = data.train.take(held_idx), data.train.take(fit_idx)
    all_idx = np.arange(len(data.train))
    m_held, m_test = map_term(data, fit_idx, held)
    labels = np.asarray(data.labels)
    results = {"M": auroc(labels, m_test.numpy())}
    gaps, nll = {}, {}
    for name, shifts in SHIFTS.items():
        (held_d, fit_d), log_det = shifted_layout_distances(data.train, fit_idx, [held, fitted], shifts)
        (test_d,), _ = shifted_layout_distances(data.train, all_idx, [data.test], shifts)
        nll[name] = float(0.5 * (held_d.double() ** 2).mean() + 0.5 * log_det)
        results[f"L[{name}]"] = auroc(labels, test_d.numpy())
        score = zscore(test_d, held_d) + zscore(m_test, m_held)
        results[f"L[{name}] + M"] = auroc(labels, score.numpy())
        gaps[name] = float(held_d.median() / fit_d.median())
    return results, gaps, nll


def record_of(data, seed: int, frac: float) -> dict:
    """AUROCs, and the normal-only signals that might choose a shift set: held-out/fit ratio, NLL, cell contrast."""
    results, gaps, nll = evaluate(data, seed, frac)
    return {
        "results": results,
        "layout_held_over_fit_median": gaps,
        "held_out_nll": nll,
        "cell_contrast": cell_contrast(data.train),
    }


def main(argv: list[str] | None = None) -> int:
    return run_study(argv, __doc__, "docs/local_evidence/layout_shift", record_of)


if __name__ == "__main__":
    raise SystemExit(main())
