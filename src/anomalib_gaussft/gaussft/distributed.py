"""What GaussFT needs to run under Lightning's DDP strategy that Lightning and anomalib do not provide."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.strategies import DDPStrategy, Strategy
from lightning.pytorch.trainer.states import TrainerFn
from torch import nn
from torch.utils.data import DistributedSampler

from .gaussian import StreamingGaussian

logger = logging.getLogger(__name__)


def unwrapped_model(module: nn.Module) -> nn.Module:
    """A DDP strategy's model wrapper that leaves the module as it is, after broadcasting rank 0's weights.

    PyTorch's ``DistributedDataParallel`` refuses modules without trainable parameters (the frozen Gaussian
    AD); Lightning itself keeps the module unwrapped and only syncs its states when not fitting.
    """
    from lightning.pytorch.overrides.distributed import _sync_module_states

    _sync_module_states(module)
    return module


def keep_frozen_model_unwrapped(strategy: Strategy | None) -> None:
    """Tell a DDP strategy not to wrap the frozen Gaussian AD in ``DistributedDataParallel``.

    PyTorch's DDP refuses a module without trainable parameters, which the frozen model is; its statistics
    are all-reduced explicitly (:func:`all_reduce_statistics`). Lightning itself skips the wrapper outside
    fitting but has no public switch for a fit without gradients, hence the strategy's model hook is replaced.
    """
    if isinstance(strategy, DDPStrategy):
        strategy._setup_model = unwrapped_model


@torch.no_grad()
def all_reduce_statistics(gaussians: Iterable[StreamingGaussian], strategy: Any, device: torch.device) -> None:  # noqa: ANN401
    """Sum the streamed moments over processes, so that every rank fits the same Gaussians as one process."""
    for gaussian in gaussians:
        accumulators = gaussian.accumulators(device=device)
        # Any common reference point works (the moments are re-expressed exactly); use the mean shift.
        gaussian.shift_to(strategy.reduce(accumulators["shift"].clone(), reduce_op="mean"))
        for key, tensor in gaussian.accumulators().items():
            if key != "shift":
                tensor.copy_(strategy.reduce(tensor, reduce_op="sum"))


def zero_loss(module: nn.Module) -> torch.Tensor:
    """A zero loss that reaches every trainable parameter.

    A DDP rank whose batch has nothing to train on must still run backward: the gradient all-reduce needs every
    rank at every step.
    """
    return sum(p.sum() for p in module.parameters() if p.requires_grad) * 0.0


def real_share(sampler: object, rank_samples_seen: int, batch_size: int) -> int:
    """How many of a batch's samples are not ``DistributedSampler`` padding.

    The sampler pads the index list by repeating samples so that every rank gets as many; the padding is
    appended at the end, so rank ``r``'s first ``len(range(r, N, world))`` samples are its real share.
    """
    if not isinstance(sampler, DistributedSampler) or sampler.drop_last or sampler.num_replicas <= 1:
        return batch_size
    share = len(range(sampler.rank, len(sampler.dataset), sampler.num_replicas))
    return max(0, min(batch_size, share - rank_samples_seen))


def keep_rank_zero_workspace(rank_dirs: list[str]) -> None:
    """Remove the empty versioned folders other DDP ranks made and point ``latest`` at rank 0's.

    anomalib's Engine creates a new ``v<N>`` folder (and moves the ``latest`` link to it) in every process,
    so under DDP ``latest`` ends up on an empty folder of a non-zero rank while rank 0 wrote the results.
    """
    own = Path(rank_dirs[0])
    for other in {Path(d) for d in rank_dirs[1:]} - {own}:
        if other.parent == own.parent and other.is_dir() and not any(other.iterdir()):
            other.rmdir()
    latest = own.parent / "latest"
    if latest.is_symlink() and latest.resolve() != own.resolve():
        latest.unlink()
        latest.symlink_to(own, target_is_directory=True)
        logger.info("Pointed %s at rank 0's results, %s.", latest, own)


def gather_workspaces(root_dir: str | Path) -> list[str]:
    """Every rank's ``default_root_dir`` (collective: call on all ranks)."""
    dirs: list[str | None] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(dirs, str(Path(root_dir).resolve()))
    return [str(d) for d in dirs]


class DistributedFit(Callback):
    """GaussFT under DDP: an unwrapped frozen model, and one results folder (rank 0's) behind ``latest``."""

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """The frozen fit has no gradient to synchronise: keep it out of ``DistributedDataParallel``."""
        if stage == TrainerFn.FITTING and not getattr(pl_module, "fine_tuning", True):
            keep_frozen_model_unwrapped(trainer.strategy)

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Remove the empty folders of other ranks and point ``latest`` at rank 0's."""
        del pl_module
        if trainer.world_size <= 1 or not torch.distributed.is_initialized():
            return
        rank_dirs = gather_workspaces(trainer.default_root_dir)
        if trainer.is_global_zero:
            keep_rank_zero_workspace(rank_dirs)
