"""Catastrophic-forgetting detection while fine-tuning: pseudo-anomaly AUROC, best weights, stopping.

A Lightning ``Callback``. Lightning's ``EarlyStopping`` is not subclassed on purpose: a model callback
replaces every trainer callback of a parent type, so a subclass would silently remove a user's own
``EarlyStopping``; and its check runs at the end of an epoch, after validation, while GaussFT must fix the
final model *before* the datamodule's validation runs (the post-processor learns from that validation).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.trainer.states import TrainerFn
from torchmetrics.functional.classification import binary_auroc

from .pseudo_anomalies import PseudoAnomalyGenerator
from .training_curve import save_training_curve
from .weight_interpolation import load_interpolation, trainable_weights

if TYPE_CHECKING:
    from .lightning_model import GaussFT

logger = logging.getLogger(__name__)


def separation_auroc(normal: torch.Tensor, anomalous: torch.Tensor) -> float:
    """AUROC of scores (higher = more anomalous) of normal vs anomalous samples; ties count one half.

    torchmetrics' ``binary_auroc`` passes scores outside [0, 1] through a sigmoid, which maps GaussFT's raw
    distances (in the hundreds) all to 1.0; a min-max rescaling keeps their order and ties instead.
    """
    scores = torch.cat([normal, anomalous]).double()
    scores = (scores - scores.min()) / (scores.max() - scores.min()).clamp_min(torch.finfo(torch.float64).tiny)
    labels = torch.cat([torch.zeros(len(normal)), torch.ones(len(anomalous))]).long()
    return float(binary_auroc(scores, labels))


class ForgettingCallback(Callback):
    """Score held-out normals against their pseudo-anomalies each epoch; choose the weights to keep; stop.

    Epoch 0 is the pretrained network. At the epoch budget, or after ``patience`` epochs without improvement,
    the weights to keep are chosen by the same metric, never by real anomalies:

    * with ``wise_alphas`` (default): along the line from the pretrained to the last weights,
      ``θ(α) = (1 − α)·θ_pretrained + α·θ_last`` (WiSE-FT), the α with the best pseudo-anomaly AUROC (ties go to
      the smaller α; α = 0 is the pretrained network, so the choice cannot end worse than not fine-tuning by
      this metric);
    * without: the best epoch's weights (the paper's rule).

    Then the model's final fit runs, before the datamodule's validation (which runs only then: it may hold real
    anomalies and must not steer fine-tuning). The state (history, kept weights) is saved in checkpoints, so an
    interrupted run resumes exactly.

    Args:
        patience: Epochs without improvement before stopping early; ``None`` trains the whole budget.
        pseudo_anomalies: Augmentations that make pseudo-anomalies of held-out normals.
        seed: Seed of the pseudo-anomalies (the same ones every epoch).
        wise_alphas: Interpolation weights to choose from; ``None`` keeps the best epoch instead.

    """

    def __init__(
        self,
        patience: int | None,
        pseudo_anomalies: Sequence[str],
        seed: int = 0,
        wise_alphas: Sequence[float] | None = None,
    ) -> None:
        self.patience = patience
        self.generator = PseudoAnomalyGenerator(pseudo_anomalies, seed=seed)
        self.wise_alphas = sorted({float(a) for a in wise_alphas}) if wise_alphas else None
        self._limit_val_batches: int | float | None = None
        self.reset()

    def reset(self) -> None:
        """Forget every epoch seen (a new run)."""
        self.best_score = -math.inf
        self.best_epoch = -1
        self.bad_epochs = 0
        self.history: list[dict[str, float]] = []
        self.best_weights: dict[str, torch.Tensor] | None = None
        self.pretrained: dict[str, torch.Tensor] | None = None
        self.interpolation: list[dict[str, float]] = []
        self.kept_alpha: float | None = None

    @property
    def should_stop(self) -> bool:
        """Whether ``patience`` epochs in a row failed to improve."""
        return self.patience is not None and self.bad_epochs >= self.patience

    def record(self, epoch: int, score: float, **extra: float) -> bool:
        """Record an epoch's pseudo-anomaly AUROC; returns whether it is the new best."""
        self.history.append({"epoch": epoch, "pseudo_auroc": score, **extra})
        if score > self.best_score:
            self.best_score, self.best_epoch, self.bad_epochs = score, epoch, 0
            return True
        self.bad_epochs += 1
        return False

    @torch.no_grad()
    def pseudo_anomaly_auroc(self, pl_module: GaussFT) -> dict[str, float]:
        """AUROC of held-out normals vs their pseudo-anomalies (per augmentation and pooled, ``"all"``).

        Ranked by the model's own image score. The "local" score's terms are z-scored on these held-out normals,
        as the final fit will z-score them (its constants are not fitted yet while fine-tuning).
        """
        model = pl_module.model.eval()
        device = pl_module.device

        def terms(images: torch.Tensor) -> torch.Tensor:
            images = pl_module.preprocess(images.to(device))
            return model.raw_score_terms(model.extract(images), images.shape[-2:]).double().cpu()

        normal, anomalous = [], {kind: [] for kind in self.generator.kinds}
        for index, batch in enumerate(pl_module.held_out.loader("held_out")):
            normal.append(terms(batch.image))
            for kind, images in self.generator(batch.image, index).items():
                anomalous[kind].append(terms(images))
        normal_terms = torch.cat(normal)
        mean, std = normal_terms.mean(0), normal_terms.std(0).nan_to_num(1.0).clamp_min(1e-12)

        def scores(parts: list[torch.Tensor]) -> torch.Tensor:
            return ((torch.cat(parts) - mean) / std).sum(1)

        normal_scores = scores(normal)
        anomalous_scores = {kind: scores(parts) for kind, parts in anomalous.items()}
        result = {kind: separation_auroc(normal_scores, values) for kind, values in anomalous_scores.items()}
        result["all"] = separation_auroc(normal_scores, torch.cat(list(anomalous_scores.values())))
        return result

    def evaluate(self, trainer: Trainer, pl_module: GaussFT, epoch: int, loss: float) -> None:
        """Refit the loss targets on the current network, score the held-out pseudo-anomalies, keep the best."""
        start = time.perf_counter()
        pl_module.refit_targets()
        aurocs = self.pseudo_anomaly_auroc(pl_module)
        improved = self.record(epoch, aurocs["all"], loss=loss, **{f"auroc_{k}": v for k, v in aurocs.items()})
        if improved and not self.wise_alphas:
            self.best_weights = {
                k: v.detach().cpu().clone() for k, v in pl_module.model.feature_extractor.state_dict().items()
            }
        if epoch > 0:
            pl_module.log_dict({"pseudo_auroc": aurocs["all"], "train_loss_epoch_mean": loss}, prog_bar=True)
        loss_text = "pretrained network, no training yet" if epoch == 0 else f"train loss {loss:.4f}"
        logger.info(
            "Epoch %d (%s): pseudo-anomaly AUROC %.4f (%s)%s [evaluated in %.1fs]",
            epoch,
            loss_text,
            aurocs["all"],
            ", ".join(f"{k} {v:.3f}" for k, v in aurocs.items() if k != "all"),
            " *best*" if improved else "",
            time.perf_counter() - start,
        )
        del trainer

    # ---- Lightning hooks ---------------------------------------------------------------------
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Score the pretrained network (epoch 0), or, when resumed, rebuild the loss's targets."""
        if trainer.ckpt_path is None or self.best_epoch < 0:  # a new run, not a resumed one
            self.reset()
            self.pretrained = trainable_weights(pl_module.model.feature_extractor) if self.wise_alphas else None
            self.evaluate(trainer, pl_module, epoch=0, loss=math.nan)
        else:
            pl_module.refit_targets()
        pl_module.model.train()

    def on_train_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: Any,  # noqa: ANN401
        batch: Any,  # noqa: ANN401
        batch_idx: int,
    ) -> None:
        """After an epoch's last batch (before Lightning decides whether to validate): evaluate, maybe stop."""
        del outputs, batch
        if batch_idx + 1 < trainer.num_training_batches:
            return
        self.evaluate(trainer, pl_module, epoch=trainer.current_epoch + 1, loss=pl_module.epoch_loss())
        if self.should_stop or trainer.current_epoch + 1 >= (trainer.max_epochs or 0):
            self.finish(trainer, pl_module, reason="patience exhausted" if self.should_stop else "epoch budget used")
        elif trainer.limit_val_batches != 0:
            # Intermediate epochs skip the datamodule's validation: it may hold real anomalies, it must not steer
            # fine-tuning, and the post-processor only needs the final model's outputs.
            self._limit_val_batches = trainer.limit_val_batches
            trainer.limit_val_batches = 0

    def finish(self, trainer: Trainer, pl_module: GaussFT, reason: str) -> None:
        """Keep the chosen weights, run the final fit, let validation run once, stop training."""
        logger.info("Fine-tuning stops (%s) after epoch %d.", reason, self.history[-1]["epoch"])
        if self.wise_alphas and self.pretrained is not None:
            self.interpolate(trainer, pl_module)
        else:
            logger.info(
                "Keeping epoch %d, pseudo-anomaly AUROC %.4f (0 = pretrained).", self.best_epoch, self.best_score
            )
            if self.best_weights is not None:
                pl_module.model.feature_extractor.load_state_dict(self.best_weights)
        self.best_weights = self.pretrained = None  # a torch export pickles the whole module: drop the copies
        pl_module.finish_fit()
        trainer.should_stop = True
        if self._limit_val_batches is not None:
            trainer.limit_val_batches = self._limit_val_batches
        if trainer.is_global_zero:
            self.write_curve(Path(trainer.default_root_dir) / "fine_tuning_curve.png")

    def interpolate(self, trainer: Trainer, pl_module: GaussFT) -> None:
        """WiSE-FT: score ``θ(α)`` for every α on the held-out pseudo-anomalies and keep the best α.

        α = 0 and α = 1 reuse the scores of epoch 0 and of the last epoch (the same weights).
        """
        extractor = pl_module.model.feature_extractor
        last = trainable_weights(extractor)
        known = {0.0: self.history[0]["pseudo_auroc"], 1.0: self.history[-1]["pseudo_auroc"]}
        self.interpolation = []
        for alpha in self.wise_alphas:
            if alpha not in known:
                load_interpolation(extractor, self.pretrained, last, alpha)
                pl_module.refit_targets()
                known[alpha] = self.pseudo_anomaly_auroc(pl_module)["all"]
            self.interpolation.append({"alpha": alpha, "pseudo_auroc": known[alpha]})
        best = max(self.interpolation, key=lambda r: (r["pseudo_auroc"], -r["alpha"]))  # ties: the smaller α
        self.kept_alpha = best["alpha"]
        load_interpolation(extractor, self.pretrained, last, self.kept_alpha)
        logger.info(
            "WiSE-FT between the pretrained and the last weights: %s; keeping α = %.2f (0 = pretrained).",
            ", ".join(f"α {r['alpha']:.2f} → {r['pseudo_auroc']:.4f}" for r in self.interpolation),
            self.kept_alpha,
        )
        del trainer

    def write_curve(self, path: Path) -> None:
        """Write the training-curve PNG (and its JSON) of this run; a plotting failure only logs."""
        try:
            if self.kept_alpha is not None:
                kept, note = self.history[-1]["epoch"], f"kept: WiSE-FT α = {self.kept_alpha:.2f} of the last epoch"
            else:
                kept, note = self.best_epoch, f"kept: epoch {self.best_epoch}"
            extra = {"interpolation": self.interpolation, "kept_alpha": self.kept_alpha}
            written = save_training_curve(self.history, kept, path, note=note, extra=extra)
            logger.info("Training curve written to %s", written)
        except Exception:
            logger.exception("Could not write the training curve.")

    # ---- checkpoint state --------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Plain-Python state and the best weights (safe for ``weights_only`` checkpoints)."""
        return {
            "best_score": self.best_score,
            "best_epoch": self.best_epoch,
            "bad_epochs": self.bad_epochs,
            "history": [dict(h) for h in self.history],
            "best_weights": self.best_weights,
            "pretrained": self.pretrained,
        }

    def on_load_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        """Only a resumed fit takes the saved state (a test after it must not roll the history back)."""
        del pl_module, checkpoint
        self._resuming = trainer.state.fn == TrainerFn.FITTING

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore from :meth:`state_dict` when resuming a fit."""
        if not getattr(self, "_resuming", True):
            return
        self.best_score = float(state_dict["best_score"])
        self.best_epoch = int(state_dict["best_epoch"])
        self.bad_epochs = int(state_dict["bad_epochs"])
        self.history = [dict(h) for h in state_dict["history"]]
        self.best_weights = state_dict.get("best_weights")
        self.pretrained = state_dict.get("pretrained")
