"""Per-epoch curves of end-to-end GaussFT runs: training loss and pseudo-anomaly AUROC per augmentation.

Reads the result rows that ``compare_job.py`` writes (``fine_tune_history``, ``fine_tune_interpolation``) and draws
one column per run. Example:
    python benchmarks/plot_fine_tuning_history.py docs/results/ft_local_*.jsonl --out docs/fine_tuning/local_loss.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib as mpl

mpl.use("Agg")
import matplotlib.pyplot as plt

KINDS = ("mixup", "cutmix", "cutout", "augmix")


def load_runs(paths: list[Path], models: set[str] | None) -> list[dict]:
    """Fine-tuned result rows (those with a history), by set, optionally of some models only."""
    rows = [json.loads(line) for path in paths for line in path.read_text().splitlines() if line.strip()]
    runs = [r for r in rows if r.get("fine_tune_history") and (models is None or r["model"] in models)]
    return sorted(runs, key=lambda r: (r["dataset"], r["model"]))  # the runs of one set side by side


def plot(runs: list[dict], out: Path) -> None:
    """Two rows of panels: loss per epoch (top), pseudo-anomaly AUROC per augmentation and pooled (bottom)."""
    fig, axes = plt.subplots(2, len(runs), figsize=(3.4 * len(runs), 6), squeeze=False, sharex=True)
    for column, run in enumerate(runs):
        history = run["fine_tune_history"]
        epochs = [h["epoch"] for h in history]
        top, bottom = axes[0][column], axes[1][column]
        top.plot(epochs[1:], [h["loss"] for h in history[1:]], "o-", color="black")
        top.set_title(f"{run['dataset']}\n{run['model']}\nimage AUROC {run['image_auroc']:.3f}", fontsize=8)
        top.set_ylabel("training loss" if column == 0 else "")
        for kind in KINDS:
            bottom.plot(epochs, [h[f"auroc_{kind}"] for h in history], ".-", label=kind, alpha=0.7)
        bottom.plot(epochs, [h["pseudo_auroc"] for h in history], "o-", color="black", label="all (selects)")
        alpha = run.get("fine_tune_kept_alpha")
        bottom.set_xlabel(f"epoch (kept: WiSE-FT α = {alpha})" if alpha is not None else "epoch")
        bottom.set_ylabel("pseudo-anomaly AUROC" if column == 0 else "")
        bottom.axhline(0.5, color="grey", linewidth=0.5)
    axes[1][0].legend(fontsize=7)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="+", type=Path, help="result .jsonl files of compare_job.py")
    parser.add_argument("--models", default=None, help="comma-separated model names to plot (default: all)")
    parser.add_argument("--out", type=Path, default=Path("docs/fine_tuning/history.png"))
    args = parser.parse_args(argv)
    runs = load_runs(args.results, set(args.models.split(",")) if args.models else None)
    if not runs:
        parser.error("no fine-tuned run with a per-epoch history in the given files")
    plot(runs, args.out)


if __name__ == "__main__":
    main()
