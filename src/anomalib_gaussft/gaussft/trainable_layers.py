"""What fine-tuning trains: the backbone layers of chosen levels, with BatchNorm statistics frozen."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .feature_extractor import MultiLevelFeatureExtractor


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
