"""Which coarse layout should the image score's layout term model? (issue #14, unaligned surfaces)

The ``local`` image score is ``z(L) + z(M)``: L is one joint Gaussian of level 5 pooled to 3 × 3 (1008 dims on
lite0), M the mean of the top 1 % of the 12 × 12-regional, 3 × 3-averaged map. L carries the aligned sets
(Magnetic Tile, BSData) and is noise on the unaligned ones (KolektorSDD 0.77 where the paper's pooled score has
0.84). This study asks whether a second, coarser layout (a deeper level, fewer cells: less sensitive to where a
part sits) or a per-dimension-variance shrinkage target makes the layout term hold on both kinds of set.

Layout candidates (``level, grid, mode`` as in ``local_evidence_study.grid_distances``):

* ``L5x3``: the package's term (level 5, 3 × 3, joint Gaussian, Ledoit-Wolf towards ``μI``);
* ``L5x3std``: the same with every dimension standardised before the fit, i.e. the correlation matrix shrunk
  towards the identity (a per-dimension variance target);
* ``L6x2``: level 6 (stride 32) pooled to 2 × 2, joint (768 dims on lite0);
* ``L6x1`` / ``L7x1``: levels 6 / 7 pooled over the whole map: the paper's pooled Gaussians of those levels,
  which the model stores already;
* ``L7x2``: level 7 pooled to 2 × 2, joint (1280 dims);
* ``L5x3a<α>``: L with a fixed shrinkage ``α`` instead of Ledoit-Wolf's (the held-out distances of L are 2-3 ×
  the training ones: is L under-regularised?);

combined as ``z(L5x3) + z(M)`` (the default), ``z(X) + z(M)``, and, for the deeper levels,
``z(z(L5x3) + z(X)) + z(M)`` (a two-scale layout term with the weight of one term, ``[L5x3 & X] + M`` below).
Protocol of ``local_evidence_study.py`` with ``--refit``: 20 % of the training images held out (seeded) fix the
z-scores with Gaussians fitted on the other 80 %; test images are scored by Gaussians refitted on all training
images. AUROC of each term and rule per set and seed: ``OUT/<tag>_<set>_seed<k>.json``.

    PYTHONPATH=src:benchmarks python benchmarks/layout_scale_study.py --cache /work/data/cache/full --tag full \
        --datasets magnetic_tile,bsdata,elpv_mono,elpv_poly,kolektorsdd --out docs/local_evidence/layout_scales
    PYTHONPATH=src:benchmarks python benchmarks/layout_scale_study.py --tag n200 \
        --out docs/local_evidence/layout_scales
    python benchmarks/layout_scale_study.py --table docs/local_evidence/layout_scales
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812

from anomalib_gaussft.gaussft.gaussian import StreamingGaussian
from local_evidence_study import (
    MAP_VARIANTS,
    auroc,
    chunks,
    fit_units,
    full_map,
    grid_distances,
    held_out_split,
    pending_runs,
    topk_mean,
    unit_maps,
    zscore,
)

MAP_VARIANT = "m_r12_k3"  # the package's map term M
LAYOUTS: dict[str, tuple[int, int, str]] = {
    "L5x3": (5, 3, "joint"),
    "L5x3std": (5, 3, "jointstd"),
    "L6x2": (6, 2, "joint"),
    "L6x1": (6, 1, "joint"),
    "L7x1": (7, 1, "joint"),
    "L7x2": (7, 2, "joint"),
    # L with a fixed shrinkage ``α`` in ``(1 − α) S + α μ I`` instead of Ledoit-Wolf's (≈ 0.04-0.15 here)
    "L5x3a0.3": (5, 3, "shrink0.3"),
    "L5x3a0.7": (5, 3, "shrink0.7"),
    "L5x3a0.9": (5, 3, "shrink0.9"),
}
TWO_SCALES = ("L6x2", "L6x1", "L7x1", "L7x2")  # second layouts tried beside L5x3
SETS = "magnetic_tile,bsdata,elpv_mono,elpv_poly,kolektorsdd,deeppcb,brick,grass,gravel"
# best image AUROC of PaDiM / PatchCore / DFM, per tag, read from these results files
BASELINES = {"n200": "docs/local_evidence/baselines.jsonl", "full": "docs/results/full/results.jsonl"}


def fixed_shrinkage_distances(train, fit_idx: np.ndarray, split, level: int, grid: int, alpha: float) -> torch.Tensor:
    """Distances ``(N,)`` of ``split``'s layout vectors under ``(1 − α) S + α μ I`` fitted on ``fit_idx``.

    The mean and the empirical covariance ``S`` are the package Gaussian's (``StreamingGaussian.fit``); only the
    shrinkage is fixed instead of Ledoit-Wolf's.
    """

    def vectors(data, index) -> torch.Tensor:
        return F.adaptive_avg_pool2d(data.maps[level][index], grid).flatten(1)

    fit = torch.as_tensor(fit_idx)
    gaussian = StreamingGaussian(1, train.maps[level].shape[1] * grid * grid)
    for sl in chunks(len(fit)):
        gaussian.update(vectors(train, fit[sl])[:, None])
    estimate = gaussian.fit()
    mean, empirical = estimate["mean"][0], estimate["empirical"][0]
    mu = torch.trace(empirical) / len(empirical)
    eye = torch.eye(len(empirical), dtype=empirical.dtype)
    precision = torch.linalg.inv((1 - alpha) * empirical + alpha * mu * eye)
    out = []
    for sl in chunks(len(split)):
        c = vectors(split, sl).double() - mean
        out.append(((c @ precision) * c).sum(1).clamp_min(0).sqrt())
    return torch.cat(out).float()


def terms_of(data, seed: int, frac: float) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Held-out (80 % fit) and test (refit on all) scores of M and every layout candidate."""
    fit_idx, held_idx = held_out_split(len(data.train), frac, seed)
    all_idx = np.arange(len(data.train))
    held = data.train.take(held_idx)
    terms = {}
    for name, (level, grid, mode) in LAYOUTS.items():
        if mode.startswith("shrink"):
            alpha = float(mode.removeprefix("shrink"))
            held_d = fixed_shrinkage_distances(data.train, fit_idx, held, level, grid, alpha)
            test_d = fixed_shrinkage_distances(data.train, all_idx, data.test, level, grid, alpha)
            terms[name] = (held_d, test_d)
            continue
        (held_d,) = grid_distances(data.train, fit_idx, [held], level, grid, mode)
        (test_d,) = grid_distances(data.train, all_idx, [data.test], level, grid, mode)
        terms[name] = (held_d[:, 0], test_d[:, 0])
    terms["M"] = map_term(data, fit_idx, held)
    return terms


def map_term(data, fit_idx: np.ndarray, held) -> tuple[torch.Tensor, torch.Tensor]:
    """Held-out (map Gaussians fitted on ``fit_idx``) and test (refit on all) scores of the map term M."""
    cfg, _, sigma = MAP_VARIANTS[MAP_VARIANT]
    all_idx = np.arange(len(data.train))
    held_map = full_map(unit_maps(held, cfg, fit_units(data.train, fit_idx, cfg)), sigma)
    test_map = full_map(unit_maps(data.test, cfg, fit_units(data.train, all_idx, cfg)), sigma)
    return topk_mean(held_map, 0.01), topk_mean(test_map, 0.01)


def rules(terms: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Test scores of every rule: each term alone, ``X + M`` and the two-scale ``[L5x3 & X] + M``."""
    z = {name: (zscore(h, h), zscore(t, h)) for name, (h, t) in terms.items()}
    out = {name: t for name, (_h, t) in z.items()}
    for name in LAYOUTS:
        out[f"{name} + M"] = z[name][1] + z["M"][1]
        if name in TWO_SCALES:
            pair_h, pair_t = z["L5x3"][0] + z[name][0], z["L5x3"][1] + z[name][1]
            out[f"[L5x3 & {name}] + M"] = zscore(pair_t, pair_h) + z["M"][1]
    return out


def evaluate(data, seed: int, frac: float) -> dict[str, float]:
    labels = np.asarray(data.labels)
    return {name: auroc(labels, score.numpy()) for name, score in rules(terms_of(data, seed, frac)).items()}


def generalisation_gap(data, seed: int, frac: float) -> float:
    """Median layout distance (L5x3) of the held-out normals over that of the images it was fitted on."""
    fit_idx, held_idx = held_out_split(len(data.train), frac, seed)
    level, grid, mode = LAYOUTS["L5x3"]
    fitted, held = grid_distances(
        data.train, fit_idx, [data.train.take(fit_idx), data.train.take(held_idx)], level, grid, mode
    )
    return float(held.median() / fitted.median())


def auroc_record(data, scores: dict[str, torch.Tensor]) -> dict:
    """The study record of a set's test scores: ``{"results": {rule: image AUROC}}``."""
    labels = np.asarray(data.labels)
    return {"results": {name: auroc(labels, score.numpy()) for name, score in scores.items()}}


def best_baselines(path: Path) -> dict[str, float]:
    """Best image AUROC of PaDiM, PatchCore and DFM per set in a results file."""
    best: dict[str, float] = {}
    for line in path.read_text().splitlines():
        row = json.loads(line)
        if row.get("model") in ("padim", "patchcore", "dfm") and row.get("image_auroc") is not None:
            best[row["dataset"]] = max(best.get(row["dataset"], 0.0), row["image_auroc"])
    return best


def write_table(folder: Path) -> str:
    """One markdown table per tag: mean ± std over seeds, the mean over sets and the worst gap to the best."""
    records: dict[str, dict[str, list[dict]]] = {}
    for path in sorted(folder.glob("*_seed*.json")):
        record = json.loads(path.read_text())
        records.setdefault(record["tag"], {}).setdefault(record["dataset"], []).append(record["results"])
    parts = []
    for tag, by_set in records.items():
        sets = [s for s in SETS.split(",") if s in by_set]
        best = best_baselines(Path(BASELINES[tag])) if tag in BASELINES else {}
        head = ["image AUROC", *sets, "mean", "worst − best baseline"]
        lines = [f"**{tag}**", "", "| " + " | ".join(head) + " |", "|" + "---|" + "---:|" * (len(head) - 1)]
        lines.append("| best of PaDiM / PatchCore / DFM | " + " | ".join(f"{best.get(s, np.nan):.3f}" for s in sets))
        lines[-1] += " | | |"
        for rule in by_set[sets[0]][0]:
            means = [float(np.mean([r[rule] for r in by_set[s]])) for s in sets]
            cells = [f"{m:.3f} ± {np.std([r[rule] for r in by_set[s]]):.3f}" for m, s in zip(means, sets, strict=True)]
            gaps = {s: m - best[s] for m, s in zip(means, sets, strict=True) if s in best}
            worst = min(gaps, key=gaps.get) if gaps else None
            tail = f"{gaps[worst]:+.3f} ({worst})" if worst else ""
            lines.append(f"| {rule} | " + " | ".join(cells) + f" | {np.mean(means):.3f} | {tail} |")
        parts.append("\n".join(lines))
    return "\n\n".join(parts) + "\n"


def seed_runs(
    folder: Path, row_of: Callable[[dict, str], str], column_of: Callable[[dict], str]
) -> dict[str, dict[str, list[float]]]:
    """Every result of the ``*_seed*.json`` files in ``folder``: ``{row: {column: [value per seed]}}``."""
    runs: dict[str, dict[str, list[float]]] = {}
    for path in sorted(folder.glob("*_seed*.json")):
        record = json.loads(path.read_text())
        for rule, value in record["results"].items():
            runs.setdefault(row_of(record, rule), {}).setdefault(column_of(record), []).append(value)
    return runs


def mean_std_table(title: str, runs: dict[str, dict[str, list[float]]], rows: list[str], label: Callable) -> str:
    """Markdown: one line per row of ``rows`` (named ``label(row)``), mean ± std over seeds per column."""
    columns = list(dict.fromkeys(c for r in rows for c in runs.get(r, {})))
    lines = [f"| {title} | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
    for row in rows:
        cells = [runs.get(row, {}).get(c) for c in columns]
        text = [f"{np.mean(v):.3f} ± {np.std(v):.3f}" if v else "–" for v in cells]
        lines.append(f"| {label(row)} | " + " | ".join(text) + " |")
    return "\n".join(lines)


def run_study(
    argv: list[str] | None, doc: str, default_out: str, record_of: Callable, table: Callable[[Path], str] = write_table
) -> int:
    """The command line of the layout studies: ``--table`` summarises a folder with ``table``, otherwise every
    pending set × seed runs ``record_of(data, seed, held_out_fraction)`` (``{"results": {rule: AUROC}, ...}``) into
    its result file."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", default=SETS)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--held-out", type=float, default=0.2)
    parser.add_argument("--cache", default="/work/data/cache/local_evidence")
    parser.add_argument("--out", default=default_out)
    parser.add_argument("--tag", default="n200")
    parser.add_argument("--table", help="only write FOLDER/table.md from the results in FOLDER")
    args = parser.parse_args(argv)
    if args.table:
        folder = Path(args.table)
        (folder / "table.md").write_text(table(folder))
        print((folder / "table.md").read_text())
        return 0
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for data, seed, target in pending_runs(Path(args.cache), args.datasets, args.seeds, out, args.tag):
        start = time.perf_counter()
        fields = record_of(data, seed, args.held_out)
        record = {"tag": args.tag, "dataset": data.name, "seed": seed, "n_train": len(data.train), **fields}
        record["seconds"] = time.perf_counter() - start
        target.write_text(json.dumps(record, indent=1))
        results = record["results"]
        print(f"{data.name} seed {seed}: " + ", ".join(f"{k} {v:.3f}" for k, v in results.items()), flush=True)
    return 0


def record_of(data, seed: int, frac: float) -> dict:
    """AUROC of every rule and the layout term's held-out/fit distance ratio."""
    return {"results": evaluate(data, seed, frac), "layout_held_over_fit_median": generalisation_gap(data, seed, frac)}


def main(argv: list[str] | None = None) -> int:
    return run_study(argv, __doc__, "docs/local_evidence/layout_scales", record_of)


if __name__ == "__main__":
    raise SystemExit(main())
