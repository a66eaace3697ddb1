"""Multi-scale anomaly maps: a fine map and a coarse map combined on the held-out normals' scale (issue #14).

On the Magnetic Tile set (textured surface, defects from a few pixels to a quarter of the image) the default
7 x 7-regional map of levels 3-5 reaches pixel AUROC 0.751 against PatchCore's 0.820 and DFM's 0.846; coarser
maps (a 3 x 3 neighbourhood average, deeper levels) win there but lose on BSData's small pits and on the
textures. This study combines the default ("fine") map with one coarser map per image pixel, both computed on
the frozen features cached by ``local_evidence_features.py``:

* ``mean``: the plain average of the two maps (``sqrt(d²/C)`` units, like the package's level average);
* ``zsum`` / ``zmax``: each map z-scored with the mean and std of its pixels on the held-out normals, then
  summed or maxed (a large defect fires the coarse map, a pit the fine one; the max keeps both);
* ``pzmax``: as ``zmax`` with a mean and std per pixel position (the held-out maps' own spatial pattern);
* ``qmax{q}``: each map scaled to its held-out tail, ``(m - median) / (quantile_q - median)``, then maxed;
* ``qexc{q}``: the coarse map on that scale plus the fine map's excess over its own tail, ``s_c + relu(s_f - 1)``
  (the fine map speaks only where it is rarer than its q-quantile on normal pixels, so its texture noise below
  that level never reaches the fused map, as it does through the max).

Protocol as in ``local_evidence_study.py``: per seed a 20 % held-out share of the training normals gives every
normalisation constant (Gaussians fitted on the other 80 %); test maps come from Gaussians refitted on all
training images. No test image or anomaly chooses anything. The image score is z(layout) + z(top 1 % of the
map), the package's local score, with the map in question.

    PYTHONPATH=src:benchmarks python benchmarks/multiscale_map_study.py --seeds 0 --out docs/local_evidence/multiscale
    PYTHONPATH=src:benchmarks python benchmarks/multiscale_map_study.py --seeds 1,2 --coarse k3 \
        --out docs/local_evidence/multiscale
    python benchmarks/multiscale_map_study.py --summary docs/local_evidence/multiscale   # -> summary.md
    # today's grid: the unaveraged 12 x 12 map ("fine") fused with the default 3 x 3-averaged one
    PYTHONPATH=src:benchmarks python benchmarks/multiscale_map_study.py --fine r12 --coarse r12_k3,r12_k5 \
        --seeds 0 --out docs/local_evidence/multiscale12
    PYTHONPATH=src:benchmarks python benchmarks/multiscale_map_study.py --fine r12_l3 --coarse r12_k3 \
        --seeds 0 --out docs/local_evidence/multiscale12_l3
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from local_evidence_study import (
    MapConfig,
    auroc,
    fit_units,
    full_map,
    grid_distances,
    held_out_split,
    load_set,
    topk_mean,
    unit_maps,
    zscore,
)

FINE: dict[str, MapConfig] = {
    "r7": MapConfig(gaussian="region7"),  # the package default of the first study: 7 x 7 regions, no average
    "r12": MapConfig(gaussian="region12"),  # today's grid without the neighbourhood average
    "r12_l3": MapConfig(levels=(3,), gaussian="region12"),  # its stride-8 level only: 7 % of the map statistics
    "r12_l34": MapConfig(levels=(3, 4), gaussian="region12"),
    "r12_l2": MapConfig(levels=(2,), gaussian="region12"),  # stride 4: the finest cached level
    "r12_l23": MapConfig(levels=(2, 3), gaussian="region12"),
}
COARSE: dict[str, MapConfig] = {
    "r12_k3": MapConfig(gaussian="region12", k=3),  # today's default map
    "r12_k5": MapConfig(gaussian="region12", k=5),
    "k3": MapConfig(gaussian="region7", k=3),
    "k5": MapConfig(gaussian="region7", k=5),
    "l6": MapConfig(levels=(6,), gaussian="region7"),
    "l3456_k3": MapConfig(levels=(3, 4, 5, 6), gaussian="region7", k=3),
    "l567_k3": MapConfig(levels=(5, 6, 7), gaussian="region7", k=3),
}
SIGMA = 4.0
TAIL_QUANTILES = (0.99, 0.999)  # qmax variants: maps scaled to their held-out tail before the per-pixel max
SETS = "magnetic_tile,bsdata,kolektorsdd,deeppcb,brick,grass,gravel,elpv_mono,elpv_poly"


def maps_of(data, cfg: MapConfig, fit_idx: np.ndarray, held, sigma: float = SIGMA) -> tuple[torch.Tensor, torch.Tensor]:
    """(held-out maps from the 80 % fit, test maps from the refit on all training images), 224 px, blurred."""
    held_map = full_map(unit_maps(held, cfg, fit_units(data.train, fit_idx, cfg)), sigma)
    all_idx = np.arange(len(data.train))
    test_map = full_map(unit_maps(data.test, cfg, fit_units(data.train, all_idx, cfg)), sigma)
    return held_map, test_map


def pixel_z(held_map: torch.Tensor, test_map: torch.Tensor) -> torch.Tensor:
    """The test map on the held-out normals' pixel scale."""
    return (test_map - held_map.mean()) / held_map.std().clamp_min(1e-12)


def position_z(held_map: torch.Tensor, test_map: torch.Tensor) -> torch.Tensor:
    """The test map z-scored per pixel position with the held-out normals' mean and std at that position."""
    return (test_map - held_map.mean(0)) / held_map.std(0).clamp_min(1e-12)


def held_pixels(held_map: torch.Tensor) -> torch.Tensor:
    """The held-out maps' pixels in float64, evenly thinned to at most 4M (``torch.quantile``'s input limit)."""
    return held_map.flatten()[:: max(1, held_map.numel() // 4_000_000)].double()


def pixel_tail(held_map: torch.Tensor, test_map: torch.Tensor, q: float) -> torch.Tensor:
    """The test map on the held-out normals' upper tail: ``(m - median) / (quantile_q - median)``.

    Aligns the maps' false-alarm levels instead of their bulk: a map with a heavier tail on normal pixels (a
    noisier fine map on texture) is scaled down more, so the per-pixel max does not inflate normal pixels.
    """
    flat = held_pixels(held_map)
    median, tail = torch.quantile(flat, 0.5), torch.quantile(flat, q)
    return ((test_map - median) / (tail - median).clamp_min(1e-12)).float()


def evaluate(
    data, seed: int, coarse_names: list[str], fine: MapConfig, fine_sigma: float = SIGMA
) -> dict[str, dict[str, float]]:
    fit_idx, held_idx = held_out_split(len(data.train), 0.2, seed)
    held = data.train.take(held_idx)
    all_idx = np.arange(len(data.train))
    layout_h, _ = grid_distances(data.train, fit_idx, [held, data.test], 5, 3, "joint")
    (layout_t,) = grid_distances(data.train, all_idx, [data.test], 5, 3, "joint")
    layout_h, layout_t = layout_h.amax(1), layout_t.amax(1)
    masks = None if data.masks is None else data.masks.numpy()

    def row(map_h: torch.Tensor, map_t: torch.Tensor) -> dict[str, float]:
        top_h, top_t = topk_mean(map_h, 0.01), topk_mean(map_t, 0.01)
        score = zscore(layout_t, layout_h) + zscore(top_t, top_h)
        out = {"image_auroc": auroc(data.labels, score.numpy()), "image_auroc_map": auroc(data.labels, top_t.numpy())}
        if masks is not None:
            out["pixel_auroc"] = auroc(masks, map_t.numpy())
        return out

    fine_h, fine_t = maps_of(data, fine, fit_idx, held, fine_sigma)
    results = {"fine": row(fine_h, fine_t)}
    zf_h, zf_t = pixel_z(fine_h, fine_h), pixel_z(fine_h, fine_t)
    for name in coarse_names:
        coarse_h, coarse_t = maps_of(data, COARSE[name], fit_idx, held)
        zc_h, zc_t = pixel_z(coarse_h, coarse_h), pixel_z(coarse_h, coarse_t)
        results[name] = row(coarse_h, coarse_t)
        results[f"mean[fine+{name}]"] = row((fine_h + coarse_h) / 2, (fine_t + coarse_t) / 2)
        results[f"zsum[fine+{name}]"] = row(zf_h + zc_h, zf_t + zc_t)
        results[f"zmax[fine+{name}]"] = row(torch.maximum(zf_h, zc_h), torch.maximum(zf_t, zc_t))
        pf_h, pf_t = position_z(fine_h, fine_h), position_z(fine_h, fine_t)
        pc_h, pc_t = position_z(coarse_h, coarse_h), position_z(coarse_h, coarse_t)
        results[f"pzmax[fine+{name}]"] = row(torch.maximum(pf_h, pc_h), torch.maximum(pf_t, pc_t))
        for q in TAIL_QUANTILES:
            tail_f_h, tail_f_t = pixel_tail(fine_h, fine_h, q), pixel_tail(fine_h, fine_t, q)
            tail_c_h, tail_c_t = pixel_tail(coarse_h, coarse_h, q), pixel_tail(coarse_h, coarse_t, q)
            results[f"qmax{q}[fine+{name}]"] = row(torch.maximum(tail_f_h, tail_c_h), torch.maximum(tail_f_t, tail_c_t))
            results[f"qexc{q}[fine+{name}]"] = row(tail_c_h + (tail_f_h - 1).relu(), tail_c_t + (tail_f_t - 1).relu())
    return results


def summarise(folder: Path) -> str:
    """Markdown table of every variant's metrics per set: mean ± std over the seeds run (``n`` seeds)."""
    runs: dict[tuple[str, str, str], list[float]] = {}
    for path in sorted(folder.glob("*_seed*.json")):
        name = path.stem.rsplit("_seed", 1)[0]
        for variant, metrics in json.loads(path.read_text()).items():
            for metric, value in metrics.items():
                runs.setdefault((variant, name, metric), []).append(value)
    sets = [s for s in SETS.split(",") if any(key[1] == s for key in runs)]
    variants = list(dict.fromkeys(key[0] for key in runs))
    lines = []
    for metric in ("pixel_auroc", "image_auroc"):
        columns = [s for s in sets if any((v, s, metric) in runs for v in variants)]
        lines += [f"### {metric}", "", "| variant | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
        for variant in variants:
            cells = []
            for s in columns:
                values = runs.get((variant, s, metric), [])
                spread = f" ± {np.std(values, ddof=1):.3f}" if len(values) > 1 else ""
                cells.append(f"{np.mean(values):.3f}{spread} ({len(values)})" if values else "–")
            lines.append(f"| {variant} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", default=SETS)
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--coarse", default="k3,k5,l6,l3456_k3,l567_k3")
    parser.add_argument("--fine", default="r7", choices=sorted(FINE), help="the fine map (r7: the first study's)")
    parser.add_argument("--fine-sigma", type=float, default=SIGMA, help="blur of the fine map (px)")
    parser.add_argument("--cache", type=Path, default=Path("/work/data/cache/local_evidence"))
    parser.add_argument("--out", type=Path, default=Path("docs/local_evidence/multiscale"))
    parser.add_argument("--summary", type=Path, default=None, help="write FOLDER/summary.md from its runs and stop")
    args = parser.parse_args(argv)
    if args.summary is not None:
        (args.summary / "summary.md").write_text(summarise(args.summary))
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    for name in args.datasets.split(","):
        data = load_set(args.cache, name)
        for seed in (int(s) for s in args.seeds.split(",")):
            start = time.perf_counter()
            results = evaluate(data, seed, args.coarse.split(","), FINE[args.fine], args.fine_sigma)
            (args.out / f"{name}_seed{seed}.json").write_text(json.dumps(results, indent=1))
            print(f"{name} seed {seed} ({time.perf_counter() - start:.0f} s)", flush=True)
            for variant, metrics in results.items():
                print(f"  {variant:24s} " + "  ".join(f"{k} {v:.4f}" for k, v in metrics.items()), flush=True)
        del data
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
