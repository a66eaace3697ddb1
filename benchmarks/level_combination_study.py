"""Combining the per-level tests into one image decision: summed score vs Fisher, Simes, Cauchy, Bonferroni.

GaussFT scores every feature level with a Mahalanobis distance. With held-out normal calibration images,
each level gives a conformal p-value ``p_l = (1 + #{calibration scores of level l ≥ s_l}) / (n + 1)``.
This study compares, on the ELPV test split (real normals and real defects, never used for fitting or
calibration), the decisions ``p ≤ α`` of:

* ``sum``: the paper's summed score, one conformal p-value (what GaussFT ships);
* ``fisher`` / ``simes`` / ``cauchy`` / ``bonferroni`` combinations of the per-level p-values, each
  (a) at its *nominal* null (chi² with 2L degrees of freedom, Simes, the Cauchy combination test,
  ``L · min p``), which assumes independent or positively dependent levels, and
  (b) *calibrated*: the combined statistic treated as a score and calibrated conformally on the same
  calibration images (their own per-level p-values are computed leave-one-out).

Reported: observed false-alarm rate on the test normals with a 95% binomial interval, recall on the test
defects, and the AUROC of each statistic. One frozen fit per cell type.

Example:
    HF_HUB_CACHE=$(cd ../shared/hf-cache/hub && pwd) HF_HUB_OFFLINE=1 \
    python benchmarks/level_combination_study.py --data-root /tmp/data --out docs/level_combination.md
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import numpy as np
import torch
from anomalib.engine import Engine
from scipy.stats import binomtest
from sklearn.metrics import roc_auc_score
from torch.utils.data import DataLoader, Subset

from anomalib_gaussft import GaussFT
from anomalib_gaussft.gaussft.calibration import (
    LEVEL_COMBINATIONS,
    calibrated_combination,
    combine_p_values,
    conformal_p_values,
    level_p_values,
)
from common import BACKBONE, elpv_datamodule

RATES = (0.01, 0.05, 0.10)


def level_scores(model: GaussFT, loader) -> tuple[np.ndarray, np.ndarray]:
    """Per-level Mahalanobis distances ``(N, L)`` and labels of a loader's images."""
    scores, labels = [], []
    for item in model.model.iter_features(loader, model.preprocess):
        scores.append(model.model.level_distances(item.features).cpu())
        labels.append(item.batch.gt_label.cpu())
    return torch.cat(scores).double().numpy(), torch.cat(labels).int().numpy()


def images_of(datamodule, paths: frozenset[str]) -> DataLoader:
    """A loader of the datamodule's training images whose paths are in ``paths``, in dataset order."""
    dataset = datamodule.train_data
    indices = [i for i, path in enumerate(dataset.samples["image_path"]) if str(path) in paths]
    return DataLoader(
        Subset(dataset, indices), batch_size=datamodule.eval_batch_size, shuffle=False, collate_fn=dataset.collate_fn
    )


def study(cell_type: str, data_root: Path, held_out_fraction: float) -> dict:
    datamodule = elpv_datamodule(data_root, cell_type=cell_type)
    model = GaussFT(backbone=BACKBONE, fine_tune_epochs=0, false_alarm_rate=0.05, held_out_fraction=held_out_fraction)
    engine = Engine(default_root_dir=f"/tmp/level_combination_{cell_type}", logger=False, limit_val_batches=0)
    engine.fit(model=model, datamodule=datamodule)
    # The calibration normals: held out of the fit (GaussFT releases the split's dataset after fitting, its paths stay).
    calibration, _ = level_scores(model, images_of(datamodule, model.held_out.held_out_paths))
    test, labels = level_scores(model, datamodule.test_dataloader())
    return {"calibration": calibration.tolist(), "test": test.tolist(), "labels": labels.tolist()}


def evaluate(data: dict) -> list[dict]:
    calibration = torch.tensor(data["calibration"], dtype=torch.float64)
    test = torch.tensor(data["test"], dtype=torch.float64)
    labels = np.asarray(data["labels"]).astype(bool)
    statistics = {"sum": conformal_p_values(test.sum(1), calibration.sum(1))}
    for method in LEVEL_COMBINATIONS:
        statistics[f"{method}, nominal"] = combine_p_values(level_p_values(test, calibration), method)
        statistics[f"{method}, calibrated"] = calibrated_combination(test, calibration, method)
    rows = []
    for name, p_tensor in statistics.items():
        p = p_tensor.numpy()
        row = {"method": name, "auroc": float(roc_auc_score(labels, -p))}
        for rate in RATES:
            flagged = p <= rate + 1e-12
            false_alarms = int(flagged[~labels].sum())
            ci = binomtest(false_alarms, int((~labels).sum())).proportion_ci(0.95)
            row[rate] = (false_alarms / (~labels).sum(), ci.low, ci.high, float(flagged[labels].mean()))
        rows.append(row)
    return rows


def resplit(data: dict, draws: int = 200) -> str:
    """The guarantee is marginal over calibration draws: re-draw the calibration set many times.

    The calibration normals and the test normals are all images the Gaussians were not fitted on, so they
    are exchangeable; pooling them and re-splitting (same sizes) shows the average false-alarm rate and
    how much one calibration draw moves it.
    """
    calibration = np.asarray(data["calibration"])
    labels = np.asarray(data["labels"]).astype(bool)
    normals = np.concatenate([calibration, np.asarray(data["test"])[~labels]])
    n = len(calibration)
    generator = np.random.default_rng(0)
    rates: dict[float, list[float]] = {rate: [] for rate in RATES}
    for _ in range(draws):
        order = generator.permutation(len(normals))
        cal, test = normals[order[:n]].sum(1), normals[order[n:]].sum(1)
        p = conformal_p_values(torch.from_numpy(test), torch.from_numpy(cal)).numpy()
        for rate in RATES:
            rates[rate].append(float((p <= rate + 1e-12).mean()))
    cells = ", ".join(f"{rate:.0%}: {np.mean(v):.3f} ± {np.std(v):.3f}" for rate, v in rates.items())
    return f"Summed score over {draws} re-drawn calibration sets (mean ± sd of the false-alarm rate): {cells}."


def markdown(cell_type: str, rows: list[dict], n_calibration: int, n_levels: int) -> str:
    lines = [
        f"### ELPV {cell_type} ({n_calibration} calibration normals, {n_levels} levels)",
        "",
        "| decision | AUROC of the statistic | "
        + " | ".join(f"FAR at {r:.0%} [95% CI] | recall at {r:.0%}" for r in RATES)
        + " |",
        "| --- | ---: | " + " | ".join("---: | ---:" for _ in RATES) + " |",
    ]
    for row in rows:
        cells = []
        for rate in RATES:
            far, low, high, recall = row[rate]
            marker = "" if low <= rate else " ⚠"  # the interval lies above the target: not honoured
            cells.append(f"{far:.3f} [{low:.3f}, {high:.3f}]{marker} | {recall:.3f}")
        lines.append(f"| {row['method']} | {row['auroc']:.4f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", default="datasets")
    parser.add_argument("--held-out-fraction", type=float, default=0.3)
    parser.add_argument("--cell-types", default="mono,poly")
    parser.add_argument("--cache", default="results/level_combination", help="per-level scores are kept here")
    parser.add_argument("--out", default="docs/level_combination.md")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    sections = []
    for cell_type in args.cell_types.split(","):
        cache = Path(args.cache) / f"elpv_{cell_type}.json"
        if not cache.is_file():
            cache.parent.mkdir(parents=True, exist_ok=True)
            cache.write_text(json.dumps(study(cell_type, Path(args.data_root), args.held_out_fraction)))
        data = json.loads(cache.read_text())
        n_calibration, n_levels = np.asarray(data["calibration"]).shape
        sections.append(markdown(cell_type, evaluate(data), n_calibration, n_levels) + "\n\n" + resplit(data))
    report = "\n\n".join(sections) + "\n"
    Path(args.out).write_text(report)
    print(report)


if __name__ == "__main__":
    main()
