"""The layout term as a map: how unexpected each cell of the image's 3 × 3 coarse layout is, given the other cells.

The "local" image score's layout Gaussian models the deepest map level pooled to 3 × 3 as one joint vector ``x``
(DFM's statistic, as a Gaussian). On surfaces whose defects are large and diffuse it is the strongest evidence
there is (Magnetic Tile: image AUROC 0.991 alone), but it only scored images. Per cell ``j``, with the precision
``P = Σ⁻¹`` and ``g = P (x − μ)``, the cell's Gaussian given the other eight cells has covariance ``(P_jj)⁻¹`` and
residual ``(P_jj)⁻¹ g_j``, so its squared Mahalanobis distance is ``g_jᵀ (P_jj)⁻¹ g_j``: non-negative, and large
where the cell does not fit the rest of the layout. Written by hand: no library scores the cells of a joint
Gaussian. ``P = WᵀW`` comes from the layout Gaussian's own whitening ``W``; only ``(P_jj)⁻¹``'s whitening is
stored (9 · C² floats).
"""

from __future__ import annotations

import torch
from torch import nn

from .feature_samples import LAYOUT_GRID
from .gaussian import StreamingGaussian, robust_cholesky

CELLS = LAYOUT_GRID * LAYOUT_GRID


class LayoutMap(nn.Module):
    """Per-cell conditional Mahalanobis distances of the layout vector, ``sqrt(d² / C)`` on a 3 × 3 grid.

    Args:
        channels: Channels ``C`` of the layout level (the layout vector has ``C · 9`` entries, channel-major).

    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.channels = channels
        self.register_buffer("cell_whitening", torch.zeros(CELLS, channels, channels))

    @torch.no_grad()
    def fit(self, layout: StreamingGaussian) -> None:
        """Whitening of each cell's conditional covariance ``(P_jj)⁻¹`` from the fitted layout Gaussian."""
        whitening = layout.whitening[0].double()
        precision = whitening.T @ whitening  # Σ⁻¹ = WᵀW (W = L⁻¹, Σ = LLᵀ)
        c = self.channels
        blocks = precision.reshape(c, CELLS, c, CELLS).permute(1, 3, 0, 2)  # [j, k] = P over cells j, k
        diagonal = blocks[torch.arange(CELLS), torch.arange(CELLS)]  # (9, C, C): P_jj
        # (P_jj)⁻¹ = (LLᵀ)⁻¹ → g_jᵀ (P_jj)⁻¹ g_j = ‖L⁻¹ g_j‖²
        factor, _ = robust_cholesky(diagonal)
        eye = torch.eye(c, dtype=factor.dtype, device=factor.device).expand_as(factor)
        inverse = torch.linalg.solve_triangular(factor, eye, upper=False)
        self.cell_whitening.copy_(inverse.to(self.cell_whitening))

    def forward(self, layout_vector: torch.Tensor, layout: StreamingGaussian) -> torch.Tensor:
        """``(N, 1, C · 9)`` layout vectors → ``(N, 1, 3, 3)`` cell map in ``sqrt(d² / C)`` units."""
        n = layout_vector.shape[0]
        whitening = layout.whitening[0]
        centred = layout_vector[:, 0] - layout.mean[0]
        # g = WᵀW (x − μ). Einsums, not ``(centred @ W.T) @ W``: the ONNX exporter's optimiser folded the
        # transpose into the initialiser both MatMuls share, so the exported graph computed (x − μ) W W (measured).
        whitened_centred = torch.einsum("ij,nj->ni", whitening, centred)
        precision_times_centred = torch.einsum("ij,ni->nj", whitening, whitened_centred)
        per_cell = precision_times_centred.reshape(n, self.channels, CELLS).transpose(1, 2)  # (N, 9, C)
        whitened = torch.einsum("jik,njk->nji", self.cell_whitening, per_cell)
        squared = (whitened * whitened).sum(-1)
        return torch.sqrt(squared.clamp_min(0) / self.channels).reshape(n, 1, LAYOUT_GRID, LAYOUT_GRID)
