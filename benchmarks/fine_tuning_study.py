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
from pathlib import Path

import torch
from anomalib.data import MVTecAD
from anomalib.engine import Engine
from sklearn.metrics import roc_auc_score

from anomalib_gaussft import GaussFT
from anomalib_gaussft.datasets import elpv_datamodule, make_texture_dataset

logger = logging.getLogger("fine_tuning_study")


class TrackedGaussFT(GaussFT):
    """GaussFT that also measures the real test AUROC after each epoch (analysis only)."""

    test_loader = None

    def _evaluate_epoch(self, epoch: int, loss: float) -> None:
        super()._evaluate_epoch(epoch, loss)
        scores, labels = [], []
        with torch.no_grad():
            for batch in self.test_loader:
                scores.append(self._image_scores(batch.image).cpu())
                labels.append(batch.gt_label.cpu())
        auroc = roc_auc_score(torch.cat(labels).int().numpy(), torch.cat(scores).numpy())
        self.monitor.history[-1]["test_auroc"] = float(auroc)
        logger.info("epoch %d: test image AUROC %.4f (not used by the stopping rule)", epoch, auroc)


def datamodule(name: str, root: Path, batch_size: int):
    if name.startswith("elpv_"):
        return elpv_datamodule(root, cell_type=name.removeprefix("elpv_"), train_batch_size=batch_size)
    make_texture_dataset(root / "textures", image_size=224, n_train=60, n_test_good=30, n_test_defect=30)
    return MVTecAD(
        root=root / "textures", category=name, train_batch_size=batch_size, eval_batch_size=32, num_workers=0
    )


def run(args: argparse.Namespace, config: dict) -> dict:
    torch.manual_seed(0)
    dm = datamodule(args.dataset, Path(args.data_root), args.batch_size)
    dm.setup()
    model = TrackedGaussFT(
        backbone="tf_efficientnet_lite0", fine_tune_epochs=args.epochs, patience=args.epochs, **config
    )
    model.test_loader = dm.test_dataloader()
    engine = Engine(default_root_dir=Path(args.out) / "runs" / config_name(config), logger=False, limit_val_batches=0)
    start = time.perf_counter()
    engine.fit(model=model, datamodule=dm)
    history = model.monitor.history
    return {"config": config, "history": history, "seconds": time.perf_counter() - start}


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
