"""What fine-tuning trains (layers of chosen levels, BatchNorm statistics frozen) and its learning-rate schedule."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

from .feature_extractor import MultiLevelFeatureExtractor


def set_trainable(
    extractor: MultiLevelFeatureExtractor,
    trainable_levels: Sequence[int] | None,
    loss_levels: Sequence[int] | None = None,
    span_loss_levels: bool = False,
) -> list[int]:
    """Enable gradients for the given levels' modules only and return the trainable levels.

    ``None``: for EfficientNets the deeper half of the levels (5–8 of 9: the stride-16/32 stages and the head) up
    to the deepest of ``loss_levels`` (all levels up to it when none of the deeper half is used), or with
    ``span_loss_levels`` every level from the shallowest to the deepest loss level (a loss on the map levels 3-5
    must reach their own stages); every layer for other backbones. For the pooled loss, training only the deep
    levels gave the same gains as training all of them at 2.4× less cost and without the early levels' drift
    (docs/fine_tuning.md). Layers past the deepest loss level get no
    gradient, and DDP's gradient all-reduce fails on trainable parameters without one, so asking to train them
    is an error.
    """
    deepest = max(loss_levels) if loss_levels else max(extractor.all_levels)
    if trainable_levels is None:
        if not extractor.is_efficientnet:
            extractor.requires_grad_(True)
            return list(extractor.all_levels)
        reached = [level for level in extractor.all_levels if level <= deepest]
        deep_half = [level for level in reached if level > extractor.num_levels // 2]
        trainable_levels = deep_half or reached
        if span_loss_levels and loss_levels:
            trainable_levels = [level for level in reached if level >= min(loss_levels)]
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
    for level, modules in extractor.level_modules().items():
        if level in levels:
            for module in modules:
                module.requires_grad_(True)
    return levels


def freeze_batchnorm(module: nn.Module) -> None:
    """Keep BatchNorm layers in eval mode: batches of one class would wreck their running statistics."""
    for child in module.modules():
        if isinstance(child, _BatchNorm):
            child.eval()


def warmup_cosine(optimizer: Optimizer, warmup_steps: int, total_steps: int) -> LambdaLR:
    """Per-step schedule: linear warm-up to the full rate over ``warmup_steps``, then a cosine decay to 0.

    Without warm-up the first Adam steps at the full rate multiplied the loss by 9–25 (docs/fine_tuning.md); the
    decay keeps the late epochs from overshooting as the deep levels' spread shrinks.
    """
    warmup_steps = max(1, warmup_steps)
    total_steps = max(total_steps, warmup_steps + 1)

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / (total_steps - warmup_steps))
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return LambdaLR(optimizer, factor)


def fine_tuning_optimizer(
    parameters: Sequence[nn.Parameter],
    learning_rate: float,
    weight_decay: float,
    schedule: str,
    total_steps: int,
    epochs: int | None,
) -> dict[str, Any]:
    """Lightning's optimizer configuration: AdamW, with the ``warmup_cosine`` schedule (one epoch of warm-up)."""
    optimizer = torch.optim.AdamW(parameters, lr=learning_rate, weight_decay=weight_decay)
    if schedule == "constant":
        return {"optimizer": optimizer}
    scheduler = warmup_cosine(optimizer, total_steps // max(1, epochs or 1), total_steps)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
