"""Tables and plots of the fine-tuning levers study (JSON from ``benchmarks/fine_tuning_levers.py``).

Example:
    python3 benchmarks/plot_fine_tuning_levers.py --runs docs/fine_tuning/levers --out docs/fine_tuning
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import matplotlib as mpl

mpl.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

LEVELS = [str(i) for i in range(9)]


def load(folder: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(folder.glob("*__seed*.json"))]


def level_series(run: dict, key: str, relative: bool = False) -> np.ndarray:
    """(epochs + 1, 9) array of a per-level diagnostic."""
    arr = np.array([[h["levels"][lvl][key] for lvl in LEVELS] for h in run["history"]], dtype=float)
    return arr / arr[0] if relative else arr


CHANNELS = [32, 16, 24, 40, 80, 112, 192, 320, 1280]  # tf_efficientnet_lite0's 9 levels


def shrunk_min_eigenvalue(run: dict) -> np.ndarray:
    """Smallest eigenvalue of the Ledoit-Wolf covariance, (1-s)·λ_min + s·tr/C, per epoch and level.

    The whitened loss's curvature along that direction is ∝ its inverse. λ_min of the empirical covariance
    is 0 when C ≥ n (levels 4-8 here): the shrinkage term alone then sets it.
    """
    n = run["n_fit"]
    out = []
    for h in run["history"]:
        row = []
        for i, lvl in enumerate(LEVELS):
            d = h["levels"][lvl]
            lam = 0.0 if CHANNELS[i] >= n else d["eig_min_nonzero"]
            row.append((1 - d["shrinkage"]) * lam + d["shrinkage"] * d["trace"] / CHANNELS[i])
        out.append(row)
    return np.array(out)


def diagnosis_plot(run: dict, out: Path) -> None:
    epochs = [h["epoch"] for h in run["history"]]
    fig, axes = plt.subplots(2, 4, figsize=(20, 8.5))
    ax = axes[0, 0]
    steps = [s for h in run["history"][1:] for s in h["step_losses"]]
    n_per = len(run["history"][1]["step_losses"])
    ax.plot(np.arange(len(steps)) / n_per + 0.5 / n_per, steps, ".-", lw=0.8, label="each step")
    ax.plot(epochs[1:], [h["loss"] for h in run["history"][1:]], "o-", lw=2, label="epoch mean")
    ax.set_yscale("log")
    ax.set_xlabel("epoch")
    ax.set_title("training loss Σ_levels d²/C (targets re-set at each epoch start)")
    ax.legend()
    colors = plt.cm.viridis(np.linspace(0, 1, 9))
    panels = [
        (axes[0, 1], "trace", True, "total variance tr(Σ_t)/tr(Σ_0)", True),
        (axes[0, 2], "shrunk_min", True, "min eigenvalue of the shrunk Σ (1/curvature), rel. to epoch 0", True),
        (axes[0, 3], "eig_min_nonzero", True, "smallest non-zero eigenvalue λ_min(t)/λ_min(0)", True),
        (axes[1, 0], "participation_ratio", False, "effective rank (participation ratio)", True),
        (axes[1, 1], "feature_norm", True, "mean pooled feature norm ‖f‖(t)/‖f‖(0)", False),
        (axes[1, 2], "d2_out_of_fold", False, "out-of-fold d²/C (cross-fit loss at epoch start)", True),
    ]
    for ax, key, rel, title, log in panels:
        if key == "shrunk_min":
            series = shrunk_min_eigenvalue(run)
            series = series / series[0]
        else:
            series = level_series(run, key, rel)
        for i, lvl in enumerate(LEVELS):
            ax.plot(epochs, series[:, i], "o-", color=colors[i], ms=3, label=f"level {lvl}")
        if log:
            ax.set_yscale("log")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("epoch")
    axes[0, 1].legend(fontsize=7, ncol=2)
    ax = axes[1, 3]
    ax.plot(epochs, [h["pseudo_auroc"] for h in run["history"]], "o-", label="pseudo-anomaly AUROC (held-out)")
    ax.plot(epochs, [h["test_auroc"] for h in run["history"]], "s-", label="real test AUROC (analysis only)")
    ax.set_title("AUROC")
    ax.set_xlabel("epoch")
    ax.legend(fontsize=8)
    fig.suptitle(f"{run['dataset']} — {run['name']} — seed {run['seed']}")
    fig.tight_layout()
    fig.savefig(out, dpi=80)
    plt.close(fig)


def curves_plot(runs: list[dict], names: list[str], out: Path) -> None:
    """Per-epoch loss (relative to epoch 1), pseudo AUROC and test AUROC, mean over seeds, one row per set."""
    sets = sorted({r["dataset"] for r in runs})
    fig, axes = plt.subplots(len(sets), 3, figsize=(16, 3.6 * len(sets)), squeeze=False)
    for row, dataset in enumerate(sets):
        for name in names:
            sel = [r for r in runs if r["dataset"] == dataset and r["name"] == name]
            if not sel:
                continue
            epochs = [h["epoch"] for h in sel[0]["history"]]
            for col, key in enumerate(["loss", "pseudo_auroc", "test_auroc"]):
                vals = np.array([[h[key] for h in r["history"]] for r in sel], dtype=float)
                if key == "loss":  # relative to each run's minimum: the stability criterion (≤ 2)
                    vals = vals / np.nanmin(vals, 1, keepdims=True)
                mean = np.nanmean(vals, 0)
                (line,) = axes[row, col].plot(epochs, mean, "o-", ms=3, label=f"{name} (n={len(sel)})")
                if len(sel) > 1:
                    std = np.nanstd(vals, 0)
                    axes[row, col].fill_between(epochs, mean - std, mean + std, color=line.get_color(), alpha=0.15)
        axes[row, 0].set_yscale("log")
        axes[row, 0].axhline(2.0, color="red", lw=0.8, ls="--")
        axes[row, 0].set_title(f"{dataset}: epoch loss / its minimum (≤ 2 required)")
        axes[row, 1].set_title(f"{dataset}: pseudo-anomaly AUROC (selection signal)")
        axes[row, 2].set_title(f"{dataset}: real test AUROC (analysis only)")
        for ax in axes[row]:
            ax.set_xlabel("epoch")
    axes[0, 2].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=75)
    plt.close(fig)


def fmt(values: list[float]) -> str:
    v = 100 * np.array(values)
    return f"{v.mean():.1f} ± {v.std():.1f}" if len(v) > 1 else f"{v.mean():.1f}"


def table(runs: list[dict], names: list[str], rule: str) -> str:
    """Markdown: per set, frozen and each config (test AUROC of what `rule` keeps), mean ± std over seeds."""
    sets = sorted({r["dataset"] for r in runs})
    lines = [
        "| config | " + " | ".join(sets) + " | mean Δ vs frozen |",
        "| --- | " + " | ".join("---" for _ in sets) + " | --- |",
    ]
    frozen = defaultdict(dict)
    for r in runs:
        frozen[r["dataset"]][r["seed"]] = r["selections"]["frozen"]["test_auroc"]
    lines.append(
        "| frozen | " + " | ".join(f"{fmt(list(frozen[s].values()))} (n={len(frozen[s])})" for s in sets) + " | 0 |"
    )
    for name in names:
        cells, deltas = [], []
        for s in sets:
            sel, vals, d = selected(runs, s, name, rule)
            if not sel:
                cells.append("—")
                continue
            deltas.append(np.mean(d))
            extra = ""
            if rule == "wise":
                extra = " α=" + ",".join(f"{r['selections']['wise']['alpha']:g}" for r in sel)
            elif rule == "best_pseudo_epoch":
                extra = " ep=" + ",".join(str(r["selections"]["best_pseudo_epoch"]["epoch"]) for r in sel)
            cells.append(f"{fmt(vals)} (Δ {100 * np.mean(d):+.1f}, n={len(sel)}){extra}")
        mean_delta = f"{100 * np.mean(deltas):+.2f}" if deltas else "—"
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {mean_delta} |")
    return "\n".join(lines)


def selected(runs: list[dict], dataset: str, name: str, rule: str) -> tuple[list[dict], list[float], list[float]]:
    """The runs of ``name`` on ``dataset``, their test AUROCs under ``rule`` and the deltas to frozen."""
    sel = [r for r in runs if r["dataset"] == dataset and r["name"] == name]
    vals = [r["selections"][rule]["test_auroc"] for r in sel]
    deltas = [r["selections"][rule]["test_auroc"] - r["selections"]["frozen"]["test_auroc"] for r in sel]
    return sel, vals, deltas


def final_table(runs: list[dict], rows: list[tuple[str, str, str]], sets: list[str]) -> str:
    """Markdown: frozen and (name, rule, label) rows, mean ± std over seeds per set, + mean over sets of Δ."""
    lines = [
        "| model | " + " | ".join(sets) + " | mean Δ (real sets) | worst seed Δ |",
        "| --- | " + " | ".join("---" for _ in sets) + " | --- | --- |",
    ]
    real = [s for s in sets if s.startswith(("elpv", "bsdata"))]
    frozen_cells = []
    for s in sets:
        vals = {r["seed"]: r["selections"]["frozen"]["test_auroc"] for r in runs if r["dataset"] == s}
        frozen_cells.append(f"{fmt(list(vals.values()))} (n={len(vals)})" if vals else "—")
    lines.append("| frozen | " + " | ".join(frozen_cells) + " | 0 | 0 |")
    for name, rule, label in rows:
        cells, deltas, worst = [], {}, []
        for s in sets:
            sel, vals, d = selected(runs, s, name, rule)
            if not sel:
                cells.append("—")
                continue
            deltas[s] = np.mean(d)
            worst += d
            cells.append(f"{fmt(vals)} (Δ {100 * np.mean(d):+.1f}, n={len(sel)})")
        real_d = [deltas[s] for s in real if s in deltas]
        mean_real = f"{100 * np.mean(real_d):+.2f} ({len(real_d)} sets)" if real_d else "—"
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {mean_real} | {100 * min(worst):+.1f} |")
    return "\n".join(lines)


def loss_ratio_table(runs: list[dict], names: list[str]) -> str:
    """Max over epochs of (epoch loss / min epoch loss) per run: the issue's ≤ 2× criterion."""
    sets = sorted({r["dataset"] for r in runs})
    lines = ["| config | " + " | ".join(sets) + " |", "| --- | " + " | ".join("---" for _ in sets) + " |"]
    for name in names:
        cells = []
        for s in sets:
            sel = [r for r in runs if r["dataset"] == s and r["name"] == name]
            ratios = []
            for r in sel:
                losses = np.array([h["loss"] for h in r["history"][1:]])
                ratios.append(losses.max() / losses.min())
            cells.append(", ".join(f"{x:.2f}" for x in ratios) if ratios else "—")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", default="docs/fine_tuning/levers")
    parser.add_argument("--out", default="docs/fine_tuning")
    parser.add_argument("--names", nargs="*", default=None)
    parser.add_argument("--diagnose", nargs="*", default=[], help="run files to draw a diagnosis plot for")
    args = parser.parse_args()
    runs = load(Path(args.runs))
    names = args.names or sorted({r["name"] for r in runs})
    out = Path(args.out)
    for path in args.diagnose:
        run = json.loads(Path(path).read_text())
        run.setdefault("name", Path(path).stem)
        diagnosis_plot(run, out / f"diagnosis_{Path(path).stem}.png")
    curves_plot(runs, names, out / "levers_curves.png")
    final = [n for n in ("base", "late_schedule-warmup_cosine") if n in names]
    curves_plot(runs, final, out / "levers_final_curves.png")
    text = []
    for rule in ("best_pseudo_epoch", "wise", "last"):
        text += [f"### test image AUROC (%) of the model kept by rule `{rule}`", "", table(runs, names, rule), ""]
    text += ["### max epoch loss / min epoch loss (per seed)", "", loss_ratio_table(runs, names), ""]
    (out / "levers_tables.md").write_text("\n".join(text))
    print("\n".join(text))


if __name__ == "__main__":
    main()
