"""The held-out normals (forgetting detection, calibration), the loss's folds and their loaders."""

from __future__ import annotations

import itertools
import logging
import os
from collections.abc import Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader, Subset

from .input_checks import dataset_image_paths
from .loss import N_FOLDS

logger = logging.getLogger(__name__)


def held_out_count(n_images: int, fraction: float) -> int:
    """Number of images :func:`held_out_split` holds out of ``n_images``: ``round(fraction * n)``, at least 2."""
    return max(2, round(fraction * n_images))


def minimum_training_images(fraction: float) -> int:
    """The fewest training images that leave at least 2 to fit after holding out ``fraction`` (≥ 2) of them."""
    return next(m for m in itertools.count(4) if m - held_out_count(m, fraction) >= 2)


def held_out_split(image_paths: Sequence[str], fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Deterministic ``(fit_indices, held_out_indices)`` of a training set.

    The split depends only on the set of paths and the seed (not on dataset order, process rank or
    resumption), so every DDP rank and every resumed run agrees.
    """
    if not 0.0 < fraction < 1.0:
        msg = f"held_out_fraction={fraction} is invalid: allowed is a number in (0, 1)."
        raise ValueError(msg)
    n = len(image_paths)
    n_held_out = held_out_count(n, fraction)
    if n - n_held_out < 2:
        msg = (
            f"Too few normal training images: {n}. held_out_fraction={fraction} holds out {n_held_out} of them "
            "(at least 2: for forgetting detection when fine-tuning, for calibration with false_alarm_rate) and the "
            f"fit needs at least 2 more, so at least {minimum_training_images(fraction)} training images are "
            "needed. Add normal images, lower held_out_fraction, or set fine_tune_epochs=0 and "
            "false_alarm_rate=None (which need only 2)."
        )
        raise ValueError(msg)
    order = sorted(range(n), key=lambda i: str(image_paths[i]))
    generator = torch.Generator().manual_seed(seed)
    permutation = torch.randperm(n, generator=generator).tolist()
    shuffled = [order[p] for p in permutation]
    return sorted(shuffled[n_held_out:]), sorted(shuffled[:n_held_out])


class HeldOutSplit:
    """A training set split into images to fit/train on and held-out normals, with loaders over each part.

    The fit images are dealt into the loss's folds alternately in path order. The loaders yield raw
    (not pre-processed) batches: pseudo-anomalies are made from raw images, and
    :meth:`GaussFTModel.iter_features` pre-processes every batch on its way to the backbone.

    Args:
        dataset: Map-style training dataset of anomalib items (with ``image_path``).
        fraction: Fraction held out.
        seed: Seed of the split.
        batch_size: Batch size of the loaders.
        num_workers: Workers of the loaders.
        collate_fn: The dataset's collate function.

    """

    def __init__(
        self,
        dataset: Any,  # noqa: ANN401 - any map-style dataset of anomalib items
        fraction: float,
        seed: int,
        batch_size: int = 8,
        num_workers: int = 0,
        collate_fn: Any = None,  # noqa: ANN401
    ) -> None:
        self.dataset = dataset
        paths = dataset_image_paths(dataset)
        self.paths = paths if paths is not None else [str(dataset[i].image_path) for i in range(len(dataset))]
        self.fit_indices, self.held_out_indices = held_out_split(self.paths, fraction, seed)
        self.held_out_paths = frozenset(self.paths[i] for i in self.held_out_indices)
        fit_paths = sorted(self.paths[i] for i in self.fit_indices)
        self._fold_of = {path: rank % N_FOLDS for rank, path in enumerate(fit_paths)}
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.collate_fn = collate_fn

    @classmethod
    def from_trainer(cls, trainer: Any, fraction: float, seed: int) -> HeldOutSplit:  # noqa: ANN401
        """Split the training set of a trainer's datamodule (or of its training dataloader)."""
        datamodule = getattr(trainer, "datamodule", None)
        if datamodule is not None and hasattr(datamodule, "train_data"):
            dataset = datamodule.train_data
        else:
            dataset = trainer.train_dataloader.dataset
        batch_size = getattr(datamodule, "eval_batch_size", None) or getattr(datamodule, "train_batch_size", None) or 8
        collate = getattr(datamodule, "external_collate_fn", None) or getattr(dataset, "collate_fn", None)
        # No more workers than cores: anomalib's default of 8 made torch warn at every loader on small machines.
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        workers = min(getattr(datamodule, "num_workers", 0), cores)
        return cls(dataset, fraction, seed, batch_size, workers, collate)

    def is_held_out(self, paths: Sequence[Any]) -> list[bool]:
        """Whether each path is a held-out image."""
        return [str(path) in self.held_out_paths for path in paths]

    def folds(self, paths: Sequence[Any], device: torch.device | str = "cpu") -> torch.Tensor:
        """The loss fold of each path (−1 for images outside the fit part)."""
        return torch.tensor([self._fold_of.get(str(path), -1) for path in paths], device=device)

    def loader(self, part: str) -> DataLoader:
        """Raw batches of ``"fit"``, ``"held_out"`` or ``"all"`` images, in a fixed order."""
        indices = {"fit": self.fit_indices, "held_out": self.held_out_indices, "all": None}[part]
        subset = self.dataset if indices is None else Subset(self.dataset, indices)
        return DataLoader(
            subset, batch_size=self.batch_size, shuffle=False, num_workers=self.num_workers, collate_fn=self.collate_fn
        )

    def release(self) -> None:
        """Drop the dataset reference once fitting is done (a torch export pickles the whole model)."""
        self.dataset = None

    def describe(self, forgetting: bool, calibration: bool, normalisation: bool = False) -> str:
        """One log line: how many images are fitted and held out, and what for."""
        uses = {"forgetting detection": forgetting, "calibration": calibration, "score normalisation": normalisation}
        purposes = [purpose for purpose, used in uses.items() if used]
        return (
            f"{'Fine-tuning' if forgetting else 'Fitting'} on {len(self.fit_indices)} normal images; "
            f"{len(self.held_out_indices)} held out for {' and '.join(purposes)} (never trained on)."
        )
