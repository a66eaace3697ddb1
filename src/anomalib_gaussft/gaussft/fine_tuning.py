"""Fine-tuning helpers: the held-out split, what is trainable, and the forgetting-based stopping rule."""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .feature_extractor import MultiLevelFeatureExtractor


def held_out_count(n_images: int, fraction: float) -> int:
    """Number of images :func:`held_out_split` holds out of ``n_images``: ``round(fraction * n)``, at least 2."""
    return max(2, round(fraction * n_images))


def held_out_split(image_paths: Sequence[str], fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Deterministic ``(fit_indices, held_out_indices)`` of a training set.

    The split depends only on the set of paths and the seed (not on dataset order,
    process rank or resumption), so every DDP rank and every resumed run agrees.
    """
    if not 0.0 < fraction < 1.0:
        msg = f"held_out_fraction must lie in (0, 1), got {fraction}."
        raise ValueError(msg)
    n = len(image_paths)
    n_held_out = held_out_count(n, fraction)
    if n - n_held_out < 2:
        needed = next(m for m in itertools.count(4) if m - held_out_count(m, fraction) >= 2)
        msg = (
            f"Too few normal training images: {n}. held_out_fraction={fraction} holds out {n_held_out} of them "
            "(at least 2: for forgetting detection when fine-tuning, for calibration with false_alarm_rate) and the "
            f"fit needs at least 2 more, so at least {needed} training images are needed. Add normal images, lower "
            "held_out_fraction, or set fine_tune_epochs=0 and false_alarm_rate=None (which need only 2)."
        )
        raise ValueError(msg)
    order = sorted(range(n), key=lambda i: str(image_paths[i]))
    generator = torch.Generator().manual_seed(seed)
    permutation = torch.randperm(n, generator=generator).tolist()
    shuffled = [order[p] for p in permutation]
    return sorted(shuffled[n_held_out:]), sorted(shuffled[:n_held_out])


def level_modules(extractor: MultiLevelFeatureExtractor) -> dict[int, list[nn.Module]]:
    """Backbone modules that compute each level (EfficientNets only)."""
    model = extractor.model
    modules: dict[int, list[nn.Module]] = {0: [model.conv_stem, model.bn1]}
    for index, stage in enumerate(model.blocks, start=1):
        modules[index] = [stage]
    modules[len(model.blocks) + 1] = [model.conv_head, model.bn2]
    return modules


def set_trainable(
    extractor: MultiLevelFeatureExtractor,
    trainable_levels: Sequence[int] | None,
    loss_levels: Sequence[int] | None = None,
) -> list[int]:
    """Enable gradients for the given levels' modules only and return the trainable levels.

    ``None`` trains every layer the loss reaches: for EfficientNets, the levels up to the deepest of
    ``loss_levels``. Layers past it get no gradient, and DDP's gradient all-reduce fails on trainable
    parameters without one, so asking to train them is an error.
    """
    deepest = max(loss_levels) if loss_levels else max(extractor.all_levels)
    if trainable_levels is None:
        if not extractor.is_efficientnet:
            extractor.requires_grad_(True)
            return list(extractor.all_levels)
        trainable_levels = [level for level in extractor.all_levels if level <= deepest]
    elif not extractor.is_efficientnet:
        msg = "trainable_levels can only be chosen for EfficientNet backbones; use None to train all layers."
        raise ValueError(msg)
    levels = extractor.validate_levels(trainable_levels, "trainable_levels")
    beyond = [level for level in levels if level > deepest]
    if beyond:
        msg = (
            f"trainable_levels {beyond} lie past the deepest image-score level ({deepest}, see `levels`): the loss "
            "never reaches them. Drop them from trainable_levels or add deeper levels."
        )
        raise ValueError(msg)
    extractor.requires_grad_(False)
    for level, modules in level_modules(extractor).items():
        if level in levels:
            for module in modules:
                module.requires_grad_(True)
    return levels


def freeze_batchnorm(module: nn.Module) -> None:
    """Keep BatchNorm layers in eval mode: batches of one class would wreck their running statistics."""
    for child in module.modules():
        if isinstance(child, _BatchNorm):
            child.eval()


@dataclass
class ForgettingMonitor:
    """Early stopping on the pseudo-anomaly AUROC: keep the best epoch, stop after ``patience`` worse ones.

    Epoch 0 is the pretrained network, so fine-tuning can never end worse than
    not fine-tuning by this metric.
    """

    patience: int
    min_delta: float = 0.0
    best_score: float = -math.inf
    best_epoch: int = -1
    bad_epochs: int = 0
    history: list[dict[str, float]] = field(default_factory=list)

    def update(self, epoch: int, score: float, **extra: float) -> bool:
        """Record an epoch's score; returns whether it is the new best."""
        self.history.append({"epoch": epoch, "pseudo_auroc": score, **extra})
        if score > self.best_score + self.min_delta:
            self.best_score, self.best_epoch, self.bad_epochs = score, epoch, 0
            return True
        self.bad_epochs += 1
        return False

    @property
    def should_stop(self) -> bool:
        """Whether ``patience`` epochs in a row failed to improve."""
        return self.bad_epochs >= self.patience

    def state_dict(self) -> dict:
        """Plain-Python state (safe for ``weights_only`` checkpoints)."""
        return {
            "best_score": self.best_score,
            "best_epoch": self.best_epoch,
            "bad_epochs": self.bad_epochs,
            "history": [dict(h) for h in self.history],
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore from :meth:`state_dict`."""
        self.best_score = float(state["best_score"])
        self.best_epoch = int(state["best_epoch"])
        self.bad_epochs = int(state["bad_epochs"])
        self.history = [dict(h) for h in state["history"]]
