"""Does the layout term's own evidence belong in the heatmap? (issue #14, surfaces with large diffuse defects)

DFM's heatmap is its image statistic per cell: the PCA residual of level 5 pooled to 3 × 3, upsampled. With all
training images it has the best pixel AUROC on Magnetic Tile (0.864 against GaussFT's 0.811), as on the
held-back textured surface. GaussFT's layout term L models the same 3 × 3 × C vector with one joint Gaussian but
only scores images. This study turns L into a map and fuses it into the default heatmap:

* ``cond``: per cell ``j``, the Mahalanobis distance of the cell given the other eight cells under L's Gaussian,
  ``g_jᵀ (P_jj)⁻¹ g_j`` with ``P = Σ⁻¹`` and ``g = P (x − μ)``: how unexpected the cell is in its layout (the
  nine terms are non-negative; their sum is not d², the joint distance);
* ``marg``: per cell, its marginal Mahalanobis distance under the cell's block ``Σ_jj`` of the same Gaussian;

each ``sqrt(d²/C)``, bilinearly upsampled from 3 × 3 to 224 px and blurred as the package's maps. Fusion: the
package's default heatmap (the 3 × 3-averaged 12 × 12-regional map of levels 3-5, σ 4, maxed with the unaveraged
level-3 map, σ 2, each scaled to its held-out normals' median and 99th percentile) maxed with the layout map on
the same scale. Protocol as ``multiscale_map_study.py`` (20 % held out: constants from the 80 % fit; test maps
from the refit on all training images).

Three other fusions of the excess were measured later (with the package's tail): only on images whose whole
layout distance is above its held-out mean, multiplied into the default map (``default · (1 + excess)``), and
maxed with it (``max(default, excess)``).

The package's tail of the layout map became the Gaussian one (``... gaussian q0.99``, mean + 2.326 std of the
held-out pixels) after this study showed the empirical q99's seed spread (Magnetic Tile ± 0.012).

    PYTHONPATH=src:benchmarks python benchmarks/layout_map_study.py --cache /work/data/cache/full --tag full \
        --datasets magnetic_tile,bsdata,kolektorsdd --out docs/local_evidence/layout_map
    PYTHONPATH=src:benchmarks python benchmarks/layout_map_study.py --tag n200 --out docs/local_evidence/layout_map
    python benchmarks/layout_map_study.py --summary docs/local_evidence/layout_map
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812

from anomalib_gaussft.gaussft.gaussian import StreamingGaussian
from anomalib_gaussft.gaussft.map_fusion import LAYOUT_TAIL_Z
from local_evidence_study import IMAGE, MapConfig, auroc, chunks, held_out_split, pending_runs, separable_blur
from multiscale_map_study import held_pixels, maps_of, pixel_tail

LAYOUT_LEVEL, GRID = 5, 3
AVERAGED = MapConfig(gaussian="region12", k=3)  # the package's default map
DETAIL = MapConfig(levels=(3,), gaussian="region12")  # the package's default detail map (σ 2)
SETS = "magnetic_tile,bsdata,kolektorsdd,deeppcb,brick,grass,gravel"


def layout_vectors(split, index) -> torch.Tensor:
    return F.adaptive_avg_pool2d(split.maps[LAYOUT_LEVEL][index], GRID).flatten(1).double()  # (n, C·9), c-major


def fit_layout(train, index: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and Ledoit-Wolf covariance of the layout vector (the package's Gaussian) from ``train[index]``."""
    g = StreamingGaussian(1, train.maps[LAYOUT_LEVEL].shape[1] * GRID * GRID)
    fit = torch.as_tensor(index)
    for sl in chunks(len(fit)):
        g.update(layout_vectors(train, fit[sl]).float()[:, None])
    est = g.fit()
    return est["mean"][0], est["covariance"][0]


def cell_maps(split, mean: torch.Tensor, covariance: torch.Tensor, mode: str) -> torch.Tensor:
    """``(N, 3, 3)`` per-cell ``sqrt(d²/C)`` of every image (``cond`` or ``marg``)."""
    whitening = cell_whitenings(covariance, mode)
    out = [cell_distances(layout_vectors(split, sl) - mean, whitening, mode) for sl in chunks(len(split), 64)]
    return torch.cat(out).float()


def cell_whitenings(covariance: torch.Tensor, mode: str) -> tuple[torch.Tensor, list, list]:
    """``(precision, cell indices, per-cell inner matrices)``: the conditional (``cond``: ``(P_jj)⁻¹``) or marginal
    (``marg``: ``(Σ_jj)⁻¹``) whitening of each of the layout vector's cells."""
    dim = covariance.shape[0]
    cells = [torch.arange(j, dim, GRID * GRID) for j in range(GRID * GRID)]
    precision = torch.linalg.inv(covariance)
    source = precision if mode == "cond" else covariance
    return precision, cells, [torch.linalg.inv(source[c][:, c]) for c in cells]


def cell_distances(centred: torch.Tensor, whitening: tuple, mode: str) -> torch.Tensor:
    """``(n, 3, 3)`` per-cell ``sqrt(d²/C)`` of layout vectors minus their mean, under :func:`cell_whitenings`."""
    precision, cells, inner = whitening
    vec = centred @ precision if mode == "cond" else centred  # g = P (x − μ), P symmetric
    scores = [((vec[:, c] @ m) * vec[:, c]).sum(1) for c, m in zip(cells, inner, strict=True)]
    channels = centred.shape[1] // (GRID * GRID)
    return torch.sqrt(torch.stack(scores, 1).clamp_min(0) / channels).reshape(-1, GRID, GRID)


def to_image(cells: torch.Tensor, sigma: float = 4.0) -> torch.Tensor:
    up = F.interpolate(cells[:, None], size=IMAGE, mode="bilinear", align_corners=False)[:, 0]
    return separable_blur(up, sigma)


def evaluate(data, seed: int) -> dict[str, dict[str, float]]:
    fit_idx, held_idx = held_out_split(len(data.train), 0.2, seed)
    held = data.train.take(held_idx)
    masks = data.masks.numpy()
    avg_h, avg_t = maps_of(data, AVERAGED, fit_idx, held)
    det_h, det_t = maps_of(data, DETAIL, fit_idx, held, 2.0)
    default_t = torch.maximum(pixel_tail(avg_h, avg_t, 0.99), pixel_tail(det_h, det_t, 0.99))
    results = {
        "averaged": {"pixel_auroc": auroc(masks, avg_t.numpy())},
        "default (averaged max detail)": {"pixel_auroc": auroc(masks, default_t.numpy())},
    }
    mean_f, cov_f = fit_layout(data.train, fit_idx)
    mean_a, cov_a = fit_layout(data.train, np.arange(len(data.train)))
    for mode in ("cond", "marg"):
        lay_h = to_image(cell_maps(held, mean_f, cov_f, mode))
        lay_t = to_image(cell_maps(data.test, mean_a, cov_a, mode))
        results[f"layout_{mode}"] = {"pixel_auroc": auroc(masks, lay_t.numpy())}
        for q in (0.99, 0.999):
            tail_t = pixel_tail(lay_h, lay_t, q)
            fused = {
                f"default max layout_{mode} q{q}": torch.maximum(default_t, tail_t),
                f"default + excess of layout_{mode} q{q}": default_t + (tail_t - 1).relu(),
            }
            for variant, fused_map in fused.items():
                results[variant] = {"pixel_auroc": auroc(masks, fused_map.numpy())}
        # the tail as a Gaussian's q99 from the held-out pixels' mean and std (the package's layout tail since r16),
        # and two other estimators of a stable tail: q95 rescaled to a Gaussian q99, median + 2.326 · 1.4826 · MAD
        z95 = LAYOUT_TAIL_Z / 1.6448536
        stable = {
            "gaussian q0.99": gaussian_tail(lay_h, lay_t),
            "q0.95 as gaussian q0.99": pixel_tail(lay_h, lay_t, 0.95) * z95,
            "median/MAD q0.99": mad_tail(lay_h, lay_t),
        }
        for name, tail_t in stable.items():
            fused_map = default_t + (tail_t - 1).relu()
            results[f"default + excess of layout_{mode} {name}"] = {"pixel_auroc": auroc(masks, fused_map.numpy())}
        if mode == "cond":  # other ways to fuse the excess (package tail), each measured once
            excess = (stable["gaussian q0.99"] - 1).relu()
            d_held, d_test = image_distances(held, mean_f, cov_f), image_distances(data.test, mean_a, cov_a)
            layout_unusual = (d_test > d_held.mean()).float()[:, None, None]  # the image's layout z-score > 0
            others = {
                "default + excess, only where the image's layout z > 0": default_t + excess * layout_unusual,
                "default · (1 + excess)": default_t * (1 + excess),
                "max(default, excess)": torch.maximum(default_t, excess),
            }
            for name, fused_map in others.items():
                results[name] = {"pixel_auroc": auroc(masks, fused_map.numpy())}
    return results


def layout_evidence(data, fit_idx: np.ndarray, held) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The layout term's evidence as the package computes it, ``(held-out, test)`` each: ``"excess"``, the layout
    map's excess over its Gaussian q99 (``relu(s_layout − 1)``, 224 px), and ``"distance"``, the whole layout's
    Mahalanobis distance L. Held-out images are scored by the fit on ``fit_idx``, test images by the refit on all."""
    mean_fit, cov_fit = fit_layout(data.train, fit_idx)
    mean_all, cov_all = fit_layout(data.train, np.arange(len(data.train)))
    layout_held = to_image(cell_maps(held, mean_fit, cov_fit, "cond"))
    layout_test = to_image(cell_maps(data.test, mean_all, cov_all, "cond"))
    return {
        "excess": (
            (gaussian_tail(layout_held, layout_held) - 1).relu(),
            (gaussian_tail(layout_held, layout_test) - 1).relu(),
        ),
        "distance": (
            image_distances(held, mean_fit, cov_fit).float(),
            image_distances(data.test, mean_all, cov_all).float(),
        ),
    }


def held_out_protocol(data, seed: int, frac: float) -> tuple[np.ndarray, object, dict]:
    """The layout studies' split (``fit_idx`` and the held-out images) and the layout term's evidence on it."""
    fit_idx, held_idx = held_out_split(len(data.train), frac, seed)
    held = data.train.take(held_idx)
    return fit_idx, held, layout_evidence(data, fit_idx, held)


def image_distances(split, mean: torch.Tensor, covariance: torch.Tensor) -> torch.Tensor:
    """``(N,)`` Mahalanobis distance of every image's whole layout vector (the image score's L)."""
    precision = torch.linalg.inv(covariance)
    out = []
    for sl in chunks(len(split), 64):
        centred = layout_vectors(split, sl) - mean
        out.append(((centred @ precision) * centred).sum(1).clamp_min(0).sqrt())
    return torch.cat(out)


def mad_tail(held_map: torch.Tensor, test_map: torch.Tensor) -> torch.Tensor:
    """The test map on a robust Gaussian tail: ``(m − median) / (z99 · 1.4826 · MAD)``."""
    flat = held_pixels(held_map)
    median = torch.quantile(flat, 0.5)
    mad = torch.quantile((flat - median).abs(), 0.5)
    return ((test_map - median) / (LAYOUT_TAIL_Z * 1.4826 * mad)).float()


def gaussian_tail(held_map: torch.Tensor, test_map: torch.Tensor) -> torch.Tensor:
    """The test map on a Gaussian tail of the held-out pixels: ``(m − mean) / (z99 · std)``, float64 moments.

    A map of nine independent cells per image has few distinct tail values; its empirical q99 rests on a handful
    of held-out cells, its mean and std on all of them.
    """
    flat = held_pixels(held_map)
    return ((test_map - flat.mean()) / (LAYOUT_TAIL_Z * flat.std())).float()


def summarise(folder: Path) -> str:
    """Markdown table: pixel AUROC of every variant per ``<tag>_<set>``, mean ± std over seeds."""
    runs: dict[str, dict[str, list[float]]] = {}
    for path in sorted(folder.glob("*_seed*.json")):
        key = path.stem.rsplit("_seed", 1)[0]
        for variant, metrics in json.loads(path.read_text()).items():
            runs.setdefault(variant, {}).setdefault(key, []).append(metrics["pixel_auroc"])
    keys = list(dict.fromkeys(k for per_set in runs.values() for k in per_set))
    lines = ["| pixel AUROC | " + " | ".join(keys) + " |", "|---|" + "---:|" * len(keys)]
    for variant, per_set in runs.items():
        cells = [f"{np.mean(per_set[k]):.3f} ± {np.std(per_set[k]):.3f}" if k in per_set else "–" for k in keys]
        lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", default=SETS)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--cache", type=Path, default=Path("/work/data/cache/local_evidence"))
    parser.add_argument("--tag", default="n200")
    parser.add_argument("--out", type=Path, default=Path("docs/local_evidence/layout_map"))
    parser.add_argument("--summary", type=Path, default=None, help="write FOLDER/summary.md from its runs and stop")
    args = parser.parse_args(argv)
    if args.summary is not None:
        (args.summary / "summary.md").write_text(summarise(args.summary))
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    for data, seed, target in pending_runs(args.cache, args.datasets, args.seeds, args.out, args.tag):
        start = time.perf_counter()
        results = evaluate(data, seed)
        target.write_text(json.dumps(results, indent=1))
        print(f"{data.name} seed {seed} ({time.perf_counter() - start:.0f} s)", flush=True)
        for variant, metrics in results.items():
            print(f"  {variant:34s} " + "  ".join(f"{k} {v:.4f}" for k, v in metrics.items()), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
