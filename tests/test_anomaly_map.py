"""Anomaly maps against a direct (slow) sklearn reference, and their shapes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.covariance import LedoitWolf

from anomalib_gaussft import GaussFT
from conftest import TINY_BACKBONE, neighbourhood_mean_reference


def _reference_level_map(train: np.ndarray, test: np.ndarray, map_gaussian: str, regions: int) -> np.ndarray:
    """``sqrt(d² / C)`` per position with sklearn's Ledoit-Wolf and an explicit inverse.

    ``regional``: one Gaussian per region of a ``regions × regions`` grid, fitted on the features of every position
    of the region.
    """
    _, c, h, w = train.shape
    out = np.zeros((test.shape[0], h, w))
    rows, cols = min(regions, h), min(regions, w)
    region = [[(i * rows // h, j * cols // w) for j in range(w)] for i in range(h)]
    if map_gaussian == "shared":
        shared = LedoitWolf().fit(train.transpose(0, 2, 3, 1).reshape(-1, c))
        inv, mean = np.linalg.inv(shared.covariance_), shared.location_
    for i in range(h):
        for j in range(w):
            if map_gaussian == "per_position":
                fitted = LedoitWolf().fit(train[:, :, i, j])
                inv, mean = np.linalg.inv(fitted.covariance_), fitted.location_
            elif map_gaussian == "regional":
                members = [train[:, :, a, b] for a in range(h) for b in range(w) if region[a][b] == region[i][j]]
                fitted = LedoitWolf().fit(np.concatenate(members))
                inv, mean = np.linalg.inv(fitted.covariance_), fitted.location_
            centred = test[:, :, i, j] - mean
            out[:, i, j] = np.sqrt(np.einsum("ni,ij,nj->n", centred, inv, centred) / c)
    return out


@pytest.mark.parametrize(
    ("map_gaussian", "neighbourhood"), [("shared", 3), ("per_position", 3), ("regional", 3), ("regional", 1)]
)
def test_level_maps_match_direct_reference(map_gaussian: str, neighbourhood: int) -> None:
    """Fit and map both read each position's neighbourhood mean (default 3 × 3; borders: inside positions only)."""
    model = GaussFT(
        backbone=TINY_BACKBONE,
        pre_trained=False,
        image_size=32,
        map_gaussian=map_gaussian,
        map_regions=3,  # fewer regions than the 4 × 4 map of level 3 has positions: unequal blocks share Gaussians
        map_neighbourhood=neighbourhood,
    ).eval()
    train, test = torch.rand(24, 3, 32, 32), torch.rand(3, 3, 32, 32)
    for chunk in train.split(5):
        model.model.update_statistics(chunk)
    model.model.fit()
    with torch.no_grad():
        train_features = model.model.extract(train)
        test_features = model.model.extract(test)
        maps = model.model.level_maps(test_features)
    for level, level_map in zip(model.model.map_levels, maps, strict=True):
        expected = _reference_level_map(
            neighbourhood_mean_reference(train_features[level].double().numpy(), neighbourhood),
            neighbourhood_mean_reference(test_features[level].double().numpy(), neighbourhood),
            map_gaussian,
            model.model.map_regions,
        )
        np.testing.assert_allclose(level_map[:, 0].double().numpy(), expected, rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize(("size", "batch"), [(32, 1), (64, 2), (96, 3)])
def test_anomaly_map_shape_follows_input(size: int, batch: int) -> None:
    model = GaussFT(backbone=TINY_BACKBONE, pre_trained=False, image_size=size).eval()
    for _ in range(2):
        model.model.update_statistics(torch.rand(4, 3, size, size))
    model.model.fit()
    with torch.no_grad():
        out = model.model(torch.rand(batch, 3, size, size))
    assert out.anomaly_map.shape == (batch, 1, size, size)
    assert out.anomaly_map.dtype == torch.float32
    assert torch.isfinite(out.anomaly_map).all()
    assert (out.anomaly_map >= 0).all()


def test_shared_gaussian_accepts_other_input_sizes() -> None:
    model = GaussFT(backbone=TINY_BACKBONE, pre_trained=False, image_size=64).eval()
    model.model.update_statistics(torch.rand(6, 3, 64, 64))
    model.model.fit()
    with torch.no_grad():
        assert model.model(torch.rand(1, 3, 96, 128)).anomaly_map.shape == (1, 1, 96, 128)
