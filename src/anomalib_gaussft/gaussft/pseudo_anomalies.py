"""Pseudo-anomalies from held-out normal images, for detecting catastrophic forgetting.

The vicinal-risk-minimisation augmentations of the paper (mixup, CutMix, cutout,
AugMix) turn a normal image into one that is slightly off the normal
distribution. How well the current Gaussian separates them from the untouched
held-out normals measures what the features still know; no real anomaly is used.

torchvision's ``MixUp``/``CutMix`` draw one λ (and box) per *batch*, so each
image is mixed with its partner as a batch of two to get per-image parameters.
Every call is seeded, so the same held-out batch yields the same pseudo-anomalies
in every epoch and the metric is comparable across epochs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torchvision.transforms import v2

PSEUDO_ANOMALIES = ("mixup", "cutmix", "cutout", "augmix")


class _Pairwise:
    """Apply a batch-level torchvision transform (MixUp/CutMix) to one image and its partner (picklable)."""

    def __init__(self, transform: v2.Transform) -> None:
        self.transform = transform
        self.labels = torch.zeros(2, dtype=torch.long)

    def __call__(self, image: torch.Tensor, partner: torch.Tensor) -> torch.Tensor:
        mixed, _ = self.transform(torch.stack([image, partner]), self.labels)
        return mixed[0]


def _cutout(image: torch.Tensor, partner: torch.Tensor) -> torch.Tensor:
    del partner
    erase = v2.RandomErasing(p=1.0, scale=(0.02, 0.15), value=float(image.mean()))
    return erase(image)


def _augmix(image: torch.Tensor, partner: torch.Tensor) -> torch.Tensor:
    del partner
    as_uint8 = (image.clamp(0, 1) * 255).round().to(torch.uint8)
    return v2.AugMix(severity=3)(as_uint8).float() / 255


def _builders() -> dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]:
    return {
        # α < 1 puts λ mostly near 0 or 1; α = 1 gives uniform mixing weights.
        "mixup": _Pairwise(v2.MixUp(alpha=1.0, num_classes=2)),
        "cutmix": _Pairwise(v2.CutMix(alpha=1.0, num_classes=2)),
        "cutout": _cutout,
        "augmix": _augmix,
    }


def validate_pseudo_anomalies(kinds: Sequence[str]) -> list[str]:
    """Check augmentation names; returns them as a list."""
    kinds = list(kinds)
    unknown = [k for k in kinds if k not in PSEUDO_ANOMALIES]
    if unknown or not kinds:
        msg = f"pseudo_anomalies must be a non-empty subset of {list(PSEUDO_ANOMALIES)}, got {kinds}."
        raise ValueError(msg)
    return kinds


class PseudoAnomalyGenerator:
    """Seeded pseudo-anomalies of images in ``[0, 1]`` (before normalisation).

    Args:
        kinds: Augmentations to use, a subset of :data:`PSEUDO_ANOMALIES`.
        seed: Base seed; the batch index is added so each batch differs but repeats across epochs.

    """

    def __init__(self, kinds: Sequence[str], seed: int = 0) -> None:
        self.kinds = validate_pseudo_anomalies(kinds)
        self.seed = seed
        self._builders = _builders()

    def __call__(self, images: torch.Tensor, batch_index: int) -> dict[str, torch.Tensor]:
        """``{kind: (N, C, H, W)}`` pseudo-anomalies; image ``i`` is mixed with image ``i - 1``."""
        partners = images.roll(1, dims=0) if images.shape[0] > 1 else images.flip(-1)
        out: dict[str, torch.Tensor] = {}
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed * 100_003 + batch_index)
            for kind in self.kinds:
                build = self._builders[kind]
                out[kind] = torch.stack([build(img, partner) for img, partner in zip(images, partners, strict=True)])
        return out
