"""Table of the end-to-end fine-tuning runs against the frozen model on the same held-out seed (#13 with #14's score).

Reads result rows of ``compare_job.py`` (``local_evidence_baselines.py`` writes them): the frozen rows
(``gaussft_default_frozen[_seedN]``) and every fine-tuned row with a per-epoch history. For each fine-tuned run:
image (and pixel) AUROC, the difference to the frozen model of the same set and seed, the kept WiSE-FT α, the
pseudo-anomaly AUROC of α = 0 and of the kept weights, and the training loss's max / min over the epochs.

Example:
    python benchmarks/fine_tuning_local_report.py docs/results/results.jsonl docs/results/ft_local_*.jsonl \\
        --out docs/fine_tuning/local_loss.md
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from collections import defaultdict
from pathlib import Path

FROZEN = "gaussft_default_frozen"


def load(paths: list[Path]) -> list[dict]:
    """Every result row of the given ``.jsonl`` files (later files win for a repeated model and set)."""
    rows: dict[tuple[str, str], dict] = {}
    for path in paths:
        for line in path.read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                rows[(row["model"], row["dataset"])] = row
    return list(rows.values())


def seed_of(row: dict) -> int:
    """The held-out seed of a run (its ``seed`` kwarg, 0 by default)."""
    return int(row.get("model_kwargs", {}).get("seed", 0))


def recipe_of(row: dict) -> str:
    """A run's recipe: its kwargs without the seed and the architecture keys every run shares."""
    shared = {"map_gaussian", "image_score", "seed", "fine_tune_epochs"}  # every run: regional, local, 6 epochs
    kwargs = {k: v for k, v in row.get("model_kwargs", {}).items() if k not in shared}
    return ", ".join(f"{k}={v}" for k, v in sorted(kwargs.items())) or "defaults"


def loss_ratio(row: dict) -> float:
    """Training loss max / min over the epochs (the issue's stability bar: ≤ 2)."""
    losses = [h["loss"] for h in row["fine_tune_history"] if not math.isnan(h["loss"])]
    return max(losses) / min(losses)


def kept_pseudo_auroc(row: dict) -> float:
    """Pseudo-anomaly AUROC of the kept weights (WiSE-FT α, else the best epoch)."""
    if row.get("fine_tune_kept_alpha") is not None:
        return next(
            r["pseudo_auroc"] for r in row["fine_tune_interpolation"] if r["alpha"] == row["fine_tune_kept_alpha"]
        )
    return max(h["pseudo_auroc"] for h in row["fine_tune_history"])


def report(rows: list[dict]) -> str:
    """The Markdown tables: one row per fine-tuned run, then mean ± std of Δ per recipe and set."""
    frozen = {(r["dataset"], seed_of(r)): r for r in rows if r["model"].startswith(FROZEN)}
    tuned = [r for r in rows if r.get("fine_tune_history")]
    lines = [
        "| recipe | set | seed | image AUROC | Δ vs frozen | pixel AUROC (Δ) | kept α | pseudo-AUROC α=0 → kept "
        "| loss max/min |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    deltas: dict[tuple[str, str], list[float]] = defaultdict(list)
    for row in sorted(tuned, key=lambda r: (recipe_of(r), r["dataset"], seed_of(r))):
        base = frozen.get((row["dataset"], seed_of(row)))
        delta = row["image_auroc"] - base["image_auroc"] if base else float("nan")
        if base:
            deltas[(recipe_of(row), row["dataset"])].append(delta)
        pixel = "–"
        if row.get("pixel_auroc") is not None:
            pixel = f"{row['pixel_auroc']:.3f}"
            if base and base.get("pixel_auroc") is not None:
                pixel += f" ({row['pixel_auroc'] - base['pixel_auroc']:+.3f})"
        alpha = row.get("fine_tune_kept_alpha")
        lines.append(
            f"| {recipe_of(row)} | {row['dataset']} | {seed_of(row)} | {row['image_auroc']:.3f} | {delta:+.3f} "
            f"| {pixel} | "
            f"{alpha if alpha is not None else '–'} | {row['fine_tune_history'][0]['pseudo_auroc']:.3f} → "
            f"{kept_pseudo_auroc(row):.3f} | {loss_ratio(row):.2f} |"
        )
    lines += ["", "| recipe | set | runs | Δ image AUROC vs frozen, mean ± std |", "|---|---|---:|---:|"]
    for (recipe, dataset), values in sorted(deltas.items()):
        spread = f" ± {statistics.stdev(values):.3f}" if len(values) > 1 else " (one seed)"
        lines.append(f"| {recipe} | {dataset} | {len(values)} | {statistics.mean(values):+.3f}{spread} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="+", type=Path, help="result .jsonl files (frozen and fine-tuned rows)")
    parser.add_argument("--out", type=Path, default=Path("docs/fine_tuning/local_loss.md"))
    args = parser.parse_args(argv)
    text = report(load(args.results))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        "# End-to-end fine-tuning runs vs the frozen model (generated by benchmarks/fine_tuning_local_report.py)\n\n"
        + text
    )
    print(text)


if __name__ == "__main__":
    main()
