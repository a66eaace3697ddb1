"""Normal-only thresholds on ELPV: target vs observed false-alarm rate, and recall, beside anomalib's default.

GaussFT is fitted with ``false_alarm_rate`` set (held-out normals calibrate the threshold and are left out
of the fit). One fit serves every target rate: the thresholds are order statistics of the same calibration
scores. anomalib's default (F1-adaptive threshold learnt on the validation split, which for this Folder
setup is the labelled test split, anomalies included) is shown for comparison.

Example:
    HF_HUB_CACHE=$(cd ../shared/hf-cache/hub && pwd) HF_HUB_OFFLINE=1 \
    python benchmarks/false_alarm_study.py --out docs/false_alarm.md
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch
from anomalib.engine import Engine
from anomalib.metrics.threshold.f1_adaptive_threshold import _F1AdaptiveThreshold  # the field-free core
from scipy.stats import binomtest

from anomalib_gaussft import GaussFT
from anomalib_gaussft.gaussft.calibration import conformal_threshold
from common import BACKBONE, elpv_datamodule, iter_raw_outputs

RATES = (0.01, 0.05, 0.10)


def study(cell_type: str, data_root: Path, held_out_fraction: float, epochs: int) -> list[str]:
    datamodule = elpv_datamodule(data_root, cell_type=cell_type)
    model = GaussFT(
        backbone=BACKBONE,
        fine_tune_epochs=epochs,
        false_alarm_rate=0.05,
        held_out_fraction=held_out_fraction,
    )
    engine = Engine(default_root_dir=f"/tmp/false_alarm_{cell_type}", logger=False, limit_val_batches=0)
    engine.fit(model=model, datamodule=datamodule)
    scores, labels = [], []
    for batch, output in iter_raw_outputs(model, datamodule.test_dataloader()):
        scores.append(output.pred_score)
        labels.append(batch.gt_label)
    scores, labels = torch.cat(scores), torch.cat(labels).bool()
    calibration = model.calibrator.scores  # raw scores of the held-out normals, which took no part in the fit
    n = calibration.numel()
    rows = []
    for rate in RATES:
        threshold = conformal_threshold(calibration, rate)
        flagged = scores > threshold
        false_alarms = int(flagged[~labels].sum())
        n_normal = int((~labels).sum())
        ci = binomtest(false_alarms, n_normal).proportion_ci(0.95)
        recall = flagged[labels].float().mean().item()
        rows.append(
            f"| {cell_type} | GaussFT, normal-only, target {rate:.0%} | {n} | {false_alarms / n_normal:.3f} "
            f"[{ci.low:.3f}, {ci.high:.3f}] | {recall:.3f} |"
        )
    f1 = _F1AdaptiveThreshold()
    f1.update(scores, labels.int())
    flagged = scores > f1.compute()
    rows.append(
        f"| {cell_type} | anomalib default (F1-adaptive on the labelled val split) | – | "
        f"{flagged[~labels].float().mean().item():.3f} | {flagged[labels].float().mean().item():.3f} |"
    )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", default="datasets")
    parser.add_argument("--held-out-fraction", type=float, default=0.3)
    parser.add_argument("--epochs", type=int, default=0, help="fine-tuning epochs (0 = frozen Gaussian AD)")
    parser.add_argument("--cell-types", default="mono,poly")
    parser.add_argument("--out", default="docs/false_alarm.md")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    rows = []
    for cell_type in args.cell_types.split(","):
        rows += study(cell_type, Path(args.data_root), args.held_out_fraction, args.epochs)
    table = "\n".join(
        [
            "| ELPV | thresholding | calibration images | observed false-alarm rate, test normals [95% CI] | recall |",
            "| --- | --- | --- | --- | --- |",
            *rows,
        ]
    )
    Path(args.out).write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
