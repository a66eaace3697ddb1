"""Map regions on two offset grids averaged, or a grid per map level: the same statistics, better maps? (issue #14)

Each map level's positions are scored against their region's Gaussian, on an ``R × R`` grid of regions (10 × 10
by default, r20). Finer grids follow an aligned part's structure more closely; coarser ones give each Gaussian more
samples. The layout term gained from two offset pooling grids with their evidence averaged (``layout_grids: 2``);
here the same is tried for the map regions: a grid of ``R × R`` regions and a second of ``(R − 1) × (R − 1)`` whose
boundaries lie at the middle of the first grid's regions (its outer regions 1.5 regions wide), each with its own
regional Gaussians, the per-position maps averaged. ``7 + 6`` holds 85 regions (the default's 100: the statistics
stay within the budget) with about twice the samples per Gaussian. ``--per-level`` measures one grid per map level
instead (finer at the stride-8 level 3, whose regions are cheap, paid for by coarser ones at level 5).

Everything else is the package's default pipeline (r20): averaged map (levels 3-5, 3 × 3 neighbourhood, σ 4) and
detail map (level 3, σ 2) on their held-out tail scale and maxed, the layout on two grids one position apart
(``br1 + tl1``) with its map's excess weighted by what the local maps missed, the image score ``z(L) + z(M')``.
Protocol of the layout studies (20 % held out fix every constant with Gaussians fitted on the other 80 %; test
images scored by Gaussians refitted on all training images).

    PYTHONPATH=src:benchmarks python benchmarks/offset_regions_study.py --tag n200 \\
        --datasets magnetic_tile,bsdata,kolektorsdd,deeppcb,elpv_mono,elpv_poly,brick,grass,gravel \\
        --out docs/local_evidence/offset_regions
    PYTHONPATH=src:benchmarks python benchmarks/offset_regions_study.py --cache /work/data/cache/full --tag full \\
        --datasets magnetic_tile,bsdata,kolektorsdd --out docs/local_evidence/offset_regions
    PYTHONPATH=src:benchmarks python benchmarks/offset_regions_study.py --per-level --tag n200_levels \\
        --datasets magnetic_tile,bsdata,kolektorsdd,deeppcb,elpv_mono,elpv_poly,brick,grass,gravel \\
        --out docs/local_evidence/offset_regions
    PYTHONPATH=src:benchmarks python benchmarks/offset_regions_study.py --per-level --cache /work/data/cache/full \\
        --tag full_levels --datasets magnetic_tile,bsdata,kolektorsdd --out docs/local_evidence/offset_regions
    python benchmarks/offset_regions_study.py --table docs/local_evidence/offset_regions
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch

import layout_map_study
from conditional_map_study import AVERAGED, DETAIL, ConditionalRegionMap, fused_heatmap, maxed_local_maps
from layout_crop_study import PACKAGE_LAYOUT_VECTORS, cropped_layout_vectors, with_per_image_scores
from layout_ensemble_study import CROPS, scored
from layout_scale_study import auroc_record, mean_std_table, run_study, seed_runs
from local_evidence_study import auroc, full_map, held_out_split, topk_mean, zscore
from multiscale_map_study import pixel_tail
from results_table import paired_bootstrap

# name → region grids; (R, False): the package's R × R grid, (R, True): R × R regions whose boundaries lie at the
# middle of the (R + 1)-grid's regions
VARIANTS = {
    "10 (default)": ((10, False),),
    "12 (r19)": ((12, False),),
    "7": ((7, False),),
    "7 + 6 offset": ((7, False), (6, True)),
    "8 + 7 offset": ((8, False), (7, True)),
    "10 + 9 offset": ((10, False), (9, True)),
}
# ``--per-level``: a grid per map level (level → grids), the finer grids paid for by coarser ones where the
# statistics budget (1/5 of PaDiM's) asks for it; a region costs C² + C floats per map reading the level
PER_LEVEL = {
    "10 (default)": ((10, False),),
    "L3 12, L4-5 10": {3: ((12, False),), 4: ((10, False),), 5: ((10, False),)},
    "L3 10, L4-5 12": {3: ((10, False),), 4: ((12, False),), 5: ((12, False),)},
    "L3 14, L4 10, L5 8": {3: ((14, False),), 4: ((10, False),), 5: ((8, False),)},
    "L3 12, L4 10, L5 9": {3: ((12, False),), 4: ((10, False),), 5: ((9, False),)},
}
BASELINE = "10 (default)"
ACTIVE = VARIANTS  # what record_of measures; main's --per-level makes it PER_LEVEL
# the layout of r20: two 3 × 3 grids one feature position apart
LAYOUT_CROPS = ("br1", "tl1")


def axis_regions(size: int, regions: int, offset: bool) -> torch.Tensor:
    """Region of each of ``size`` positions along one axis: ``⌊i·R/size⌋`` (the package's), or with ``offset`` the
    boundaries of the ``(R + 1)``-grid moved by half a region, the outer regions 1.5 regions wide."""
    position = torch.arange(size, dtype=torch.float64)
    if not offset:
        return torch.div(torch.arange(size) * regions, size, rounding_mode="floor")
    return torch.floor(position * (regions + 1) / size - 0.5).clamp(0, regions - 1).long()


def grid_index(height: int, width: int, regions: int, offset: bool) -> torch.Tensor:
    """Region of every position of a ``height × width`` map, row-major ``(height * width,)``."""
    rows = axis_regions(height, min(regions, height), offset)
    cols = axis_regions(width, min(regions, width), offset)
    return (rows[:, None] * min(regions, width) + cols[None, :]).flatten()


class OffsetRegionMap(ConditionalRegionMap):
    """The package's regional map of one level (unconditioned), on the grid ``grid_index(regions, offset)``."""

    def __init__(self, fit_split, level: int, neighbourhood: int, regions: int, offset: bool) -> None:
        self.regions, self.offset = regions, offset
        super().__init__(fit_split, level, neighbourhood, None)

    def _samples(self, split, sl: slice) -> torch.Tensor:
        samples = super()._samples(split, sl)
        self.index = grid_index(*self.shape, self.regions, self.offset)  # replaces the package's grid
        return samples


# lite0's channels of the map levels, the default's statistics (MiB, r20) and the levels each map reads
CHANNELS = {3: 40, 4: 80, 5: 112}
DEFAULT_MIB = 24.05
MAP_LEVELS = (AVERAGED[0], DETAIL[0])


def statistics_mib(variant: tuple | dict) -> float:
    """The package's statistics (lite0, 224 px) with ``variant``'s map regions: a region costs ``C² + C`` floats per
    map and level it serves (whitening and mean)."""

    def floats(v: tuple | dict) -> int:
        return sum(
            min(r, 14 if level > 3 else 28) ** 2 * (CHANNELS[level] ** 2 + CHANNELS[level])
            for levels in MAP_LEVELS
            for level in levels
            for r, _ in grids_of(v, level)
        )

    return DEFAULT_MIB + (floats(variant) - floats(VARIANTS[BASELINE])) * 4 / 2**20


def grids_of(variant: tuple | dict, level: int) -> tuple:
    """The region grids of ``level`` in a variant: the same for every level, or the level's own."""
    return variant[level] if isinstance(variant, dict) else variant


def local_map(data, spec, grids, fit_idx: np.ndarray, held) -> tuple[torch.Tensor, torch.Tensor]:
    """(held-out maps from the fit on ``fit_idx``, test maps from the refit on all), 224 px, blurred; each level's
    map the mean of its grids' maps."""
    levels, neighbourhood, sigma = spec
    maps = []
    for index, split in ((fit_idx, held), (np.arange(len(data.train)), data.test)):
        fit_split = data.train.take(index)
        units = [
            torch.stack(
                [OffsetRegionMap(fit_split, level, neighbourhood, r, off)(split) for r, off in grids_of(grids, level)]
            ).mean(0)
            for level in levels
        ]
        maps.append(full_map(units, sigma))
    return maps[0], maps[1]


def layout_of(data, fit_idx: np.ndarray, held) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """r20's layout evidence, ``(held-out, test)``: the raw layout map at image size (``"map"``) and L, averaged
    over the two grids."""
    per_grid = []
    try:
        for crop in LAYOUT_CROPS:
            layout_map_study.layout_vectors = cropped_layout_vectors(*CROPS[crop])
            fitted = layout_map_study.fit_layout(data.train, fit_idx)
            refitted = layout_map_study.fit_layout(data.train, np.arange(len(data.train)))
            per_grid.append(scored(data, held, fitted, refitted))
    finally:
        layout_map_study.layout_vectors = PACKAGE_LAYOUT_VECTORS
    return {
        key: tuple(torch.stack([grid[key][i] for grid in per_grid]).mean(0) for i in (0, 1))
        for key in ("map", "distance")
    }


def record_of(data, seed: int, frac: float) -> dict:
    """Image AUROC of ``z(L) + z(M')`` and pixel AUROC of the heatmap, for each layout of map regions."""
    fit_idx, held_idx = held_out_split(len(data.train), frac, seed)
    held = data.train.take(held_idx)
    layout = layout_of(data, fit_idx, held)
    (map_h, map_t), (l_h, l_t) = layout["map"], layout["distance"]
    tail = layout_map_study.gaussian_tail
    e_h, e_t = (tail(map_h, map_h) - 1).relu(), (tail(map_h, map_t) - 1).relu()
    scores, pixels = {}, {}
    for name, grids in ACTIVE.items():
        avg_h, avg_t = local_map(data, AVERAGED, grids, fit_idx, held)
        s_avg_h, s_avg_t = pixel_tail(avg_h, avg_h, 0.99), pixel_tail(avg_h, avg_t, 0.99)
        m_h, m_t = topk_mean(s_avg_h + e_h, 0.01), topk_mean(s_avg_t + e_t, 0.01)
        scores[f"L + M', {name}"] = zscore(l_t, l_h) + zscore(m_t, m_h)
        scores[f"M', {name}"] = m_t
        if data.masks is not None:
            local = maxed_local_maps((s_avg_h, s_avg_t), local_map(data, DETAIL, grids, fit_idx, held))
            pixels[f"pixel: {name}"] = auroc(data.masks.numpy(), fused_heatmap(*local, e_t).numpy())
    record = auroc_record(data, scores)
    record["results"].update(pixels)
    return with_per_image_scores(record, data, scores)


def column(record: dict) -> str:
    """A table column: the set and its training images (and the tag of ``--per-level`` runs)."""
    tag = ", per level" if record["tag"].endswith("_levels") else ""
    return f"{record['dataset']} ({record['n_train']}{tag})"


def write_table(folder: Path) -> str:
    """Markdown: image and pixel AUROC (mean ± std over seeds), and seed 0's paired 95 % intervals of each variant's
    image score against the default's (10 × 10 regions)."""
    runs = seed_runs(folder, lambda _record, rule: rule, column)
    parts = [
        mean_std_table("image AUROC", runs, [r for r in runs if not r.startswith("pixel: ")], lambda row: row),
        mean_std_table("pixel AUROC", runs, [r for r in runs if r.startswith("pixel: ")], lambda row: row[7:]),
    ]
    costs = {**VARIANTS, **PER_LEVEL}
    parts.append(
        "| map regions | statistics MiB (lite0; budget 24.17) |\n|---|---:|\n"
        + "\n".join(f"| {name} | {statistics_mib(v):.2f} |" for name, v in costs.items())
    )
    for variants in (VARIANTS, PER_LEVEL):
        others = [name for name in variants if name != BASELINE]
        lines = [
            "| seed 0, `z(L) + z(M')` − the default's (10 × 10) [95 % CI] | " + " | ".join(others) + " |",
            "|---|" + "---:|" * len(others),
        ]
        for path in sorted(folder.glob("*_seed0.json")):
            record = json.loads(path.read_text())
            if not all(f"L + M', {name}" in record["scores"] for name in others):
                continue
            labels = np.asarray(record["labels"])
            base = np.asarray(record["scores"][f"L + M', {BASELINE}"])
            cells = []
            for name in others:
                diff, lo, hi = paired_bootstrap(labels, np.asarray(record["scores"][f"L + M', {name}"]), base)
                cells.append(f"{diff:+.3f} [{lo:+.3f}, {hi:+.3f}]")
            lines.append(f"| {column(record)} | " + " | ".join(cells) + " |")
        parts.append("\n".join(lines))
    return "\n\n".join(parts) + "\n"


def main(argv: list[str] | None = None) -> int:
    """``--per-level`` (before the other options): measure ``PER_LEVEL``'s grids instead of ``VARIANTS``."""
    global ACTIVE
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--per-level" in argv:
        argv.remove("--per-level")
        ACTIVE = PER_LEVEL
    return run_study(
        argv,
        __doc__,
        "docs/local_evidence/offset_regions",
        record_of,
        write_table,
    )


if __name__ == "__main__":
    raise SystemExit(main())
