"""One table of every model side by side on the real sets (docs/results.md), from the result rows of the runs.

Reads result rows written by ``benchmarks/local_evidence_baselines.py`` (compare.py's child job per model and set,
with per-image scores saved): the GaussFT rows of ``--results`` and the PaDiM / PatchCore / DFM rows (and the
pre-#14 GaussFT default, ``gaussft_frozen``) of ``--baselines``. Same backbone (``tf_efficientnet_lite0``, 224 px),
same training subsets (at most 200 images, compare.py's seeded draw), complete test sets, raw scores, sklearn
AUROC. For the image AUROC, a paired bootstrap over the test images (2000 resamples, normal and anomalous images
resampled separately) gives the 95 % interval of default GaussFT minus the best baseline.

    python benchmarks/results_table.py --results docs/results/r19/results.jsonl \
        --previous _r18=docs/results/r18/results.jsonl --previous _r17=docs/results/r17/results.jsonl \
        --previous _r13=docs/results/r13/results.jsonl --previous _avg=docs/results/r12/results.jsonl \
        --previous _combined=docs/results/c3/results.jsonl --previous _r7=docs/results/k3/results.jsonl \
        --previous _k1=docs/results/results.jsonl --baselines docs/results/r18_pc10/baselines.jsonl \
        --baselines _2pct=docs/local_evidence/baselines.jsonl --out docs/results/table.md --pixel-seeds

``--baselines [SUFFIX=]PATH`` (repeatable): PaDiM / PatchCore / DFM rows; a suffixed file adds its rows renamed
(``_2pct``: PatchCore at a 2 % coreset beside the first file's 10 %), and the bar is the best of all of them.

``--previous SUFFIX=PATH``: the rows of an option or an earlier default, shown as rows of their own (``_r18``: the
layout excess unweighted, the heatmap before r19; ``_r17``: the image score's map term without the layout map's
excess, ``score_layout_map: false``, frozen row only; ``_r13``: the fused heatmap without the layout map,
``map_layout: false``; ``_avg``: the averaged heatmap without the detail map, ``map_detail_levels: []``;
``_combined``: ``image_score: combined``, fine-tuned and frozen, run with the averaged heatmap; ``_r7``: 7 × 7
regions; ``_k1``: no neighbourhood average either; only the frozen row of the latter two). Tables over held-out
seeds follow for the default's runs and for the ``--seeds-from`` runs.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score

SETS = ("elpv_mono", "elpv_poly", "bsdata", "magnetic_tile", "kolektorsdd", "deeppcb", "brick", "grass", "gravel")
SEEDS_LABELS = {"_combined": "`image_score: combined`", "_k1": "7 × 7 regions, `map_neighbourhood: 1`"}
BASELINES = ("padim", "patchcore", "dfm")
STATS_SETS = ("magnetic_tile", "bsdata", "elpv_mono")  # where the statistics column is read, first present
LABELS = {
    "gaussft_default": "**GaussFT default** (fine-tuned, 10 × 10 regional maps of 3 × 3 means fused with the "
    "unaveraged stride-8 map and the layout map's excess, weighted by what the local maps missed; local score whose "
    "map term reads the layout map's excess; layout on two grids one position apart)",
    "gaussft_default_frozen": "GaussFT frozen (`fine_tune_epochs: 0`, otherwise today's default)",
    "gaussft_default_r19": "GaussFT fine-tuned, one layout grid, 12 × 12 regions (`layout_grids: 1`, "
    "`map_regions: 12`: r19, the default before)",
    "gaussft_default_frozen_r19": "GaussFT frozen, one layout grid, 12 × 12 regions (r19)",
    "gaussft_default_r18": "GaussFT fine-tuned, layout excess unweighted (r18)",
    "gaussft_default_frozen_r18": "GaussFT frozen, layout excess unweighted (r18)",
    "gaussft_default_frozen_r17": "GaussFT frozen, map term without the layout excess (`score_layout_map: false`, "
    "the default before)",
    "gaussft_default_r13": "GaussFT fine-tuned, fused heatmap without the layout map (`map_layout: false`, the "
    "default before)",
    "gaussft_default_frozen_r13": "GaussFT frozen, `map_layout: false`",
    "gaussft_default_avg": "GaussFT fine-tuned, averaged heatmap only (`map_detail_levels: []`, `map_layout: false`)",
    "gaussft_default_frozen_avg": "GaussFT frozen, averaged heatmap only",
    "gaussft_default_combined": "GaussFT fine-tuned, `image_score: combined` (option for unaligned surfaces; "
    "averaged heatmap)",
    "gaussft_default_frozen_combined": "GaussFT frozen, `image_score: combined` (averaged heatmap)",
    "gaussft_default_frozen_r7": "GaussFT frozen, local score, 7 × 7 regions (`map_regions: 7`)",
    "gaussft_default_frozen_k1": "GaussFT frozen, local score, 7 × 7 regions, no neighbourhood average",
    "gaussft_frozen": "GaussFT before #14 (frozen, shared maps, paper's pooled score)",
    "padim": "PaDiM (blocks 1, 2, 4; 100 dims)",
    "patchcore": "PatchCore (blocks 2, 4)",  # the coreset ratio is read from its rows (``patchcore_label``)
    "dfm": "DFM (block 4, PCA 97 %)",
}


def load_rows(path: Path, suffix: str = "", only: tuple[str, ...] | None = None) -> dict[tuple[str, str], dict]:
    """Rows of a results file keyed by (model + ``suffix``, set); each remembers where its per-image scores are."""
    rows = {}
    for line in path.read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            if only is None or row["model"] in only:
                scores = path.parent / "scores" / f"{row['model']}__{row['dataset']}.npz"
                rows[(row["model"] + suffix, row["dataset"])] = {**row, "scores_file": scores}
    return rows


def load_baselines(specs: list[str]) -> tuple[dict[tuple[str, str], dict], list[str]]:
    """The baseline rows of every ``[SUFFIX=]PATH`` and the names of the models that set the bars.

    A file adds its PaDiM / PatchCore / DFM rows and the pre-#14 GaussFT row (``gaussft_frozen``); a suffixed one
    only the former, renamed (e.g. ``_2pct=...``: PatchCore at another coreset ratio as ``patchcore_2pct``); the bar
    is the best of all of them.
    """
    rows: dict[tuple[str, str], dict] = {}
    for spec in specs:
        suffix, _, path = spec.rpartition("=")
        rows.update(load_rows(Path(path), suffix, BASELINES if suffix else (*BASELINES, "gaussft_frozen")))
    bars = {m for m, _ in rows if m.split("_")[0] in BASELINES}
    return rows, sorted(bars, key=lambda m: (BASELINES.index(m.split("_")[0]), m))  # ties go to the first


def rows_models(rows: dict[tuple[str, str], dict]) -> set[str]:
    return {model for model, _ in rows}


def paired_bootstrap(labels: np.ndarray, a: np.ndarray, b: np.ndarray, n_boot: int = 2000, seed: int = 0) -> tuple:
    """AUROC(a) − AUROC(b) and its 95 % percentile interval (normal and anomalous images resampled separately)."""
    rng = np.random.default_rng(seed)
    pos, neg = np.flatnonzero(labels == 1), np.flatnonzero(labels == 0)
    diffs = []
    for _ in range(n_boot):
        idx = np.concatenate([rng.choice(pos, pos.size), rng.choice(neg, neg.size)])
        diffs.append(roc_auc_score(labels[idx], a[idx]) - roc_auc_score(labels[idx], b[idx]))
    lo, hi = np.percentile(diffs, [2.5, 97.5])
    return roc_auc_score(labels, a) - roc_auc_score(labels, b), lo, hi


def aligned_scores(ours: Path, theirs: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Labels and both models' scores on the same test images (aligned by path)."""
    a, b = np.load(ours), np.load(theirs)
    order = {p: i for i, p in enumerate(a["path"])}
    idx = np.array([order[p] for p in b["path"]])
    if not (a["label"][idx] == b["label"]).all():
        msg = f"labels differ between {ours} and {theirs}"
        raise ValueError(msg)
    return b["label"].astype(int), a["score"][idx], b["score"]


def patchcore_label(rows: dict[tuple[str, str], dict], model: str = "patchcore") -> str:
    """A PatchCore row's label with the coreset ratio(s) its rows were fitted with."""
    ratios = sorted(
        {r["model_kwargs"]["coreset_sampling_ratio"] for (m, _), r in rows.items() if m == model}, reverse=True
    )
    return f"PatchCore (blocks 2, 4; coreset {' / '.join(f'{100 * x:g} %' for x in ratios)})"


def fmt(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}"


def over_seeds(
    rows: dict[tuple[str, str], dict], sets: list[str], base: str, title: str, metric: str = "image_auroc"
) -> list[str]:
    """``base`` and its ``base_seed<N>`` runs side by side, with mean ± std, on the sets every run has."""
    seeded = sorted(m for m in rows_models(rows) if m.startswith(f"{base}_seed"))
    if not seeded:
        return []
    runs = [base, *seeded]
    lines = [
        "",
        title.format(last=len(runs) - 1),
        "",
        "| set | " + " | ".join(f"seed {i}" for i in range(len(runs))) + " | mean ± std |",
        "|---|" + "---:|" * (len(runs) + 1),
    ]
    for s in sets:
        values = [rows[(m, s)].get(metric) for m in runs if (m, s) in rows]
        if len(values) == len(runs) and None not in values:
            spread = f"{np.mean(values):.3f} ± {np.std(values, ddof=1):.3f}"
            lines.append(f"| {s} | " + " | ".join(f"{v:.3f}" for v in values) + f" | {spread} |")
    return lines if len(lines) > 5 else []


def seed_tables(rows: dict[tuple[str, str], dict], sets: list[str], config: str, pixel: bool = False) -> list[str]:
    """Frozen GaussFT over held-out seeds, and fine-tuned minus frozen per seed; ``config`` names the map run.

    With ``pixel``, also the pixel AUROC of the frozen and the fine-tuned default over held-out seeds.
    """
    lines = over_seeds(
        rows,
        sets,
        "gaussft_default_frozen",
        f"GaussFT frozen over held-out seeds (`seed` 0-{{last}}: which 20 % are held out), image AUROC ({config}):",
    )
    if pixel:
        for base, name in (("gaussft_default_frozen", "GaussFT frozen"), ("gaussft_default", "GaussFT default")):
            title = f"{name} over held-out seeds (`seed` 0-{{last}}), pixel AUROC ({config}):"
            lines += over_seeds(rows, sets, base, title, "pixel_auroc")
    pairs = [("gaussft_default", "gaussft_default_frozen", 0)]
    pairs += [
        (m, m.replace("gaussft_default_seed", "gaussft_default_frozen_seed"), int(m.rsplit("seed", 1)[1]))
        for m in sorted(rows_models(rows))
        if m.startswith("gaussft_default_seed")
    ]
    if len(pairs) > 1:
        lines += [
            "",
            f"Fine-tuned (default) minus frozen GaussFT, image AUROC, same held-out seed ({config}):",
            "",
            "| set | " + " | ".join(f"seed {seed}" for _, _, seed in pairs) + " |",
            "|---|" + "---:|" * len(pairs),
        ]
        for s in sets:
            cells = [
                f"{rows[(ft, s)]['image_auroc'] - rows[(fr, s)]['image_auroc']:+.4f}"
                if (ft, s) in rows and (fr, s) in rows
                else "–"
                for ft, fr, _ in pairs
            ]
            if any(cell != "–" for cell in cells[1:]):
                lines.append(f"| {s} | " + " | ".join(cells) + " |")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", type=Path, default=Path("docs/results/k3/results.jsonl"))
    parser.add_argument(
        "--previous",
        action="append",
        default=[],
        metavar="SUFFIX=PATH",
        help="frozen rows of an earlier default, e.g. _r7=docs/results/k3/results.jsonl (repeatable)",
    )
    parser.add_argument(
        "--baselines",
        action="append",
        metavar="[SUFFIX=]PATH",
        help="baseline rows (repeatable; default docs/local_evidence/baselines.jsonl), e.g. "
        "_2pct=docs/local_evidence/baselines.jsonl for PatchCore at another coreset ratio beside the first file's",
    )
    parser.add_argument("--seeds-from", default="_combined", help="the --previous SUFFIX whose seed tables follow")
    parser.add_argument("--out", type=Path, default=Path("docs/results/table.md"))
    parser.add_argument("--pixel-seeds", action="store_true", help="also tables of pixel AUROC over held-out seeds")
    args = parser.parse_args(argv)
    baselines, bar_models = load_baselines(args.baselines or ["docs/local_evidence/baselines.jsonl"])
    rows = {**baselines, **load_rows(args.results)}
    previous: dict[str, dict[tuple[str, str], dict]] = {}
    for spec in args.previous:
        suffix, _, path = spec.partition("=")
        previous[suffix] = load_rows(Path(path))
        kept = ("gaussft_default_frozen", "gaussft_default")  # shown where LABELS names them
        rows.update({(f"{m}{suffix}", d): r for (m, d), r in previous[suffix].items() if m in kept})
    patchcores = sorted(m for m in bar_models if m.startswith("patchcore"))
    labels = {}
    for model, label in LABELS.items():  # other PatchCore rows right after anomalib's default one
        labels.update({m: patchcore_label(rows, m) for m in patchcores} if model == "patchcore" else {model: label})
    models = [m for m in labels if any((m, s) in rows for s in SETS)]
    sets = [s for s in SETS if any((m, s) in rows for m in ("gaussft_default", "gaussft_default_frozen"))]

    def ours(s: str) -> dict:
        return rows.get(("gaussft_default", s)) or rows[("gaussft_default_frozen", s)]

    pixel_sets = [s for s in sets if ours(s).get("pixel_auroc") is not None]
    lines = [
        "| model | "
        + " | ".join(f"{s} image" for s in sets)
        + " | "
        + " | ".join(f"{s} pixel" for s in pixel_sets)
        + " | statistics MiB | fit s (ELPV mono) |",
    ]
    lines.append("|---|" + "---:|" * (len(sets) + len(pixel_sets) + 2))
    best_image = {s: max(rows[(m, s)]["image_auroc"] for m in bar_models if (m, s) in rows) for s in sets}
    best_pixel = {
        s: max((rows[(m, s)].get("pixel_auroc") or 0 for m in patchcores if (m, s) in rows), default=None) for s in sets
    }
    for model in models:
        cells = []
        for s in sets:
            value = rows.get((model, s), {}).get("image_auroc")
            bold = value is not None and model in bar_models and value == best_image[s]
            cells.append(f"**{fmt(value)}**" if bold else fmt(value))
        for s in pixel_sets:
            value = rows.get((model, s), {}).get("pixel_auroc")
            bold = value is not None and value == best_pixel[s] and model in patchcores
            cells.append(f"*{fmt(value)}*" if bold else fmt(value))
        # a set every run of the default has: rows carried over from earlier runs (ELPV) predate later statistics
        candidates = STATS_SETS if model.startswith("gaussft_default") else ()
        stats_set = next((s for s in candidates if (model, s) in rows), sets[0])
        stats = rows.get((model, stats_set), {}).get("stats_mb")
        fit = rows.get((model, "elpv_mono"), {}).get("fit_s")
        lines.append(
            f"| {labels[model]} | " + " | ".join(cells) + f" | {stats:.1f} | {fit:.0f} |"
            if stats is not None and fit is not None
            else f"| {labels[model]} | " + " | ".join(cells) + " | – | – |"
        )
    lines += ["", "Bold: the best baseline's image AUROC; italic: PatchCore's best pixel AUROC (the issue's bars).", ""]
    lines += [
        "| set | default − best baseline, image AUROC [95 % CI] | frozen − best baseline [95 % CI] | "
        "default (else frozen) − PatchCore, pixel AUROC |",
        "|---|---:|---:|---:|",
    ]
    for s in sets:
        best = max((m for m in bar_models if (m, s) in rows), key=lambda m: rows[(m, s)]["image_auroc"])
        cells = []
        for name in ("gaussft_default", "gaussft_default_frozen"):
            if (name, s) not in rows:
                cells.append("–")
                continue
            labels, a, b = aligned_scores(rows[(name, s)]["scores_file"], rows[(best, s)]["scores_file"])
            diff, lo, hi = paired_bootstrap(labels, a, b)
            cells.append(f"{diff:+.3f} [{lo:+.3f}, {hi:+.3f}] ({best})")
        pixel = ours(s).get("pixel_auroc")  # the fine-tuned default where it ran, else frozen
        patchcore = best_pixel[s]  # PatchCore did not run on every set
        pixel_cell = f"{pixel - patchcore:+.3f}" if pixel is not None and patchcore else "–"
        lines.append(f"| {s} | " + " | ".join(cells) + f" | {pixel_cell} |")
    lines += seed_tables(rows, sets, "the default", args.pixel_seeds)
    if args.seeds_from in previous:
        lines += seed_tables(previous[args.seeds_from], sets, SEEDS_LABELS.get(args.seeds_from, args.seeds_from))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
