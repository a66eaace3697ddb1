"""Training-curve plot of a fine-tuning run: loss, forgetting metric and the chosen epoch."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib as mpl

mpl.use("Agg")
import matplotlib.pyplot as plt


def save_training_curve(history: list[dict[str, float]], best_epoch: int, path: Path) -> Path:
    """Plot the per-epoch loss and pseudo-anomaly AUROC to ``path`` (PNG) and the history to ``.json``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.with_suffix(".json").write_text(json.dumps({"best_epoch": best_epoch, "history": history}, indent=2))
    epochs = [h["epoch"] for h in history]
    fig, loss_axis = plt.subplots(figsize=(7, 4), dpi=110)
    loss_axis.plot(epochs[1:], [h["loss"] for h in history[1:]], "o-", color="tab:blue", label="train loss")
    loss_axis.set_xlabel("epoch (0 = pretrained)")
    loss_axis.set_ylabel("Mahalanobis loss (Σ levels d²/C)", color="tab:blue")
    auroc_axis = loss_axis.twinx()
    auroc_axis.plot(epochs, [h["pseudo_auroc"] for h in history], "s-", color="tab:red", label="pseudo-anomaly AUROC")
    for key in sorted(k for k in history[0] if k.startswith("auroc_") and k != "auroc_all"):
        auroc_axis.plot(epochs, [h[key] for h in history], ":", alpha=0.6, label=key.removeprefix("auroc_"))
    auroc_axis.set_ylabel("held-out pseudo-anomaly AUROC", color="tab:red")
    auroc_axis.axvline(best_epoch, color="k", linestyle="--", label=f"kept epoch {best_epoch}")
    handles = loss_axis.get_legend_handles_labels()[0] + auroc_axis.get_legend_handles_labels()[0]
    auroc_axis.legend(handles=handles, loc="lower right", fontsize=8)
    loss_axis.set_title("GaussFT fine-tuning: forgetting detection")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
