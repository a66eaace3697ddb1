"""Map Gaussians conditioned on the image's global appearance? (issue #14, Magnetic Tile's heatmap at 200 images)

Every map position is scored against its region's Gaussian of the local feature ``x``. Where the normal images
differ as a whole (a tile's brightness, grain and scale on Magnetic Tile), that Gaussian holds the spread between
images as well as within them, and a local defect has to stand out from both. PatchCore's nearest neighbour comes
from a similar-looking image; a Gaussian can do the same by conditioning: model ``[g, x]`` jointly per region, with
``g`` the image's first ``k`` principal components of its pooled head features (level 8, which the model pools for
its image Gaussians already), and score ``x`` by its distance given ``g``:

    d²(x | g) = ‖W_xg (g − μ_g) + W_xx (x − μ_x)‖²,

the last ``C`` rows of the joint Cholesky whitening of ``[g, x]`` (Ledoit-Wolf shrunk jointly, ``g`` ordered
first): the residual of ``x`` after its regression on ``g``, whitened by the conditional covariance. It costs ``C × k``
floats per region beside the ``C × C`` whitening; the ``k`` components are standardised to unit variance on the fit
images, so the shrinkage target ``μI`` treats them like feature dimensions.

Variants: ``k`` ∈ {4, 8}, conditioning the averaged map only or both local maps (averaged and detail), ``g`` from
the head (level 8) or level 7. Each goes through the whole default pipeline: the averaged and detail maps on their
held-out tail scale, their per-pixel max ``h``, the layout map's excess weighted by ``τ / max(max h, μ)`` (r19), and
the image score ``z(L) + z(M')``. Protocol of the layout studies (20 % held out fix every constant with Gaussians
fitted on the other 80 %; test images scored by Gaussians refitted on all training images). ``--split package``
holds out the images the package holds out for the same ``seed`` (``anomalib_gaussft``'s ``held_out_split`` of the
cached training paths) instead of the studies' draw: the default row then equals the package's end-to-end fit.

    PYTHONPATH=src:benchmarks python benchmarks/conditional_map_study.py --tag n200 \
        --datasets magnetic_tile,bsdata,kolektorsdd,deeppcb,elpv_mono,elpv_poly,brick,grass,gravel \
        --out docs/local_evidence/conditional_map
    PYTHONPATH=src:benchmarks python benchmarks/conditional_map_study.py --tag package --split package \
        --datasets magnetic_tile,bsdata,kolektorsdd,deeppcb,elpv_mono,elpv_poly,brick,grass,gravel \
        --out docs/local_evidence/conditional_map
    PYTHONPATH=src:benchmarks python benchmarks/conditional_map_study.py --cache /work/data/cache/full --tag full \
        --datasets magnetic_tile,bsdata,kolektorsdd --out docs/local_evidence/conditional_map
    python benchmarks/conditional_map_study.py --table docs/local_evidence/conditional_map
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from anomalib_gaussft.gaussft.gaussian import StreamingGaussian
from anomalib_gaussft.gaussft.held_out import held_out_split as package_held_out_split
from anomalib_gaussft.gaussft.map_fusion import LAYOUT_TAIL_Z
from anomalib_gaussft.gaussft.regions import region_grid, region_index
from layout_map_study import layout_evidence
from layout_scale_study import mean_std_table, run_study, seed_runs
from local_evidence_study import auroc, chunks, full_map, held_out_split, local_average, topk_mean, zscore
from multiscale_map_study import pixel_tail

REGIONS = 12  # the package's map_regions
AVERAGED = ((3, 4, 5), 3, 4.0)  # levels, neighbourhood, blur σ: the package's averaged map
DETAIL = ((3,), 1, 2.0)  # the detail map
# name → (k components, level of g, condition the detail map too); k = 0: the package's unconditioned maps
VARIANTS = {
    "default": (0, 8, False),
    "k4 head, averaged map": (4, 8, False),
    "k8 head, averaged map": (8, 8, False),
    "k4 head, both maps": (4, 8, True),
    "k8 head, both maps": (8, 8, True),
    "k8 level 7, both maps": (8, 7, True),
}


class GlobalComponents:
    """The first ``k`` principal components of the pooled features of ``level``, standardised on the fit images."""

    def __init__(self, fit_split, level: int, k: int) -> None:
        pooled = fit_split.pooled[level].double()
        self.level, self.mean = level, pooled.mean(0)
        _, _, vh = torch.linalg.svd(pooled - self.mean, full_matrices=False)
        self.basis = vh[:k].T
        self.scale = ((pooled - self.mean) @ self.basis).std(0).clamp_min(1e-12)

    def __call__(self, split, index: slice) -> torch.Tensor:
        return (((split.pooled[self.level][index].double() - self.mean) @ self.basis) / self.scale).float()


class ConditionalRegionMap:
    """Regional Gaussians of ``[g, x]``; the map is ``sqrt(d²(x | g) / C)`` per position (``k = 0``: ``d²(x)``)."""

    def __init__(self, fit_split, level: int, neighbourhood: int, g: GlobalComponents | None) -> None:
        self.level, self.neighbourhood, self.g = level, neighbourhood, g
        self.k = 0 if g is None else len(g.scale)
        self.gaussian: StreamingGaussian | None = None
        for sl in chunks(len(fit_split)):
            samples = self._samples(fit_split, sl)
            if self.gaussian is None:
                self.gaussian = StreamingGaussian(int(self.index.max()) + 1, samples.shape[-1])
            self.gaussian.update(samples, group_index=self.index)
        self.gaussian.fit()

    def _samples(self, split, sl: slice) -> torch.Tensor:
        x = local_average(split.maps[self.level][sl], self.neighbourhood)
        n, c, h, w = x.shape
        self.shape, self.channels = (h, w), c
        self.index = region_index(h, w, region_grid(h, w, REGIONS))
        x = x.reshape(n, c, h * w).transpose(1, 2)
        if self.g is None:
            return x
        g = self.g(split, sl)[:, None, :].expand(-1, h * w, -1)
        return torch.cat([g, x], dim=-1)  # g first: the last C whitened rows are x given g

    def __call__(self, split) -> torch.Tensor:
        out = []
        for sl in chunks(len(split)):
            samples = self._samples(split, sl)
            mean, whitening = self.gaussian.mean[self.index], self.gaussian.whitening[self.index]
            whitened = torch.einsum("pij,npj->npi", whitening[:, self.k :], samples - mean)
            squared = (whitened * whitened).sum(-1)
            out.append(torch.sqrt(squared / self.channels).reshape(len(samples), *self.shape))
        return torch.cat(out)


def local_map(data, spec, fit_idx: np.ndarray, held, g_level: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(held-out maps from the fit on ``fit_idx``, test maps from the refit on all), 224 px, blurred."""
    levels, neighbourhood, sigma = spec
    maps = []
    for index, split in ((fit_idx, held), (np.arange(len(data.train)), data.test)):
        fit_split = data.train.take(index)
        g = GlobalComponents(fit_split, g_level, k) if k else None
        units = [ConditionalRegionMap(fit_split, level, neighbourhood, g)(split) for level in levels]
        maps.append(full_map(units, sigma))
    return maps[0], maps[1]


def image_max(maps: torch.Tensor) -> torch.Tensor:
    return maps.flatten(1).amax(dim=1)


def maxed_local_maps(s_avg: tuple, detail: tuple) -> tuple[torch.Tensor, torch.Tensor]:
    """``h = max(s_avg, s_det)`` of the held-out and the test images: the scaled averaged maps ``s_avg`` and the
    detail maps ``(held, test)`` on their held-out tail scale."""
    det_h, det_t = detail
    held = torch.maximum(s_avg[0], pixel_tail(det_h, det_h, 0.99))
    return held, torch.maximum(s_avg[1], pixel_tail(det_h, det_t, 0.99))


def fused_heatmap(h_held: torch.Tensor, h_test: torch.Tensor, excess_test: torch.Tensor) -> torch.Tensor:
    """The package's r19 heatmap of the test images, ``h + e · τ / max(max h, μ)``, with ``μ`` and ``τ`` the mean and
    Gaussian q99 of the held-out images' ``max h``."""
    peaks = image_max(h_held)
    typical = peaks.mean()
    tau = typical + LAYOUT_TAIL_Z * peaks.std()
    return h_test + excess_test * (tau / image_max(h_test).clamp_min(typical))[:, None, None]


SPLIT = {"held_out": "study"}  # --split: the studies' draw or the package's


def split_of(data, seed: int, frac: float) -> tuple[np.ndarray, np.ndarray]:
    """``(fit, held-out)`` indices of the training images: the studies' seeded draw or the package's split."""
    if SPLIT["held_out"] == "study":
        return held_out_split(len(data.train), frac, seed)
    if data.train_paths is None:
        msg = f"{data.name}: the feature cache keeps no training paths, so the package's split cannot be drawn"
        raise ValueError(msg)
    fit, held = package_held_out_split(data.train_paths, frac, seed)
    return np.asarray(fit), np.asarray(held)


def record_of(data, seed: int, frac: float) -> dict:
    """Pixel AUROC of the default heatmap and image AUROC of ``z(L) + z(M')`` with each variant's local maps."""
    fit_idx, held_idx = split_of(data, seed, frac)
    held = data.train.take(held_idx)
    evidence = layout_evidence(data, fit_idx, held)
    (e_h, e_t), (l_h, l_t) = evidence["excess"], evidence["distance"]
    labels = np.asarray(data.labels)
    results: dict[str, float] = {}
    averaged: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}  # per (k, g level): variants share maps
    detail: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
    for name, (k, g_level, both) in VARIANTS.items():
        key = (k, g_level if k else None)
        if key not in averaged:
            avg_h, avg_t = local_map(data, AVERAGED, fit_idx, held, g_level, k)
            averaged[key] = (pixel_tail(avg_h, avg_h, 0.99), pixel_tail(avg_h, avg_t, 0.99))
        s_avg_h, s_avg_t = averaged[key]
        m_h, m_t = topk_mean(s_avg_h + e_h, 0.01), topk_mean(s_avg_t + e_t, 0.01)
        results[f"image: {name}"] = auroc(labels, (zscore(l_t, l_h) + zscore(m_t, m_h)).numpy())
        if data.masks is None:
            continue
        detail_key = key if both else (0, None)
        if detail_key not in detail:
            detail[detail_key] = local_map(data, DETAIL, fit_idx, held, g_level, detail_key[0])
        h_h, h_t = maxed_local_maps(averaged[key], detail[detail_key])
        results[f"pixel: {name}"] = auroc(data.masks.numpy(), fused_heatmap(h_h, h_t, e_t).numpy())
        results[f"pixel, averaged map alone: {name}"] = auroc(data.masks.numpy(), s_avg_t.numpy())
    return {"results": results, "split": SPLIT["held_out"]}


def write_table(folder: Path) -> str:
    """Markdown: pixel and image AUROC, one row per variant, mean ± std over seeds per set and training-set size."""

    def column(record: dict) -> str:
        split = ", package split" if record["tag"] == "package" else ""
        return f"{record['dataset']} ({record['n_train']}{split})"

    runs = seed_runs(folder, lambda _record, rule: rule, column)
    parts = []
    for measure in ("pixel", "pixel, averaged map alone", "image"):
        rows = [rule for rule in runs if rule.startswith(f"{measure}: ")]
        parts.append(mean_std_table(f"{measure} AUROC", runs, rows, lambda row: row.split(": ", 1)[1]))
    return "\n\n".join(parts) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--split", choices=("study", "package"), default="study")
    known, rest = parser.parse_known_args(argv)
    SPLIT["held_out"] = known.split
    return run_study(rest, __doc__, "docs/local_evidence/conditional_map", record_of, write_table)


if __name__ == "__main__":
    raise SystemExit(main())
