"""Fit GaussFT with Lightning's DDP strategy on CPU (gloo); driven by tests/test_ddp.py.

Lightning's ``ddp`` strategy re-runs this script once per extra process (with ``LOCAL_RANK`` set), so it
must be a plain script, not a pytest function. Every rank writes what the test compares to
``OUT/rank<r>.json``; rank 0 also saves the fitted statistics to ``OUT/statistics.pt``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from anomalib.data import MVTecAD
from anomalib.engine import Engine

from anomalib_gaussft import GaussFT
from anomalib_gaussft.gaussft.forgetting import ForgettingCallback


class RecordingForgetting(ForgettingCallback):
    """The forgetting check, remembering whether this process wrote the training curve."""

    wrote_curve = False

    def write_curve(self, path: Path) -> None:
        type(self).wrote_curve = True
        super().write_curve(path)


class RecordingGaussFT(GaussFT):
    """GaussFT with the recording forgetting check."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        if self.fine_tuning:
            self.forgetting = RecordingForgetting(self.hparams.patience, self.hparams.pseudo_anomalies)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--epochs", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    torch.manual_seed(0)  # the same random-init backbone in the 1- and 2-process runs
    model = RecordingGaussFT(
        backbone="test_efficientnet",
        pre_trained=False,
        image_size=64,
        fine_tune_epochs=args.epochs,
        held_out_fraction=0.25,
        pseudo_anomalies=["cutout"],
        patience=2,
    )
    # Batch size 3 with 15 images over 2 processes: uneven shares and DistributedSampler padding.
    datamodule = MVTecAD(root=args.data, category="brick", train_batch_size=3, eval_batch_size=8, num_workers=0)
    strategy = "ddp" if args.devices > 1 else "auto"
    engine = Engine(
        default_root_dir=out / "run",
        logger=False,
        accelerator="cpu",
        devices=args.devices,
        strategy=strategy,
        limit_val_batches=0,
    )
    engine.fit(model=model, datamodule=datamodule)

    trainer = engine.trainer
    record = {
        "world_size": trainer.world_size,
        "held_out": sorted(model.held_out.held_out_paths) if model.held_out is not None else [],
        "history": [{k: v for k, v in h.items() if k != "loss"} for h in getattr(model.forgetting, "history", [])],
        "best_epoch": getattr(model.forgetting, "best_epoch", -1),
        "wrote_curve": RecordingForgetting.wrote_curve,
        "num_samples": int(model.model.image_gaussians["0"].num_samples),
    }
    (out / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))
    if trainer.is_global_zero:
        torch.save({k: v.detach().cpu() for k, v in model.model.state_dict().items()}, out / "statistics.pt")


if __name__ == "__main__":
    main()
