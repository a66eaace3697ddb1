"""Training-curve plot of a fine-tuning run: loss, forgetting metric and the kept epoch."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator


def save_training_curve(
    history: list[dict[str, float]],
    best_epoch: int,
    path: Path,
    note: str | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Plot the per-epoch loss and pseudo-anomaly AUROC to ``path`` (PNG) and the history to ``.json``.

    ``best_epoch``: the epoch whose weights were kept (or interpolated, see ``note``); ``extra``: more JSON fields.
    Uses an explicit ``Figure`` (no pyplot): it does not touch the process's matplotlib backend.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {"best_epoch": best_epoch, "history": history, **(extra or {})}
    path.with_suffix(".json").write_text(json.dumps(record, indent=2))
    epochs = [h["epoch"] for h in history]
    figure = Figure(figsize=(7.5, 4.8), dpi=110)
    loss_axis = figure.add_subplot()
    trained = [h for h in history if not math.isnan(h.get("loss", math.nan))]
    loss_axis.plot([h["epoch"] for h in trained], [h["loss"] for h in trained], "o-", color="tab:blue", label="loss")
    loss_axis.set_xlabel("epoch (0 = pretrained network)")
    loss_axis.set_ylabel("training loss (Σ levels d²/C)", color="tab:blue")
    loss_axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    auroc_axis = loss_axis.twinx()
    auroc_axis.plot(epochs, [h["pseudo_auroc"] for h in history], "s-", color="tab:red", label="pseudo-anomaly AUROC")
    for key in sorted(k for k in history[0] if k.startswith("auroc_") and k != "auroc_all"):
        auroc_axis.plot(epochs, [h[key] for h in history], ":", alpha=0.6, label=key.removeprefix("auroc_"))
    auroc_axis.set_ylabel("held-out pseudo-anomaly AUROC", color="tab:red")
    auroc_axis.axvline(best_epoch, color="k", linestyle="--", label=note or f"kept epoch {best_epoch}")
    handles = loss_axis.get_legend_handles_labels()[0] + auroc_axis.get_legend_handles_labels()[0]
    # Below the axes, so that it never covers a curve.
    figure.legend(handles=handles, loc="lower center", ncol=4, fontsize=8, frameon=False)
    loss_axis.set_title("GaussFT fine-tuning: forgetting detection")
    figure.tight_layout(rect=(0, 0.12, 1, 1))
    figure.savefig(path)
    return path
