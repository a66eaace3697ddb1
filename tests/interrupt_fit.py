"""Fine-tune GaussFT with anomalib's Engine.train; optionally SIGKILL itself, or resume; driven by test_resume.py.

A plain script, run in a subprocess, because the interruption is a real ``SIGKILL`` of the process (no cleanup,
no final checkpoint). Writes ``OUT/record.json`` when it completes.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
from pathlib import Path

import torch
from anomalib.data import MVTecAD
from anomalib.engine import Engine
from lightning.pytorch import Callback, seed_everything

from anomalib_gaussft import GaussFT


class KillAt(Callback):
    """SIGKILL this process when training reaches ``(epoch, batch)``; batch -1 = at the start of the epoch."""

    def __init__(self, epoch: int, batch: int) -> None:
        self.epoch, self.batch = epoch, batch

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if trainer.current_epoch == self.epoch and self.batch < 0:
            os.kill(os.getpid(), signal.SIGKILL)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.current_epoch == self.epoch and batch_idx == self.batch:
            os.kill(os.getpid(), signal.SIGKILL)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--kill", default=None, help="EPOCH:BATCH")
    parser.add_argument("--resume", default=None, help="checkpoint to resume from")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    seed_everything(args.seed)
    model = GaussFT(
        backbone="test_efficientnet",
        pre_trained=False,
        image_size=64,
        fine_tune_epochs=args.epochs,
        patience=args.epochs,
        learning_rate=3e-3,
        pseudo_anomalies=["cutout"],
    )
    datamodule = MVTecAD(root=args.data, category="brick", train_batch_size=4, eval_batch_size=8, num_workers=0)
    callbacks = [KillAt(*map(int, args.kill.split(":")))] if args.kill else []
    engine = Engine(default_root_dir=args.out, logger=False, callbacks=callbacks, enable_progress_bar=False)
    results = engine.train(model=model, datamodule=datamodule, ckpt_path=args.resume)
    model.eval()
    with torch.no_grad():
        images = torch.rand(4, 3, 64, 64, generator=torch.Generator().manual_seed(1))
        scores = model.model(images).pred_score.tolist()
    record = {
        "history": model.forgetting.history,
        "best_epoch": model.forgetting.best_epoch,
        "scores": scores,
        "test": results[0] if results else {},
    }
    (Path(args.out) / "record.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main()
