"""Issue #14 design study: sharper GaussFT heatmaps and image scores with local evidence, on cached features.

Reads the frozen lite0 features cached by ``local_evidence_features.py`` (one backbone pass per image) and
evaluates GaussFT design variants with the package's own ``StreamingGaussian`` (streamed float64 moments,
Ledoit-Wolf) and ``AnomalyMapGenerator`` (bilinear upsampling to 224 px, level average, Gaussian blur).

Protocol, per set and seed:

* training images: the 200 (textures: 100) the baselines use. A seeded 20 % of them is held out
  (``H``, normal images only); every Gaussian of a variant is fitted on the other 80 % (``F``). The reference
  "default" is also fitted on all training images (``default_all``), as the shipped model does.
* anything a variant normalises or combines is estimated on ``H`` only (scores of held-out normals). No test
  image, and no anomaly, chooses a weight, threshold or normalisation. One configuration for every set.
* metrics: image AUROC (sklearn) on the raw score; pixel AUROC of the raw 224-px map against the masks
  (nearest-resized to 224 px) where masks exist — as compare.py computes them.

Map variants (``--map-variants`` names, see ``MAP_VARIANTS``): map levels, PatchCore-style ``k x k`` local
average of the feature maps before the Gaussian, one Gaussian per level ("sep") or one on the levels
concatenated at stride 8 ("cat", finer levels average-pooled, coarser ones upsampled), shared, per-position or
per-region ("regionR": an R x R grid of blocks of positions) Gaussians, Mahalanobis or a
DFM-like PCA residual, per-level normalisation by the held-out normals' map distribution (``none``: the
package's ``sqrt(d²/C)``; ``z``: ``(m - mean_H) / std_H`` over every held-out position; ``q``: divided by the
held-out 99.9 % quantile), blur sigma.

Image-score variants: the pooled sum (paper), statistics of the map (max, mean of the top fraction of pixels,
``--top-fractions``; z-scored per-level maxima ``lvlz``), coarse spatial-grid Gaussians of a deep level
(adaptive-avg-pooled to g x g: one Gaussian per cell, one shared by the cells, or one "joint" Gaussian of the
concatenated cells = the image's coarse layout, also as a DFM-like PCA residual ``jointfre``; see
``GRID_VARIANTS``), and their combinations on a common scale estimated on ``H``: sum of z-scores, max of
z-scores, or Fisher's sum of ``-log`` Gaussian tail p-values of those z-scores; three-way z-sums of the pooled
sum, a grid and a map statistic. ``--refit``: the test images are scored by Gaussians refitted on all
training images (the held-out normals still give the constants from the 80 % fit).

Example (the exact variant lists of every run are in docs/local_evidence/commands.sh; results in
``OUT/<tag>_<set>_seed<k>.json``)::

    PYTHONPATH=src nice -n 10 python benchmarks/local_evidence_study.py --seeds 0,1,2 --tag focus \
        --map-variants m_default,m_pp,m_r7 --grid-variants g_l5_3j \
        --cache /work/data/cache/local_evidence --out docs/local_evidence
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812

from anomalib_gaussft.gaussft.anomaly_map import AnomalyMapGenerator
from anomalib_gaussft.gaussft.feature_samples import neighbourhood_average
from anomalib_gaussft.gaussft.gaussian import StreamingGaussian
from anomalib_gaussft.gaussft.regions import region_index as package_region_index

CHUNK = 32
IMAGE = (224, 224)


# ------------------------------------------------------------------------------------------------------------
# Metrics
# ------------------------------------------------------------------------------------------------------------


def auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Exact AUROC = P(s+ > s-) + P(s+ = s-) / 2 (equals sklearn's roc_auc_score, ties included).

    Sorts the negatives' scores once and places every positive with two binary searches: far faster than
    ranking all scores when there are millions of pixels.
    """
    labels = np.asarray(labels).reshape(-1).astype(bool)
    scores = np.asarray(scores).reshape(-1)
    n_pos = int(labels.sum())
    n_neg = labels.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    neg = np.sort(scores[~labels])
    pos = scores[labels]
    below = np.searchsorted(neg, pos, side="left").astype(np.float64)
    at_or_below = np.searchsorted(neg, pos, side="right").astype(np.float64)
    return float((below.sum() + 0.5 * (at_or_below - below).sum()) / (n_pos * n_neg))


# ------------------------------------------------------------------------------------------------------------
# Data
# ------------------------------------------------------------------------------------------------------------


@dataclass
class Split:
    pooled: dict[int, torch.Tensor]
    maps: dict[int, torch.Tensor]

    def take(self, index: torch.Tensor | np.ndarray) -> Split:
        index = torch.as_tensor(index)
        return Split({k: v[index] for k, v in self.pooled.items()}, {k: v[index] for k, v in self.maps.items()})

    def __len__(self) -> int:
        return len(next(iter(self.pooled.values())))


@dataclass
class SetData:
    name: str
    train: Split
    test: Split
    labels: np.ndarray
    masks: torch.Tensor | None
    train_paths: list[str] | None = None  # the cached training images' paths (the package's held-out split reads them)
    test_paths: list[str] | None = None  # the cached test images' paths (their folder names the defect type)


def load_set(cache: Path, name: str) -> SetData:
    record = torch.load(cache / f"{name}.pt", weights_only=False)
    train = Split(record["train"]["pooled"], record["train"]["maps"])
    test = Split(record["test"]["pooled"], record["test"]["maps"])
    paths = [None if (p := record[part].get("paths")) is None else [str(x) for x in p] for part in ("train", "test")]
    labels, masks = record["test"]["labels"].numpy(), record["test"].get("masks")
    return SetData(name, train, test, labels, masks, *paths)


def pending_runs(cache: Path, datasets: str, seeds: str, out: Path, tag: str):
    """``(data, seed, target)`` for every set × seed whose result file ``OUT/<tag>_<set>_seed<k>.json`` is missing
    (each set loaded once, only when one of its seeds is pending)."""
    for name in [d for d in datasets.split(",") if d]:
        data = None
        for seed in [int(s) for s in seeds.split(",")]:
            target = out / f"{tag}_{name}_seed{seed}.json"
            if target.is_file():
                print(f"{name} seed {seed}: done", flush=True)
                continue
            data = load_set(cache, name) if data is None else data
            yield data, seed, target


def held_out_split(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    order = np.random.default_rng(1000 + seed).permutation(n)
    n_held = max(2, round(fraction * n))
    return np.sort(order[n_held:]), np.sort(order[:n_held])


# ------------------------------------------------------------------------------------------------------------
# Gaussians on feature maps
# ------------------------------------------------------------------------------------------------------------


def chunks(n: int, size: int = CHUNK):
    for start in range(0, n, size):
        yield slice(start, min(n, start + size))


def local_average(x: torch.Tensor, k: int) -> torch.Tensor:
    """PatchCore-style k x k neighbourhood average: the package's ``map_neighbourhood`` operation."""
    return neighbourhood_average(x, k)


@dataclass(frozen=True)
class MapConfig:
    levels: tuple[int, ...] = (3, 4, 5)
    k: int = 1  # local average kernel
    unit: str = "sep"  # "sep": one Gaussian per level; "cat": levels concatenated at the finest resolution
    gaussian: str = "shared"  # "shared" | "per_position" | "regionR" (R x R blocks of positions)
    score: str = "maha"  # "maha" | "fre" (DFM-like PCA residual, 97 % of the variance kept)

    def fit_key(self) -> tuple:
        return (self.levels, self.k, self.unit, self.gaussian, self.score)


def unit_features(split: Split, cfg: MapConfig, index: slice) -> list[torch.Tensor]:
    """Feature maps ``(n, C, h, w)`` of each scoring unit for images ``index``."""
    maps = [local_average(split.maps[lvl][index], cfg.k) for lvl in cfg.levels]
    if cfg.unit == "sep":
        return maps
    # concatenated at stride 8 (28 x 28 at 224 px): finer levels are average-pooled, coarser ones upsampled
    size = (IMAGE[0] // 8, IMAGE[1] // 8)
    same = []
    for m in maps:
        if m.shape[-2] > size[0]:
            m = F.adaptive_avg_pool2d(m, size)
        elif m.shape[-2] < size[0]:
            m = F.interpolate(m, size=size, mode="bilinear", align_corners=False)
        same.append(m)
    return [torch.cat(same, 1)]


def region_grid(mode: str, h: int, w: int) -> tuple[int, int]:
    """Number of Gaussians along each side: shared (1 x 1), per position (h x w) or ``regionR`` (R x R)."""
    if mode == "shared":
        return 1, 1
    if mode == "per_position":
        return h, w
    if mode.startswith("region"):
        r = int(mode.removeprefix("region"))
        return min(r, h), min(r, w)
    raise ValueError(mode)


class UnitScorer:
    """A fitted map Gaussian (or PCA residual) for one unit: shared, per position, or per region.

    ``regionR``: the feature map is cut into an R x R grid of equal blocks of positions and every block has
    its own Gaussian, fitted on all positions of that block in all training images (per-position when the
    map is R x R itself, shared when R = 1).
    """

    def __init__(self, dim: int, h: int, w: int, mode: str, score: str) -> None:
        self.gh, self.gw = region_grid(mode, h, w)
        # Unequal blocks (e.g. 10 regions on a 28-wide map): the package's own region assignment.
        self.index = None if not (h % self.gh or w % self.gw) else package_region_index(h, w, (self.gh, self.gw))
        self.g = StreamingGaussian(self.gh * self.gw, dim)
        self.score = score
        self.dim = dim

    def samples(self, x: torch.Tensor) -> torch.Tensor:
        """``(n, C, h, w)`` → ``(n * bh * bw, gh * gw, C)`` (block-major positions)."""
        n, c, h, w = x.shape
        if self.index is not None:
            return x.reshape(n, c, h * w).transpose(1, 2)
        bh, bw = h // self.gh, w // self.gw
        x = x.reshape(n, c, self.gh, bh, self.gw, bw).permute(0, 3, 5, 2, 4, 1)
        return x.reshape(n * bh * bw, self.gh * self.gw, c)

    def unsample(self, values: torch.Tensor, n: int, h: int, w: int) -> torch.Tensor:
        """``(n * bh * bw, gh * gw)`` → ``(n, h, w)``."""
        if self.index is not None:
            return values.reshape(n, h, w)
        bh, bw = h // self.gh, w // self.gw
        v = values.reshape(n, bh, bw, self.gh, self.gw).permute(0, 3, 1, 4, 2)
        return v.reshape(n, h, w)

    def update(self, x: torch.Tensor) -> None:
        self.g.update(self.samples(x), group_index=self.index)

    def fit(self) -> None:
        est = self.g.fit()
        self.g.reset()
        if self.score == "fre":
            cov = est["empirical"][0]
            evals, evecs = torch.linalg.eigh(cov)
            evals, evecs = evals.flip(0), evecs.flip(1)
            frac = torch.cumsum(evals, 0) / evals.sum()
            k = int(torch.searchsorted(frac, torch.tensor(0.97, dtype=frac.dtype)).item()) + 1
            self.basis = evecs[:, :k].float()  # (C, k)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """``sqrt(d² / C)`` per position, ``(n, h, w)``."""
        n, c, h, w = x.shape
        s = self.samples(x)
        if self.score == "fre":
            centred = s - self.g.mean
            recon = (centred @ self.basis) @ self.basis.T
            sq = ((centred - recon) ** 2).sum(-1)
        else:
            sq = self.g.squared_mahalanobis(s, group_index=self.index)
        return self.unsample(torch.sqrt(sq.clamp_min(0) / c), n, h, w)

    def n_floats(self) -> int:
        """Stored statistics (mean + whitening), floats."""
        return self.g.groups * (self.dim + self.dim * self.dim)


def fit_units(
    train: Split, fit_idx: np.ndarray, cfg: MapConfig, fit_scorer: Callable[[UnitScorer], None] = UnitScorer.fit
) -> list[UnitScorer]:
    """Map scorers of ``cfg`` fitted on ``train[fit_idx]`` (``fit_scorer`` turns each one's accumulated moments
    into its Gaussians)."""
    fit_split = train.take(fit_idx)
    scorers: list[UnitScorer] | None = None
    for sl in chunks(len(fit_split)):
        feats = unit_features(fit_split, cfg, sl)
        if scorers is None:
            scorers = [UnitScorer(f.shape[1], f.shape[-2], f.shape[-1], cfg.gaussian, cfg.score) for f in feats]
        for scorer, f in zip(scorers, feats, strict=True):
            scorer.update(f)
    assert scorers is not None
    for scorer in scorers:
        fit_scorer(scorer)
    return scorers


def unit_maps(split: Split, cfg: MapConfig, scorers: list[UnitScorer]) -> list[torch.Tensor]:
    out: list[list[torch.Tensor]] = [[] for _ in scorers]
    for sl in chunks(len(split)):
        for i, (scorer, f) in enumerate(zip(scorers, unit_features(split, cfg, sl), strict=True)):
            out[i].append(scorer(f))
    return [torch.cat(o) for o in out]


def normalise(maps: list[torch.Tensor], ref: list[torch.Tensor], how: str) -> list[torch.Tensor]:
    if how == "none":
        return maps
    out = []
    for m, r in zip(maps, ref, strict=True):
        if how == "z":
            out.append((m - r.mean()) / r.std().clamp_min(1e-12))
        elif how == "q":
            q = torch.quantile(r.flatten()[:: max(1, r.numel() // 2_000_000)], 0.999)
            out.append(m / q.clamp_min(1e-12))
        else:
            raise ValueError(how)
    return out


_BLUR: dict[tuple[float, int], torch.Tensor] = {}


def blur_matrix(sigma: float, n: int) -> torch.Tensor:
    """``(n, n)`` matrix ``B`` with ``x @ B`` = 1-D Gaussian blur of anomalib's ``GaussianBlur2d`` along the last
    axis (kernel ``2*int(4*sigma+0.5)+1``, normalised, reflect padding)."""
    key = (sigma, n)
    if key not in _BLUR:
        size = 2 * int(4.0 * sigma + 0.5) + 1
        pad = size // 2
        t = torch.arange(size, dtype=torch.float64) - pad
        k = torch.exp(-(t**2) / (2 * sigma**2))
        k = k / k.sum()
        mat = torch.zeros(n, n, dtype=torch.float64)
        for j in range(n):
            for i in range(size):
                src = j + i - pad
                if src < 0:
                    src = -src
                if src > n - 1:
                    src = 2 * (n - 1) - src
                mat[src, j] += k[i]
        _BLUR[key] = mat.float()
    return _BLUR[key]


def separable_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """anomalib's ``GaussianBlur2d`` (what GaussFT's AnomalyMapGenerator applies) as two matrix products: the
    same numbers (its 2-D kernel is the outer product of the 1-D one), a fraction of the work on a CPU."""
    if sigma <= 0:
        return x
    h, w = x.shape[-2:]
    return blur_matrix(sigma, h).T @ x @ blur_matrix(sigma, w)


def full_map(unit: list[torch.Tensor], sigma: float) -> torch.Tensor:
    """(N, 224, 224): upsample every unit map (bilinear), average, blur — the package's AnomalyMapGenerator,
    with the blur computed separably (checked equal to it by ``--check-blur``)."""
    out = []
    for sl in chunks(len(unit[0]), 64):
        up = [F.interpolate(u[sl][:, None], size=IMAGE, mode="bilinear", align_corners=False) for u in unit]
        out.append(separable_blur(torch.stack(up, 0).mean(0), sigma)[:, 0])
    return torch.cat(out)


def check_blur() -> None:
    torch.manual_seed(0)
    units = [torch.rand(3, 28, 28) * 3, torch.rand(3, 14, 14) * 2]
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(0)
    y = rng.random(100_000) < 0.01
    x = np.round(rng.normal(size=y.size) + y, 2)  # with ties
    print(f"auroc {auroc(y, x):.12f} sklearn {roc_auc_score(y, x):.12f}")
    assert abs(auroc(y, x) - roc_auc_score(y, x)) < 1e-12
    for sigma in (2.0, 4.0, 8.0):
        ref = AnomalyMapGenerator(sigma=sigma)([u[:, None] for u in units], IMAGE)[:, 0]
        ours = full_map(units, sigma)
        err = (ref - ours).abs().max().item()
        print(f"sigma {sigma}: max |package - separable| = {err:.2e} (map range {ref.min():.2f}..{ref.max():.2f})")
        assert err < 1e-4


def topk_mean(maps: torch.Tensor, fraction: float) -> torch.Tensor:
    flat = maps.reshape(len(maps), -1)
    k = max(1, round(fraction * flat.shape[1]))
    return flat.topk(k, dim=1).values.mean(1)


# ------------------------------------------------------------------------------------------------------------
# Image-level Gaussians
# ------------------------------------------------------------------------------------------------------------


def pooled_distances(train: Split, fit_idx: np.ndarray, others: list[Split], levels=tuple(range(9))):
    """Per-level pooled Mahalanobis distances ``(N, L)`` of each split in ``others``."""
    out = [[] for _ in others]
    for lvl in levels:
        x = train.pooled[lvl][torch.as_tensor(fit_idx)]
        g = StreamingGaussian(1, x.shape[1])
        g.update(x[:, None])
        g.fit()
        for i, split in enumerate(others):
            out[i].append(torch.sqrt(g.squared_mahalanobis(split.pooled[lvl][:, None]).clamp_min(0))[:, 0])
    return [torch.stack(o, 1) for o in out]


def grid_distances(train: Split, fit_idx: np.ndarray, others: list[Split], level: int, grid: int, mode: str):
    """Distances ``(N, cells)`` of ``level`` adaptive-avg-pooled to ``grid x grid``.

    ``mode``: ``cell`` (one Gaussian per cell), ``shared`` (one Gaussian for all cells), ``joint`` (one
    Gaussian of the concatenated cells, ``C * g²`` dims: the image's coarse layout; one distance) or
    ``jointfre`` (DFM's statistic on that vector: squared residual outside the principal subspace holding 97 %
    of the variance).
    """

    def cells(split: Split, index) -> torch.Tensor:
        x = F.adaptive_avg_pool2d(split.maps[level][index], grid)  # (n, C, g, g)
        n, c = x.shape[:2]
        if mode in ("joint", "jointfre", "jointstd"):
            x = x.reshape(n, 1, c * grid * grid)
            return (x - scale[0]) / scale[1] if mode == "jointstd" else x
        x = x.reshape(n, c, grid * grid).transpose(1, 2)  # (n, g², C)
        return x.reshape(n * grid * grid, 1, c) if mode == "shared" else x

    c = train.maps[level].shape[1]
    scale = (0.0, 1.0)
    if mode == "jointstd":  # shrink the correlation matrix, not the covariance: a per-dimension variance target
        ref = torch.cat([cells(train, torch.as_tensor(fit_idx)[sl]) for sl in chunks(len(fit_idx))]).double()
        scale = (ref.mean(0).float(), ref.std(0).clamp_min(1e-6).float())
    groups, dim = {"cell": (grid * grid, c), "shared": (1, c)}.get(mode, (1, c * grid * grid))
    g = StreamingGaussian(groups, dim)
    fit = torch.as_tensor(fit_idx)
    for sl in chunks(len(fit)):
        g.update(cells(train, fit[sl]))
    est = g.fit()
    basis = None
    if mode == "jointfre":
        evals, evecs = torch.linalg.eigh(est["empirical"][0])
        evals, evecs = evals.flip(0), evecs.flip(1)
        frac = torch.cumsum(evals, 0) / evals.sum()
        k = int(torch.searchsorted(frac, torch.tensor(0.97, dtype=frac.dtype)).item()) + 1
        basis = evecs[:, :k].float()
    out = []
    for split in others:
        res = []
        for sl in chunks(len(split)):
            n = len(range(*sl.indices(len(split))))
            x = cells(split, sl)
            if basis is not None:
                centred = x - g.mean
                sq = ((centred - (centred @ basis) @ basis.T) ** 2).sum(-1)
            else:
                sq = g.squared_mahalanobis(x)
            res.append(torch.sqrt(sq.clamp_min(0)).reshape(n, -1))
        out.append(torch.cat(res))
    return out


def zscore(score: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """``(score - mean) / std`` with the held-out normals' mean and std (per column for ``(N, L)``)."""
    return (score - ref.mean(0)) / ref.std(0).clamp_min(1e-12)


def gauss_tail_logp(z: torch.Tensor) -> torch.Tensor:
    """-log P(Z >= z) for a standard normal (numerically stable)."""
    z64 = z.double()
    return -torch.special.log_ndtr(-z64)


# ------------------------------------------------------------------------------------------------------------
# Variants
# ------------------------------------------------------------------------------------------------------------

# map statistics for the image score: mean of the top fraction of the 224 x 224 map's pixels
TOP_FRACTIONS: dict[str, float] = {"top1": 0.01}

# name -> (MapConfig, normalisation, sigma)
MAP_VARIANTS: dict[str, tuple[MapConfig, str, float]] = {
    "m_default": (MapConfig(), "none", 4.0),
    "m_k3": (MapConfig(k=3), "none", 4.0),
    "m_z": (MapConfig(), "z", 4.0),
    "m_q": (MapConfig(), "q", 4.0),
    "m_k3_z": (MapConfig(k=3), "z", 4.0),
    "m_k3_q": (MapConfig(k=3), "q", 4.0),
    "m_l234": (MapConfig(levels=(2, 3, 4)), "none", 4.0),
    "m_l2345": (MapConfig(levels=(2, 3, 4, 5)), "none", 4.0),
    "m_l35": (MapConfig(levels=(3, 5)), "none", 4.0),
    "m_l34": (MapConfig(levels=(3, 4)), "none", 4.0),
    "m_l3": (MapConfig(levels=(3,)), "none", 4.0),
    "m_l2345_z": (MapConfig(levels=(2, 3, 4, 5)), "z", 4.0),
    "m_l2345_k3_z": (MapConfig(levels=(2, 3, 4, 5), k=3), "z", 4.0),
    "m_l234_k3_z": (MapConfig(levels=(2, 3, 4), k=3), "z", 4.0),
    "m_pp": (MapConfig(gaussian="per_position"), "none", 4.0),
    "m_pp_k3_z": (MapConfig(gaussian="per_position", k=3), "z", 4.0),
    "m_fre": (MapConfig(score="fre"), "z", 4.0),
    "m_fre_k3": (MapConfig(score="fre", k=3), "z", 4.0),
    "m_cat345": (MapConfig(unit="cat"), "none", 4.0),
    "m_cat345_k3": (MapConfig(unit="cat", k=3), "none", 4.0),
    "m_cat35_k3": (MapConfig(levels=(3, 5), unit="cat", k=3), "none", 4.0),
    "m_cat2345_k3": (MapConfig(levels=(2, 3, 4, 5), unit="cat", k=3), "none", 4.0),
    "m_s0": (MapConfig(), "none", 0.0),
    "m_s2": (MapConfig(), "none", 2.0),
    "m_s8": (MapConfig(), "none", 8.0),
    "m_k3_z_s2": (MapConfig(k=3), "z", 2.0),
    "m_k3_z_s8": (MapConfig(k=3), "z", 8.0),
    # regional Gaussians (R x R blocks of positions share one Gaussian)
    "m_r7": (MapConfig(gaussian="region7"), "none", 4.0),
    "m_r14": (MapConfig(gaussian="region14"), "none", 4.0),
    "m_r7_z": (MapConfig(gaussian="region7"), "z", 4.0),
    "m_r14_z": (MapConfig(gaussian="region14"), "z", 4.0),
    "m_r7_l35": (MapConfig(levels=(3, 5), gaussian="region7"), "none", 4.0),
    "m_r14_l35": (MapConfig(levels=(3, 5), gaussian="region14"), "none", 4.0),
    "m_pp_l35": (MapConfig(levels=(3, 5), gaussian="per_position"), "none", 4.0),
    "m_r7_l2345": (MapConfig(levels=(2, 3, 4, 5), gaussian="region7"), "none", 4.0),
    "m_r7_l2345_z": (MapConfig(levels=(2, 3, 4, 5), gaussian="region7"), "z", 4.0),
    "m_r7_k3": (MapConfig(gaussian="region7", k=3), "none", 4.0),
    "m_r7_s2": (MapConfig(gaussian="region7"), "none", 2.0),
    "m_r14_s2": (MapConfig(gaussian="region14"), "none", 2.0),
    "m_pp_s2": (MapConfig(gaussian="per_position"), "none", 2.0),
    "m_pp_z": (MapConfig(gaussian="per_position"), "z", 4.0),
    "m_r7_cat345": (MapConfig(unit="cat", gaussian="region7"), "none", 4.0),
    "m_r7_fre": (MapConfig(gaussian="region7", score="fre"), "z", 4.0),
    "m_pp_k3": (MapConfig(gaussian="per_position", k=3), "none", 4.0),
    "m_r7_k3_z": (MapConfig(gaussian="region7", k=3), "z", 4.0),
    "m_r14_k3": (MapConfig(gaussian="region14", k=3), "none", 4.0),
    "m_r10_k3": (MapConfig(gaussian="region10", k=3), "none", 4.0),
    "m_r12_k3": (MapConfig(gaussian="region12", k=3), "none", 4.0),
    "m_r12_k3_s2": (MapConfig(gaussian="region12", k=3), "none", 2.0),
    "m_r12_k3_l2345": (MapConfig(levels=(2, 3, 4, 5), gaussian="region12", k=3), "none", 4.0),
    "m_r12_k3_l35": (MapConfig(levels=(3, 5), gaussian="region12", k=3), "none", 4.0),
    "m_r14_k3_z": (MapConfig(gaussian="region14", k=3), "z", 4.0),
    "m_r7_cat35_k3": (MapConfig(levels=(3, 5), unit="cat", k=3, gaussian="region7"), "none", 4.0),
    "m_r14_cat35_k3": (MapConfig(levels=(3, 5), unit="cat", k=3, gaussian="region14"), "none", 4.0),
    "m_r7_cat35": (MapConfig(levels=(3, 5), unit="cat", gaussian="region7"), "none", 4.0),
    "m_r7_l3456_k3": (MapConfig(levels=(3, 4, 5, 6), gaussian="region7", k=3), "none", 4.0),
    "m_r7_l35_k3": (MapConfig(levels=(3, 5), gaussian="region7", k=3), "none", 4.0),
    "m_r7_l2345_k3": (MapConfig(levels=(2, 3, 4, 5), gaussian="region7", k=3), "none", 4.0),
    # deeper (stride-32) levels beside the default 3-5: coarse evidence for large defects (Magnetic Tile study)
    "m_r7_l3456": (MapConfig(levels=(3, 4, 5, 6), gaussian="region7"), "none", 4.0),
    "m_r7_l34567": (MapConfig(levels=(3, 4, 5, 6, 7), gaussian="region7"), "none", 4.0),
    "m_r7_l3457": (MapConfig(levels=(3, 4, 5, 7), gaussian="region7"), "none", 4.0),
    "m_r7_l3456_z": (MapConfig(levels=(3, 4, 5, 6), gaussian="region7"), "z", 4.0),
    "m_r7_l567": (MapConfig(levels=(5, 6, 7), gaussian="region7"), "none", 4.0),
    "m_r7_l6": (MapConfig(levels=(6,), gaussian="region7"), "none", 4.0),
    "m_r7_l7": (MapConfig(levels=(7,), gaussian="region7"), "none", 4.0),
    "m_r7_l5": (MapConfig(levels=(5,), gaussian="region7"), "none", 4.0),
    "m_r7_s8": (MapConfig(gaussian="region7"), "none", 8.0),
    "m_r7_l67": (MapConfig(levels=(6, 7), gaussian="region7"), "none", 4.0),
    "m_r7_l3467": (MapConfig(levels=(3, 4, 6, 7), gaussian="region7"), "none", 4.0),
    "m_r7_l34567_k3": (MapConfig(levels=(3, 4, 5, 6, 7), gaussian="region7", k=3), "none", 4.0),
    "m_r7_l567_k3": (MapConfig(levels=(5, 6, 7), gaussian="region7", k=3), "none", 4.0),
    "m_r7_k5": (MapConfig(gaussian="region7", k=5), "none", 4.0),
}

GRID_VARIANTS: dict[str, tuple[int, int, str]] = {  # name -> (level, grid, mode)
    "g_l8_2": (8, 2, "cell"),
    "g_l7_2": (7, 2, "cell"),
    "g_l6_2": (6, 2, "cell"),
    "g_l7_4": (7, 4, "cell"),
    "g_l5_4": (5, 4, "cell"),
    "g_l7_4s": (7, 4, "shared"),
    "g_l5_4s": (5, 4, "shared"),
    "g_l8_4s": (8, 4, "shared"),
    "g_l5_3j": (5, 3, "joint"),
    "g_l6_2j": (6, 2, "joint"),
    "g_l4_3j": (4, 3, "joint"),
    "g_l5_3f": (5, 3, "jointfre"),
    "g_l5_2j": (5, 2, "joint"),
    "g_l5_3s": (5, 3, "jointstd"),
}


def evaluate_set(
    data: SetData, seed: int, map_variants: list[str], grid_variants: list[str], frac: float, refit: bool = False
):
    """All variants of one set and seed → {variant: {metric: value}}.

    ``refit``: the held-out normals are scored by Gaussians fitted on the other 80 % (for normalisation and
    combination statistics), the test images by Gaussians refitted on *all* training images.
    """
    n_train = len(data.train)
    fit_idx, held_idx = held_out_split(n_train, frac, seed)
    all_idx = np.arange(n_train)
    held = data.train.take(held_idx)
    masks = data.masks
    results: dict[str, dict] = {}
    image_scores: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # name -> (held-out scores, test scores)

    # image level: pooled Gaussians fitted on F, and (reference) on all training images
    pooled_h, pooled_t = pooled_distances(data.train, fit_idx, [held, data.test])
    if refit:
        (pooled_t,) = pooled_distances(data.train, all_idx, [data.test])
    image_scores["pool"] = (pooled_h.sum(1), pooled_t.sum(1))
    image_scores["pool_zlev"] = (zscore(pooled_h, pooled_h).sum(1), zscore(pooled_t, pooled_h).sum(1))
    (pooled_all_t,) = pooled_distances(data.train, np.arange(n_train), [data.test])
    results["default_all"] = {"image_auroc": auroc(data.labels, pooled_all_t.sum(1).numpy())}
    if masks is not None:  # the shipped default map (levels 3-5, shared, sigma 4), fitted on all training images
        cfg = MapConfig()
        scorers = fit_units(data.train, np.arange(n_train), cfg)
        map_t = full_map(unit_maps(data.test, cfg, scorers), 4.0)
        results["default_all"]["pixel_auroc"] = auroc(masks.numpy(), map_t.numpy())
        results["default_all"]["image_auroc_max"] = auroc(data.labels, map_t.amax((1, 2)).numpy())
        del map_t
    for lvl in range(9):
        results[f"pool_level{lvl}"] = {"image_auroc": auroc(data.labels, pooled_t[:, lvl].numpy())}

    for name in grid_variants:
        level, grid, mode = GRID_VARIANTS[name]
        gh, gt = grid_distances(data.train, fit_idx, [held, data.test], level, grid, mode)
        if refit:
            (gt,) = grid_distances(data.train, all_idx, [data.test], level, grid, mode)
        image_scores[f"{name}_max"] = (gh.amax(1), gt.amax(1))
        image_scores[f"{name}_mean"] = (gh.mean(1), gt.mean(1))

    fitted: dict[tuple, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
    for name in map_variants:
        t0 = time.perf_counter()
        cfg, norm, sigma = MAP_VARIANTS[name]
        key = cfg.fit_key()
        if key not in fitted:
            scorers = fit_units(data.train, fit_idx, cfg)
            test_scorers = fit_units(data.train, all_idx, cfg) if refit else scorers
            fitted[key] = (unit_maps(held, cfg, scorers), unit_maps(data.test, cfg, test_scorers))
            results[f"stats_floats[{name}]"] = {"n": float(sum(u.n_floats() for u in scorers))}
        held_units, test_units = fitted[key]
        # per-level local evidence: each level's map maximum (feature resolution), z-scored on the held-out
        # normals, summed over levels
        lvl_h = torch.stack([u.amax((1, 2)) for u in held_units], 1)
        lvl_t = torch.stack([u.amax((1, 2)) for u in test_units], 1)
        image_scores[f"{name}_lvlz"] = (zscore(lvl_h, lvl_h).sum(1), zscore(lvl_t, lvl_h).sum(1))
        map_h = full_map(normalise(held_units, held_units, norm), sigma)
        map_t = full_map(normalise(test_units, held_units, norm), sigma)
        row: dict[str, float] = {}
        if masks is not None:
            row["pixel_auroc"] = auroc(masks.numpy(), map_t.numpy())
        image_scores[f"{name}_max"] = (map_h.amax((1, 2)), map_t.amax((1, 2)))
        row["image_auroc_max"] = auroc(data.labels, image_scores[f"{name}_max"][1].numpy())
        for label, fraction in TOP_FRACTIONS.items():
            image_scores[f"{name}_{label}"] = (topk_mean(map_h, fraction), topk_mean(map_t, fraction))
            row[f"image_auroc_{label}"] = auroc(data.labels, image_scores[f"{name}_{label}"][1].numpy())
        results[name] = row
        del map_h, map_t
        print(f"  {data.name} seed {seed} {name}: {row} ({time.perf_counter() - t0:.0f} s)", flush=True)

    for name, (_h, t) in image_scores.items():
        results.setdefault(f"img_{name}", {})["image_auroc"] = auroc(data.labels, t.numpy())

    # combinations of the pooled sum with local evidence, on the held-out normals' scale
    locals_ = [n for n in image_scores if n not in ("pool", "pool_zlev")]
    for base in ("pool", "pool_zlev"):
        bh, bt = image_scores[base]
        zb = zscore(bt, bh)
        for loc in locals_:
            lh, lt = image_scores[loc]
            zl = zscore(lt, lh)
            results[f"comb_z[{base}+{loc}]"] = {"image_auroc": auroc(data.labels, (zb + zl).numpy())}
            fisher = gauss_tail_logp(zb) + gauss_tail_logp(zl)
            results[f"comb_fisher[{base}+{loc}]"] = {"image_auroc": auroc(data.labels, fisher.numpy())}
            results[f"comb_zmax[{base}+{loc}]"] = {"image_auroc": auroc(data.labels, torch.maximum(zb, zl).numpy())}
    grid_names = [n for n in image_scores if n.startswith("g_")]
    map_names = [n for n in image_scores if n.startswith("m_")]
    # the package's "local" score: a layout grid + a map statistic, z-scored on the held-out normals
    for gname, mname in itertools.product(grid_names, map_names):
        (gh, gt), (mh, mt) = image_scores[gname], image_scores[mname]
        zg, zm = zscore(gt, gh), zscore(mt, mh)
        results[f"comb2_z[{gname}+{mname}]"] = {"image_auroc": auroc(data.labels, (zg + zm).numpy())}
        fisher = gauss_tail_logp(zg) + gauss_tail_logp(zm)
        results[f"comb2_fisher[{gname}+{mname}]"] = {"image_auroc": auroc(data.labels, fisher.numpy())}
        results[f"comb2_zmax[{gname}+{mname}]"] = {"image_auroc": auroc(data.labels, torch.maximum(zg, zm).numpy())}
    # three-way: pooled + a grid + a map statistic
    bh, bt = image_scores["pool"]
    for gname, mname in itertools.product(grid_names, map_names):
        z = zscore(bt, bh) + zscore(image_scores[gname][1], image_scores[gname][0])
        z = z + zscore(image_scores[mname][1], image_scores[mname][0])
        results[f"comb3_z[pool+{gname}+{mname}]"] = {"image_auroc": auroc(data.labels, z.numpy())}
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", default="brick,grass,gravel,bsdata,elpv_mono,elpv_poly")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--held-out", type=float, default=0.2)
    parser.add_argument("--map-variants", default=",".join(MAP_VARIANTS))
    parser.add_argument("--grid-variants", default=",".join(GRID_VARIANTS))
    parser.add_argument("--cache", default="/work/data/cache/local_evidence")
    parser.add_argument("--out", default="docs/local_evidence")
    parser.add_argument("--tag", default="study")
    parser.add_argument("--top-fractions", default="top1=0.01", help="map statistics, e.g. top0.1=0.001,top1=0.01")
    parser.add_argument("--refit", action="store_true", help="score test images with Gaussians fitted on all")
    parser.add_argument("--check-blur", action="store_true", help="check the separable blur against the package")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if args.check_blur:
        check_blur()
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    TOP_FRACTIONS.clear()
    TOP_FRACTIONS.update({k: float(v) for k, v in (item.split("=") for item in args.top_fractions.split(","))})
    map_variants = [v for v in args.map_variants.split(",") if v]
    grid_variants = [v for v in args.grid_variants.split(",") if v]
    for data, seed, target in pending_runs(Path(args.cache), args.datasets, args.seeds, out, args.tag):
        name = data.name
        start = time.perf_counter()
        results = evaluate_set(data, seed, map_variants, grid_variants, args.held_out, args.refit)
        record = {
            "dataset": name,
            "seed": seed,
            "held_out_fraction": args.held_out,
            "refit": args.refit,
            "top_fractions": TOP_FRACTIONS,
            "map_variants": {v: [asdict(MAP_VARIANTS[v][0]), *MAP_VARIANTS[v][1:]] for v in map_variants},
            "grid_variants": {v: GRID_VARIANTS[v] for v in grid_variants},
            "n_train": len(data.train),
            "n_test": len(data.test),
            "n_test_anomalous": int(data.labels.sum()),
            "seconds": time.perf_counter() - start,
            "results": results,
        }
        target.write_text(json.dumps(record, indent=0))
        print(f"{name} seed {seed}: {len(results)} variants in {record['seconds']:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
