"""Weight-space interpolation between the pretrained and the fine-tuned backbone (WiSE-FT, Wortsman et al. 2022)."""

from __future__ import annotations

import torch
from torch import nn


def trainable_weights(module: nn.Module) -> dict[str, torch.Tensor]:
    """CPU copies of the parameters that fine-tuning changes (``requires_grad``), by ``state_dict`` name."""
    return {name: p.detach().cpu().clone() for name, p in module.named_parameters() if p.requires_grad}


@torch.no_grad()
def load_interpolation(
    module: nn.Module, pretrained: dict[str, torch.Tensor], fine_tuned: dict[str, torch.Tensor], alpha: float
) -> None:
    """Set ``θ(α) = (1 − α)·θ_pretrained + α·θ_fine-tuned`` on the trainable parameters of ``module``.

    α = 0 is the pretrained network, α = 1 the fine-tuned one; parameters that were not trained stay as they are.
    """
    parameters = dict(module.named_parameters())
    for name, start in pretrained.items():
        target = parameters[name]
        mixed = torch.lerp(start.to(target), fine_tuned[name].to(target), alpha)
        target.copy_(mixed)
