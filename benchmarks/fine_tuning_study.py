"""Fine-tuning study: frozen vs fine-tuned GaussFT, and whether the forgetting metric tracks real AUROC.

For each configuration it fine-tunes with a large patience (so it trains past the
point the stopping rule picks), and after every epoch records the held-out
pseudo-anomaly AUROC (what the rule sees) next to the real test image AUROC (what
the rule must never see; measured here only for the analysis).

Example:
    HF_HUB_CACHE=$(cd ../shared/hf-cache/hub && pwd) HF_HUB_OFFLINE=1 \
    python benchmarks/fine_tuning_study.py --dataset elpv_mono --epochs 8 --out docs/fine_tuning
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections.abc import Iterable
from pathlib import Path

import torch
from anomalib.engine import Engine
from lightning.pytorch import Trainer
from sklearn.metrics import roc_auc_score

from anomalib_gaussft import GaussFT
from anomalib_gaussft.gaussft.forgetting import ForgettingCallback
from common import BACKBONE, elpv_datamodule, mvtec_datamodule
from data_generators import make_texture_dataset

logger = logging.getLogger("fine_tuning_study")


class RealAurocForgetting(ForgettingCallback):
    """GaussFT's forgetting check that also measures the real test AUROC after each epoch (analysis only).

    The test score is the stopping rule's own score, ``pooled_image_score``, with the image Gaussians the epoch's
    evaluation has just refitted on the fit images.
    """

    def __init__(self, model: GaussFT, test_loader: Iterable) -> None:
        super().__init__(model.hparams.patience, model.hparams.pseudo_anomalies, model.hparams.seed)
        self.test_loader = test_loader

    def evaluate(self, trainer: Trainer, pl_module: GaussFT, epoch: int, loss: float) -> None:
        super().evaluate(trainer, pl_module, epoch, loss)
        scores, labels = [], []
        for item in pl_module.model.iter_features(self.test_loader, pl_module.preprocess):
            scores.append(pl_module.model.pooled_image_score(item.features).cpu())
            labels.append(item.batch.gt_label.cpu())
        auroc = roc_auc_score(torch.cat(labels).int().numpy(), torch.cat(scores).numpy())
        self.history[-1]["test_auroc"] = float(auroc)
        logger.info("epoch %d: test image AUROC %.4f (not used by the stopping rule)", epoch, auroc)


def datamodule(name: str, root: Path, batch_size: int):
    if name.startswith("elpv_"):
        return elpv_datamodule(root, cell_type=name.removeprefix("elpv_"), train_batch_size=batch_size)
    make_texture_dataset(root / "textures", image_size=224, n_train=60, n_test_good=30, n_test_defect=30)
    return mvtec_datamodule(root / "textures", name, train_batch_size=batch_size, eval_batch_size=32)


def run(args: argparse.Namespace, config: dict) -> dict:
    torch.manual_seed(0)
    dm = datamodule(args.dataset, Path(args.data_root), args.batch_size)
    dm.setup()
    model = GaussFT(backbone=BACKBONE, fine_tune_epochs=args.epochs, patience=args.epochs, **config)
    model.forgetting = RealAurocForgetting(model, dm.test_dataloader())
    engine = Engine(default_root_dir=Path(args.out) / "runs" / config_name(config), logger=False, limit_val_batches=0)
    start = time.perf_counter()
    engine.fit(model=model, datamodule=dm)
    return {"config": config, "history": model.forgetting.history, "seconds": time.perf_counter() - start}


def config_name(config: dict) -> str:
    return "_".join(f"{k}-{v}" for k, v in config.items()).replace(" ", "").replace(",", "+") or "default"


def main() -> None:
    torch.set_flush_denormal(True)  # diverging runs produce denormals that slow CPU kernels 100-fold
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--dataset", default="elpv_mono", help="elpv_mono, elpv_poly or a texture (brick, grass, gravel)"
    )
    parser.add_argument("--data-root", default="datasets")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--configs", default='[{"learning_rate": 1e-4}]', help="JSON list of GaussFT kwargs")
    parser.add_argument("--out", default="docs/fine_tuning")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for config in json.loads(args.configs):
        result = run(args, config)
        path = out / f"{args.dataset}_{config_name(config)}.json"
        path.write_text(json.dumps(result, indent=2))
        logger.info("wrote %s", path)


if __name__ == "__main__":
    main()
