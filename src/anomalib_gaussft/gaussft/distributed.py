"""What GaussFT needs to run under Lightning's DDP strategy that Lightning and anomalib do not provide."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DistributedSampler

logger = logging.getLogger(__name__)


def unwrapped_model(module: nn.Module) -> nn.Module:
    """A DDP strategy's model wrapper that leaves the module as it is, after broadcasting rank 0's weights.

    PyTorch's ``DistributedDataParallel`` refuses modules without trainable parameters (the frozen Gaussian
    AD); Lightning itself keeps the module unwrapped and only syncs its states when not fitting.
    """
    from lightning.pytorch.overrides.distributed import _sync_module_states

    _sync_module_states(module)
    return module


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
