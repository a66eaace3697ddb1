"""Streaming multivariate Gaussians with Ledoit-Wolf shrinkage.

anomalib's ``MultiVariateGaussian`` needs every embedding in memory at once and
inverts the covariance explicitly. GaussFT needs neither: it accumulates float64
sufficient statistics batch by batch (memory independent of the number of
training images, all-reducible across DDP ranks) and stores a Cholesky-based
whitening matrix, so scoring is a plain ``matmul`` that exports to ONNX.

One ``StreamingGaussian`` holds ``groups`` independent Gaussians of dimension
``dim``: one group for a pooled image-level feature or a Gaussian shared by all
positions of a feature map, ``H * W`` groups for PaDiM-style per-position
Gaussians, one group per image region for regional ones (``group_index`` maps
positions to regions).
"""

from __future__ import annotations

import logging

import torch
from torch import nn

logger = logging.getLogger(__name__)

# Relative ridges tried, in order, when a shrunk covariance is still not positive definite
# (e.g. constant features): ridge = factor * mean eigenvalue (or an absolute floor).
_RIDGE_FACTORS = (0.0, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)
_ABSOLUTE_FLOOR = 1e-12


def ledoit_wolf_from_moments(
    count: torch.Tensor,
    sum_x: torch.Tensor,
    sum_outer: torch.Tensor,
    sum_sq_norm_x: torch.Tensor,
    sum_sq_norm_sq: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean, empirical and Ledoit-Wolf shrunk covariance from raw moments.

    Reproduces ``sklearn.covariance.ledoit_wolf`` (``assume_centered=False``)
    exactly, but from the streaming moments Σx, Σxxᵀ, Σ‖x‖²x and Σ‖x‖⁴ instead of the
    data matrix; the centred fourth moment that the shrinkage needs is expanded
    analytically in terms of them.

    Args:
        count: ``(G,)`` number of samples per group.
        sum_x: ``(G, d)`` Σx.
        sum_outer: ``(G, d, d)`` Σxxᵀ.
        sum_sq_norm_x: ``(G, d)`` Σ‖x‖²x.
        sum_sq_norm_sq: ``(G,)`` Σ‖x‖⁴.

    Returns:
        ``(mean, empirical_cov, shrunk_cov, shrinkage)`` in float64.

    """
    n = count.to(torch.float64)
    dim = sum_x.shape[-1]
    mean = sum_x / n[:, None]
    empirical = sum_outer / n[:, None, None] - mean[:, :, None] * mean[:, None, :]
    empirical = 0.5 * (empirical + empirical.transpose(-1, -2))

    trace = torch.diagonal(empirical, dim1=-2, dim2=-1).sum(-1)
    mu = trace / dim
    # Σ_k ‖x_k - m‖⁴ expanded with a = ‖x‖², b = x·m, c = ‖m‖².
    c = (mean * mean).sum(-1)
    sum_a = torch.diagonal(sum_outer, dim1=-2, dim2=-1).sum(-1)
    sum_b = (sum_x * mean).sum(-1)
    sum_b2 = torch.einsum("gi,gij,gj->g", mean, sum_outer, mean)
    sum_ab = (sum_sq_norm_x * mean).sum(-1)
    centred_fourth = sum_sq_norm_sq - 4 * sum_ab + 4 * sum_b2 + 2 * c * sum_a - 4 * c * sum_b + n * c * c

    delta_ = (empirical * empirical).sum((-2, -1))
    beta = (centred_fourth / n - delta_) / (dim * n)
    delta = (delta_ - 2.0 * mu * trace + dim * mu * mu) / dim
    beta = torch.minimum(beta, delta)
    shrinkage = torch.where(delta > 0, beta / delta.clamp_min(torch.finfo(torch.float64).tiny), torch.zeros_like(delta))
    shrinkage = shrinkage.clamp(0.0, 1.0)
    if dim == 1:  # sklearn does not shrink a single feature
        shrinkage = torch.zeros_like(shrinkage)
    eye = torch.eye(dim, dtype=torch.float64, device=sum_x.device)
    shrunk = (1.0 - shrinkage)[:, None, None] * empirical + (shrinkage * mu)[:, None, None] * eye
    return mean, empirical, shrunk, shrinkage


def robust_cholesky(covariance: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cholesky factor of each ``(d, d)`` matrix, adding the smallest ridge that makes it work.

    Returns:
        ``(lower_factor, ridge)``, ridge ``(G,)`` is the value added to the diagonal.

    """
    dim = covariance.shape[-1]
    eye = torch.eye(dim, dtype=covariance.dtype, device=covariance.device)
    scale = torch.diagonal(covariance, dim1=-2, dim2=-1).mean(-1).clamp_min(_ABSOLUTE_FLOOR)
    factor = torch.zeros_like(covariance)
    ridge = torch.full_like(scale, float("nan"))
    pending = torch.ones_like(scale, dtype=torch.bool)
    for ridge_factor in _RIDGE_FACTORS:
        idx = pending.nonzero().flatten()
        if idx.numel() == 0:
            break
        current_ridge = ridge_factor * scale[idx] if ridge_factor > 0 else torch.zeros_like(scale[idx])
        candidate = covariance[idx] + current_ridge[:, None, None] * eye
        chol, info = torch.linalg.cholesky_ex(candidate)
        ok = info == 0
        factor[idx[ok]] = chol[ok]
        ridge[idx[ok]] = current_ridge[ok]
        pending[idx[ok]] = False
    if pending.any():
        msg = "Covariance could not be factorised even with a ridge equal to its scale; features contain NaN/Inf?"
        raise FloatingPointError(msg)
    if (ridge > 0).any():
        logger.warning("Added a diagonal ridge to %d singular covariance(s).", int((ridge > 0).sum()))
    return factor, ridge


class StreamingGaussian(nn.Module):
    """``groups`` Gaussians of dimension ``dim`` fitted from streamed samples.

    Call :meth:`update` with batches of shape ``(N, groups, dim)``, then :meth:`fit`.
    After fitting, :meth:`squared_mahalanobis` needs only ``mean`` and
    ``whitening`` (``L⁻¹`` with ``Σ = LLᵀ``), both persistent float32 buffers.

    Args:
        groups: Number of independent Gaussians.
        dim: Feature dimension.
        persistent: Keep the fitted statistics in the ``state_dict`` (``False`` for working Gaussians
            that are re-estimated anyway, e.g. the fine-tuning loss's).

    """

    def __init__(self, groups: int, dim: int, persistent: bool = True) -> None:
        super().__init__()
        self.groups = groups
        self.dim = dim
        self.register_buffer("mean", torch.zeros(groups, dim), persistent=persistent)
        self.register_buffer("whitening", torch.zeros(groups, dim, dim), persistent=persistent)
        self.register_buffer("shrinkage", torch.zeros(groups), persistent=persistent)
        self.register_buffer("num_samples", torch.zeros((), dtype=torch.long), persistent=persistent)
        # Average variance trace(Σ)/dim: scales the Euclidean fine-tuning loss (an ablation); not needed to score.
        self.register_buffer("mean_variance", torch.ones(groups), persistent=False)
        self._accumulators: dict[str, torch.Tensor] | None = None

    @property
    def is_fitted(self) -> bool:
        """Whether :meth:`fit` has produced usable statistics."""
        return bool(self.num_samples > 0)

    def reset(self) -> None:
        """Drop the accumulated (not the fitted) statistics."""
        self._accumulators = None

    def _new_accumulators(self, device: torch.device) -> dict[str, torch.Tensor]:
        g, d, f64 = self.groups, self.dim, torch.float64
        return {
            "shift": torch.zeros(g, d, dtype=f64, device=device),
            "count": torch.zeros(g, dtype=f64, device=device),
            "sum_x": torch.zeros(g, d, dtype=f64, device=device),
            "sum_outer": torch.zeros(g, d, d, dtype=f64, device=device),
            "sum_sq_norm_x": torch.zeros(g, d, dtype=f64, device=device),
            "sum_sq_norm_sq": torch.zeros(g, dtype=f64, device=device),
        }

    @torch.no_grad()
    def update(self, samples: torch.Tensor, group_index: torch.Tensor | None = None) -> None:
        """Accumulate samples in float64: ``(N, groups, dim)``, or ``(N, P, dim)`` with ``group_index`` ``(P,)``.

        ``group_index`` maps each of ``P`` sample slots (e.g. feature-map positions) to its group (region), so
        several slots pool their samples into one Gaussian.
        """
        slots = self.groups if group_index is None else len(group_index)
        if samples.ndim != 3 or samples.shape[1:] != (slots, self.dim):
            msg = f"Expected samples of shape (N, {slots}, {self.dim}), got {tuple(samples.shape)}."
            raise ValueError(msg)
        if not torch.isfinite(samples).all():
            msg = "Non-finite (NaN/Inf) features reached the Gaussian statistics; check the input images."
            raise FloatingPointError(msg)
        x = samples.detach().to(torch.float64)

        def per_group(per_slot: torch.Tensor) -> torch.Tensor:  # sum the slots of each group
            if group_index is None:
                return per_slot
            summed = torch.zeros(self.groups, *per_slot.shape[1:], dtype=per_slot.dtype, device=per_slot.device)
            return summed.index_add_(0, group_index.to(per_slot.device), per_slot)

        slot_count = torch.full((slots,), float(x.shape[0]), dtype=torch.float64, device=x.device)
        if self._accumulators is None:
            self._accumulators = self._new_accumulators(samples.device)
            # Moments are taken about the first batch's mean: float64 sums of raw features whose
            # mean is large against their spread would lose the covariance to cancellation.
            self._accumulators["shift"] = per_group(x.sum(0)) / per_group(slot_count)[:, None]
        acc = self._accumulators
        x = x - (acc["shift"] if group_index is None else acc["shift"][group_index])
        sq_norm = (x * x).sum(-1)  # (N, slots)
        acc["count"] += per_group(slot_count)
        acc["sum_x"] += per_group(x.sum(0))
        acc["sum_outer"] += per_group(torch.einsum("ngi,ngj->gij", x, x))
        acc["sum_sq_norm_x"] += per_group(torch.einsum("ng,ngi->gi", sq_norm, x))
        acc["sum_sq_norm_sq"] += per_group((sq_norm * sq_norm).sum(0))

    def accumulators(self, device: torch.device | None = None) -> dict[str, torch.Tensor]:
        """The raw float64 accumulators (e.g. to all-reduce them across processes).

        With ``device`` given, a Gaussian that saw no sample gets zero accumulators
        (a DDP rank without data) instead of an error.
        """
        if self._accumulators is None and device is not None:
            self._accumulators = self._new_accumulators(device)
        if self._accumulators is None:
            msg = "No samples were accumulated: the training set is empty."
            raise RuntimeError(msg)
        return self._accumulators

    @torch.no_grad()
    def shift_to(self, new_shift: torch.Tensor) -> None:
        """Re-express the accumulated moments about ``new_shift`` (so processes can sum them)."""
        acc = self.accumulators()
        delta = acc["shift"] - new_shift.to(acc["shift"])  # y' = y + delta
        n, s1, s2 = acc["count"], acc["sum_x"], acc["sum_outer"]
        s3, s4 = acc["sum_sq_norm_x"], acc["sum_sq_norm_sq"]
        sq_norm_sum = torch.diagonal(s2, dim1=-2, dim2=-1).sum(-1)
        c = (delta * delta).sum(-1)
        delta_dot_s1 = (delta * s1).sum(-1)
        s2_delta = torch.einsum("gij,gj->gi", s2, delta)
        acc["sum_sq_norm_sq"] = (
            s4
            + 4 * (delta * s3).sum(-1)
            + 4 * (delta * s2_delta).sum(-1)
            + 2 * c * sq_norm_sum
            + 4 * c * delta_dot_s1
            + n * c * c
        )
        acc["sum_sq_norm_x"] = (
            s3
            + 2 * s2_delta
            + c[:, None] * s1
            + sq_norm_sum[:, None] * delta
            + 2 * delta_dot_s1[:, None] * delta
            + (n * c)[:, None] * delta
        )
        outer_s1_delta = s1[:, :, None] * delta[:, None, :]
        acc["sum_outer"] = (
            s2
            + outer_s1_delta
            + outer_s1_delta.transpose(-1, -2)
            + n[:, None, None] * (delta[:, :, None] * delta[:, None, :])
        )
        acc["sum_x"] = s1 + n[:, None] * delta
        acc["shift"] = new_shift.to(acc["shift"]).clone()

    @torch.no_grad()
    def fit(self) -> dict[str, torch.Tensor]:
        """Turn the accumulated moments into ``mean`` and ``whitening``; returns the float64 estimates."""
        acc = self.accumulators()
        n = int(acc["count"].min().item())  # groups (regions) may differ in size: the smallest counts
        if n < 2:
            msg = f"A Gaussian needs at least 2 training samples, got {n}."
            raise ValueError(msg)
        moments = {k: v for k, v in acc.items() if k != "shift"}
        mean, empirical, shrunk, shrinkage = ledoit_wolf_from_moments(**moments)
        mean = mean + acc["shift"]
        factor, ridge = robust_cholesky(shrunk)
        eye = torch.eye(self.dim, dtype=torch.float64, device=factor.device).expand_as(factor)
        whitening = torch.linalg.solve_triangular(factor, eye, upper=False)
        self.mean.copy_(mean.to(self.mean))
        self.whitening.copy_(whitening.to(self.whitening))
        self.shrinkage.copy_(shrinkage.to(self.shrinkage))
        self.mean_variance.copy_((torch.diagonal(shrunk, dim1=-2, dim2=-1).mean(-1)).to(self.mean_variance))
        self.num_samples.fill_(n)
        return {"mean": mean, "covariance": shrunk, "empirical": empirical, "shrinkage": shrinkage, "ridge": ridge}

    def squared_mahalanobis(self, samples: torch.Tensor, group_index: torch.Tensor | None = None) -> torch.Tensor:
        """Squared Mahalanobis distance of ``(N, groups, dim)`` samples → ``(N, groups)``.

        With ``group_index`` ``(P,)``: samples ``(N, P, dim)``, slot ``p`` scored by group ``group_index[p]``.
        """
        mean, whitening = self.mean, self.whitening
        if group_index is not None:  # a gather of constant buffers: exports as an ONNX Gather
            mean, whitening = mean[group_index], whitening[group_index]
        centred = samples - mean
        whitened = torch.einsum("gij,ngj->ngi", whitening, centred)
        return (whitened * whitened).sum(-1)

    def squared_euclidean(self, samples: torch.Tensor, group_index: torch.Tensor | None = None) -> torch.Tensor:
        """Squared Euclidean distance to the mean over the average variance, ``(N, groups)`` (≈ dim, like d²).

        ``group_index``: as in :meth:`squared_mahalanobis`.
        """
        mean, variance = self.mean, self.mean_variance
        if group_index is not None:
            mean, variance = mean[group_index], variance[group_index]
        centred = samples - mean
        return (centred * centred).sum(-1) / variance
