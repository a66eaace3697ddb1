"""Tables for issue #14 from docs/local_evidence/{baselines.jsonl, <tag>_<set>_seed<k>.json}.

Prints markdown (mean ± std over seeds) and writes ``OUT/<tag>_summary.json`` (and ``.csv``) with every
variant x set x metric aggregate.

    python benchmarks/local_evidence_report.py --dir docs/local_evidence --tag study
"""

from __future__ import annotations

import argparse
import collections
import csv
import json
import re
from pathlib import Path

import numpy as np

SETS = ("elpv_mono", "elpv_poly", "bsdata", "brick", "grass", "gravel")
MASK_SETS = ("bsdata", "brick", "grass", "gravel")
BASELINES = ("padim", "patchcore", "dfm", "gaussft_frozen")


def load_baselines(folder: Path) -> dict[str, dict[str, dict[str, float]]]:
    out: dict[str, dict[str, dict[str, float]]] = collections.defaultdict(dict)
    path = folder / "baselines.jsonl"
    if path.is_file():
        for line in path.read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                out[r["model"]][r["dataset"]] = r
    return out


def load_study(folder: Path, tag: str) -> dict[str, dict[str, dict[str, list[float]]]]:
    """variant -> set -> metric -> values over seeds."""
    agg: dict = collections.defaultdict(lambda: collections.defaultdict(lambda: collections.defaultdict(list)))
    pattern = re.compile(rf"^{re.escape(tag)}_(.+)_seed(\d+)\.json$")
    for path in sorted(folder.glob(f"{tag}_*_seed*.json")):
        m = pattern.match(path.name)
        if not m:
            continue
        record = json.loads(path.read_text())
        for variant, metrics in record["results"].items():
            for metric, value in metrics.items():
                agg[variant][record["dataset"]][metric].append(value)
    return agg


def fmt(values: list[float] | None, digits: int = 3) -> str:
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{np.mean(values):.{digits}f} ± {np.std(values, ddof=1):.{digits}f}"


def best_baseline(baselines: dict, dataset: str, metric: str, models=("padim", "patchcore", "dfm")) -> float | None:
    values = [baselines[m][dataset][metric] for m in models if dataset in baselines.get(m, {})]
    values = [v for v in values if v is not None]
    return max(values) if values else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", default="docs/local_evidence")
    parser.add_argument("--tag", default="study")
    parser.add_argument("--top", type=int, default=25, help="image-score variants listed (best worst-margin)")
    parser.add_argument("--image-metric", default="image_auroc")
    args = parser.parse_args(argv)
    folder = Path(args.dir)
    baselines = load_baselines(folder)
    study = load_study(folder, args.tag)
    sets = [s for s in SETS if any(s in v for v in study.values())]
    mask_sets = [s for s in MASK_SETS if s in sets]

    print("## Baselines (one run, 200 training images, lite0 224 px)\n")
    print("| model | " + " | ".join(f"{s} img" for s in sets) + " | " + " | ".join(f"{s} px" for s in mask_sets) + " |")
    print("|---|" + "---:|" * (len(sets) + len(mask_sets)))
    for model in BASELINES:
        row = baselines.get(model, {})
        cells = [f"{row[s]['image_auroc']:.3f}" if s in row else "–" for s in sets]
        cells += [f"{row[s]['pixel_auroc']:.3f}" if s in row and row[s].get("pixel_auroc") else "–" for s in mask_sets]
        print(f"| {model} | " + " | ".join(cells) + " |")

    # map variants: pixel AUROC
    print("\n## Map variants: pixel AUROC (mean ± std over seeds)\n")
    maps = [v for v in study if v.startswith("m_") or v == "default_all"]
    print("| variant | " + " | ".join(mask_sets) + " | mean | min margin vs PatchCore |")
    print("|---|" + "---:|" * (len(mask_sets) + 2))
    rows = []
    for v in maps:
        vals = [study[v][s].get("pixel_auroc") for s in mask_sets]
        if not all(vals):
            continue
        means = [float(np.mean(x)) for x in vals]
        pc = [baselines.get("patchcore", {}).get(s, {}).get("pixel_auroc") for s in mask_sets]
        margin = min(m - p for m, p in zip(means, pc, strict=True)) if all(p is not None for p in pc) else float("nan")
        rows.append((v, vals, float(np.mean(means)), margin))
    for v, vals, mean, margin in sorted(rows, key=lambda r: -r[2]):
        print(f"| {v} | " + " | ".join(fmt(x) for x in vals) + f" | {mean:.3f} | {margin:+.3f} |")

    # image scores
    print(f"\n## Image scores: {args.image_metric} (mean ± std over seeds), best {args.top} by worst margin\n")
    best = {s: best_baseline(baselines, s, "image_auroc") for s in sets}
    rows = []
    for v, per_set in study.items():
        if v.startswith(("m_", "stats_floats")):
            continue  # their image statistics appear as img_m_*
        vals = [per_set.get(s, {}).get(args.image_metric) for s in sets]
        if not all(vals):
            continue
        means = [float(np.mean(x)) for x in vals]
        margins = [m - b for m, b in zip(means, (best[s] for s in sets), strict=True) if b is not None]
        rows.append((v, vals, float(np.mean(means)), min(margins) if margins else float("nan")))
    rows.sort(key=lambda r: -r[3])
    print("| variant | " + " | ".join(sets) + " | mean | worst margin vs best baseline |")
    print("|---|" + "---:|" * (len(sets) + 2))
    print("| best baseline | " + " | ".join(f"{best[s]:.3f}" if best[s] else "–" for s in sets) + " | | |")
    shown = rows[: args.top] + [r for r in rows if r[0] in ("default_all", "img_pool")]
    for v, vals, mean, margin in shown:
        print(f"| {v} | " + " | ".join(fmt(x) for x in vals) + f" | {mean:.3f} | {margin:+.3f} |")

    summary = {
        v: {
            s: {
                m: {"mean": float(np.mean(x)), "std": float(np.std(x, ddof=1)) if len(x) > 1 else None, "n": len(x)}
                for m, x in per.items()
            }
            for s, per in per_set.items()
        }
        for v, per_set in study.items()
    }
    (folder / f"{args.tag}_summary.json").write_text(json.dumps(summary, indent=0))
    with (folder / f"{args.tag}_summary.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["variant", "dataset", "metric", "mean", "std", "n_seeds"])
        for v, per_set in summary.items():
            for s, per in per_set.items():
                for m, st in per.items():
                    writer.writerow(
                        [v, s, m, f"{st['mean']:.5f}", "" if st["std"] is None else f"{st['std']:.5f}", st["n"]]
                    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
