"""Multi-level feature extraction from timm backbones, and local weight files.

EfficientNets get the 9-level scheme of Gaussian AD: stem, the output of each of the 7 stages and the
head (conv + BN + activation), from timm's ``forward_intermediates(..., extra_blocks=True)`` (the stem and
every stage as intermediates, the head as its final output). Other timm models use their
``forward_intermediates`` levels (``feature_info``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import timm
import torch
from timm.models import load_state_dict, remap_state_dict
from timm.models.efficientnet import EfficientNet
from torch import nn

logger = logging.getLogger(__name__)


class UnknownBackboneError(ValueError):
    """Raised when a backbone name is not a timm model."""


def create_backbone(name: str, pre_trained: bool, weights_path: str | Path | None) -> nn.Module:
    """Create a timm backbone without classifier, with hub or local weights."""
    if not timm.is_model(name.split(".")[0]):
        matches = timm.list_models(f"*{name.split('.')[0]}*")[:8]
        msg = f"Unknown backbone '{name}': not a timm model name. Close matches: {matches}."
        raise UnknownBackboneError(msg)
    use_hub = pre_trained and weights_path is None
    model = timm.create_model(name, pretrained=use_hub, num_classes=0)
    if weights_path is not None:
        load_local_weights(model, weights_path)
    return model


def load_local_weights(model: nn.Module, weights_path: str | Path) -> None:
    """Load backbone weights from a local ``.pth``/``.safetensors`` file (air-gapped machines).

    Keys are matched by name first. Files of other implementations of the same architecture (e.g.
    ``efficientnet_pytorch``, whose tensors come in timm's order under other names) are matched by
    position with timm's ``remap_state_dict``; shapes must agree and extra trailing tensors (a classifier)
    are ignored.
    """
    path = Path(weights_path)
    if not path.is_file():
        msg = f"Backbone weights file not found: '{path}'."
        raise FileNotFoundError(msg)
    try:
        source = load_state_dict(str(path), use_ema=False)
    except Exception as err:
        msg = f"Backbone weights file '{path}' could not be read as a state dict: {err}"
        raise ValueError(msg) from err
    if not isinstance(source, dict):
        msg = f"Backbone weights file '{path}' does not hold a state dict."
        raise ValueError(msg)
    source = {k: v for k, v in source.items() if isinstance(v, torch.Tensor)}
    target = model.state_dict()
    if set(target).issubset(source):
        model.load_state_dict({k: source[k] for k in target})
        logger.info("Loaded backbone weights by name from %s", path)
        return
    if len(source) < len(target):
        msg = f"Backbone weights file '{path}' has {len(source)} tensors, the backbone needs {len(target)}."
        raise ValueError(msg)
    # timm's remap checks only the element count (it reshapes); a file of another architecture must fail here.
    for (target_key, target_tensor), (source_key, source_tensor) in zip(target.items(), source.items(), strict=False):
        if target_tensor.shape != source_tensor.shape:
            msg = (
                f"Backbone weights file '{path}' does not fit this backbone: tensor '{source_key}' has shape "
                f"{tuple(source_tensor.shape)}, '{target_key}' needs {tuple(target_tensor.shape)}."
            )
            raise ValueError(msg)
    model.load_state_dict(remap_state_dict(source, model, allow_reshape=False))
    logger.info(
        "Loaded backbone weights by position from %s (%d unused trailing tensors, e.g. the classifier).",
        path,
        len(source) - len(target),
    )


class MultiLevelFeatureExtractor(nn.Module):
    """Return the feature maps of a timm backbone at every requested level.

    Args:
        backbone: timm model name.
        pre_trained: Load ImageNet weights from the timm hub.
        weights_path: Local weights file; replaces the hub download.

    """

    def __init__(self, backbone: str, pre_trained: bool = True, weights_path: str | Path | None = None) -> None:
        super().__init__()
        self.model = create_backbone(backbone, pre_trained, weights_path)
        self.is_efficientnet = isinstance(self.model, EfficientNet)
        self.num_levels = len(self.model.blocks) + 2 if self.is_efficientnet else len(self.model.feature_info)
        self.all_levels = list(range(self.num_levels))

    def validate_levels(self, levels: Sequence[int] | None, parameter: str) -> list[int]:
        """Check level indices against the backbone and return them sorted and unique (``None``: all)."""
        if levels is None:
            return list(self.all_levels)
        levels = list(levels)
        if not levels:
            msg = f"'{parameter}' must name at least one level."
            raise ValueError(msg)
        bad = [lvl for lvl in levels if not isinstance(lvl, int) or not 0 <= lvl < self.num_levels]
        if bad:
            msg = f"'{parameter}' has invalid level index(es) {bad}: this backbone has levels 0..{self.num_levels - 1}."
            raise ValueError(msg)
        return sorted(set(levels))

    def forward(self, images: torch.Tensor, levels: Sequence[int]) -> dict[int, torch.Tensor]:
        """Feature maps ``{level: (N, C, H, W)}`` for ``levels``."""
        wanted = sorted(levels)
        if not self.is_efficientnet:
            maps = self.model.forward_intermediates(images, indices=wanted, intermediates_only=True, stop_early=True)
            return dict(zip(wanted, maps, strict=True))
        head = self.num_levels - 1
        inner = [level for level in wanted if level != head]
        if head not in wanted:
            maps = self.model.forward_intermediates(
                images, indices=inner, extra_blocks=True, intermediates_only=True, stop_early=True
            )
            return dict(zip(inner, maps, strict=True))
        final, maps = self.model.forward_intermediates(images, indices=inner or [0], extra_blocks=True)
        return {**dict(zip(inner, maps[: len(inner)], strict=True)), head: final}

    @torch.no_grad()
    def level_shapes(self, image_size: tuple[int, int]) -> dict[int, tuple[int, int, int]]:
        """``{level: (channels, height, width)}`` for an input of ``image_size``, by a dry run."""
        was_training = self.training
        self.eval()
        probe = torch.zeros(1, 3, *image_size, device=next(self.parameters()).device)
        shapes = {lvl: tuple(f.shape[1:]) for lvl, f in self.forward(probe, self.all_levels).items()}
        self.train(was_training)
        return shapes

    def level_strides(self) -> dict[int, int]:
        """``{level: stride}`` in input pixels (EfficientNets: by a dry run at the backbone's largest stride)."""
        reductions = [int(info["reduction"]) for info in self.model.feature_info]
        if not self.is_efficientnet:
            return dict(enumerate(reductions))
        total = max(reductions)
        return {lvl: total // height for lvl, (_, height, _) in self.level_shapes((total, total)).items()}

    def level_modules(self) -> dict[int, list[nn.Module]]:
        """Backbone modules that compute each level (EfficientNets only; used to choose what to train)."""
        model = self.model
        modules: dict[int, list[nn.Module]] = {0: [model.conv_stem, model.bn1]}
        for index, stage in enumerate(model.blocks, start=1):
            modules[index] = [stage]
        modules[len(model.blocks) + 1] = [model.conv_head, model.bn2]
        return modules
