"""A training shuffle that depends only on the seed and the epoch, so a resumed fine-tuning sees the same batches."""

from __future__ import annotations

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch.utils.data import RandomSampler


class SeededShuffle(Callback):
    """Give the training loader's ``RandomSampler`` a generator seeded by ``(seed, epoch)`` before each epoch.

    A ``RandomSampler`` without a generator draws its permutation from the global RNG, whose state a resumed run
    does not share with the interrupted one (and Lightning creates the first resumed epoch's iterator without
    calling ``on_train_epoch_start``). Setting the generator in ``on_train_start`` (which also runs on resume) and
    in every ``on_train_epoch_start`` makes every epoch's order a function of the seed and the epoch only.
    ``DistributedSampler`` already shuffles by seed and epoch and is left alone.

    Args:
        seed: Base seed.

    """

    def __init__(self, seed: int) -> None:
        self.seed = seed

    def _seed_sampler(self, trainer: Trainer) -> None:
        sampler = getattr(trainer.train_dataloader, "sampler", None)
        if isinstance(sampler, RandomSampler):
            sampler.generator = torch.Generator().manual_seed(self.seed * 100_003 + trainer.current_epoch)

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """The first epoch of this run (a resumed run starts here too)."""
        del pl_module
        self._seed_sampler(trainer)

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Every later epoch."""
        del pl_module
        self._seed_sampler(trainer)
