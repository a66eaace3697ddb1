"""Which terms the image score should sum: every set's image AUROC per combination, and its worst deficit.

Reads ``local_evidence_study.py`` results (the 20 % held-out protocol with refit, one JSON per set and seed) and
the baselines' rows (``local_evidence_baselines.py``), and writes a markdown table of image AUROC (mean ± std
over the seeds) for the terms the package can sum, each z-scored on the held-out normals:

* P: the paper's pooled score (Σ over the 9 levels of the pooled-feature Mahalanobis distance);
* L: the layout distance (level 5 pooled to 3 × 3, one joint Gaussian);
* M: the mean of the map's top 1 % (the map variant ``--map``).

The last rows give, per combination, the mean over the sets and the worst difference to the best of PaDiM,
PatchCore and DFM. Command used for docs/local_evidence/score_terms.md::

    python benchmarks/score_terms_table.py --study docs/local_evidence --tags regions,unseen \
        --baselines docs/local_evidence/baselines.jsonl --out docs/local_evidence/score_terms.md

The combination rules at 200 and at all training images (docs/local_evidence/score_rules/)::

    python benchmarks/score_terms_table.py --study docs/local_evidence/score_rules --tags n200 \
        --baselines docs/local_evidence/baselines.jsonl --out docs/local_evidence/score_rules/n200.md
    python benchmarks/score_terms_table.py --study docs/local_evidence/score_rules --tags full \
        --baselines docs/results/full/results.jsonl --out docs/local_evidence/score_rules/full.md
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

SETS = ("elpv_mono", "elpv_poly", "bsdata", "magnetic_tile", "kolektorsdd", "deeppcb", "brick", "grass", "gravel")
BASELINES = ("padim", "patchcore", "dfm")


def combinations(map_variant: str) -> dict[str, str]:
    """Label → the study's result key of each combination of P, L and M."""
    layout, top = "g_l5_3j_max", f"{map_variant}_top1"
    return {
        "P (the paper's pooled score)": "default_all",
        "L (layout)": f"img_{layout}",
        "M (map top 1 %)": f"img_{top}",
        "L + M (`local`)": f"comb2_z[{layout}+{top}]",
        "L + M, Fisher's sum of Gaussian tails": f"comb2_fisher[{layout}+{top}]",
        "L + M, max of the z-scores": f"comb2_zmax[{layout}+{top}]",
        "P + M": f"comb_z[pool+{top}]",
        "P + L + M (`combined`)": f"comb3_z[pool+{layout}+{top}]",
    }


def image_auroc(value: float | dict) -> float:
    return value["image_auroc"] if isinstance(value, dict) else value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--study", type=Path, default=Path("docs/local_evidence"))
    parser.add_argument("--tags", default="regions,unseen", help="study tags whose JSONs to read (first found wins)")
    parser.add_argument("--map", default="m_r12_k3", help="map variant of the M term (the default map)")
    parser.add_argument("--baselines", type=Path, default=Path("docs/local_evidence/baselines.jsonl"))
    parser.add_argument("--out", type=Path, default=Path("docs/local_evidence/score_terms.md"))
    args = parser.parse_args(argv)

    baselines: dict[str, dict[str, float]] = {}
    for line in args.baselines.read_text().splitlines():
        row = json.loads(line)
        if row["model"] in BASELINES:
            baselines.setdefault(row["dataset"], {})[row["model"]] = row["image_auroc"]
    labels = combinations(args.map)
    table: dict[str, dict[str, list[float]]] = {label: {} for label in labels}
    sets = []
    for name in SETS:
        files = []
        for tag in args.tags.split(","):
            files = sorted(args.study.glob(f"{tag}_{name}_seed*.json"))
            if files:
                break
        if not files:
            continue
        sets.append(name)
        runs = [json.loads(path.read_text())["results"] for path in files]
        for label, key in labels.items():
            values = [image_auroc(run[key]) for run in runs if key in run]  # older runs lack the newer rules
            if values:
                table[label][name] = values

    best = {s: max(baselines[s].values()) for s in sets}
    lines = [
        "| image score | " + " | ".join(sets) + " | mean | worst − best baseline |",
        "|---|" + "---:|" * (len(sets) + 2),
        "| best of PaDiM / PatchCore / DFM | " + " | ".join(f"{best[s]:.3f}" for s in sets) + " | | |",
    ]
    for label in labels:
        if not table[label]:
            continue
        means = {s: float(np.mean(values)) for s, values in table[label].items()}
        cells = []
        for s in sets:
            values = table[label].get(s, [])
            spread = f" ± {np.std(values, ddof=1):.3f}" if len(values) > 1 else ""
            cells.append(f"{means[s]:.3f}{spread}" if values else "–")
        worst = min(means, key=lambda s: means[s] - best[s])
        summary = f"{np.mean(list(means.values())):.3f} | {means[worst] - best[worst]:+.3f} ({worst})"
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {summary} |")
    seeds = sorted({len(v) for row in table.values() for v in row.values()})
    lines += ["", f"Seeds per set: {seeds}; map of the M term: `{args.map}`; tags read: {args.tags}."]
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
