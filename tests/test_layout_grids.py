"""The layout term on two pooling grids one feature position apart, each with its own Gaussian, evidence averaged."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F  # noqa: N812

from anomalib_gaussft import GaussFT
from anomalib_gaussft.gaussft.feature_samples import layout_offset, layout_vectors
from anomalib_gaussft.gaussft.torch_model import GaussFTModel
from conftest import TINY_BACKBONE

KWARGS = {"backbone": TINY_BACKBONE, "pre_trained": False, "image_size": 64}
WIDE = {**KWARGS, "image_size": 128}  # an 8 × 8 layout level: two distinct grids (at 64 px it is 2 × 2)


def _pooled_3x3(maps: np.ndarray) -> np.ndarray:
    """Adaptive 3 × 3 average pooling written out (PyTorch's windows: floor(i·h/3) to ceil((i+1)·h/3))."""
    n, c, h, w = maps.shape
    out = np.zeros((n, c, 3, 3))
    for i in range(3):
        for j in range(3):
            rows = slice(i * h // 3, -(-(i + 1) * h // 3))
            cols = slice(j * w // 3, -(-(j + 1) * w // 3))
            out[:, :, i, j] = maps[:, :, rows, cols].mean(axis=(2, 3))
    return out.reshape(n, c * 9)


def test_two_grids_pool_the_map_without_its_last_and_without_its_first_rows_and_columns() -> None:
    maps = torch.randn(2, 5, 14, 10, dtype=torch.float64)
    assert (layout_offset(14), layout_offset(10), layout_offset(24), layout_offset(3)) == (1, 1, 2, 0)
    (whole,) = layout_vectors(maps, 1)
    first, second = layout_vectors(maps, 2)
    x = maps.numpy()
    np.testing.assert_allclose(whole[:, 0].numpy(), _pooled_3x3(x), rtol=1e-12)
    np.testing.assert_allclose(first[:, 0].numpy(), _pooled_3x3(x[:, :, :13, :9]), rtol=1e-12)
    np.testing.assert_allclose(second[:, 0].numpy(), _pooled_3x3(x[:, :, 1:, 1:]), rtol=1e-12)
    tiny = layout_vectors(torch.randn(1, 2, 2, 2), 2)  # a map no wider than the grid: both grids see all of it
    torch.testing.assert_close(tiny[0], tiny[1])


def test_each_grid_has_its_own_gaussian_and_the_layout_term_is_their_mean_distance() -> None:
    torch.manual_seed(0)
    model = GaussFT(**WIDE).model.eval()
    assert model.layout_grids == 2
    train = [torch.rand(8, 3, 128, 128) for _ in range(3)]
    for images in train:
        model.update_statistics(images)
    model.fit(quiet=True)
    with torch.no_grad():
        maps = torch.cat([model.extract(images)[model.layout_level] for images in train])
        h, w = maps.shape[-2:]
        x = maps.double().numpy()
        crops = (
            x[:, :, : h - layout_offset(h), : w - layout_offset(w)],
            x[:, :, layout_offset(h) :, layout_offset(w) :],
        )
        for gaussian, crop in zip(model.layout_gaussians(), crops, strict=True):
            np.testing.assert_allclose(gaussian.mean[0].double().numpy(), _pooled_3x3(crop).mean(0), atol=1e-5)
        test = torch.rand(4, 3, 128, 128)
        features = model.extract(test)
        distance = model.layout_distance(features)
        vectors = model.layout_samples(features)
        per_grid = [
            torch.sqrt(g.squared_mahalanobis(v).clamp_min(0))[:, 0]
            for g, v in zip(model.layout_gaussians(), vectors, strict=True)
        ]
    assert not torch.allclose(per_grid[0], per_grid[1])  # two Gaussians, two distances
    torch.testing.assert_close(distance, (per_grid[0] + per_grid[1]) / 2)
    one = GaussFT(**KWARGS, layout_grids=1).model
    assert one.offset_layout_gaussian is None
    assert one.offset_layout_map is None
    assert len(model.layout_maps()) == 2


def test_layout_grids_other_than_one_or_two_are_refused_by_name() -> None:
    with pytest.raises(ValueError, match="layout_grids"):
        GaussFT(**KWARGS, layout_grids=3)
    with pytest.raises(ValueError, match="layout_grids must be 1 or 2"):
        GaussFTModel(TINY_BACKBONE, pre_trained=False, image_size=(64, 64), layout_grids=0)
    assert GaussFT(**KWARGS, image_score="gaussian_ad").model.layout_gaussians() == []


def test_a_checkpoint_from_before_layout_grids_is_read_with_one_grid() -> None:
    """Checkpoints written before the option existed have one layout Gaussian over the whole map."""
    legacy = GaussFT(**KWARGS, layout_grids=1)
    for _ in range(3):
        legacy.model.update_statistics(torch.rand(4, 3, 64, 64))
    legacy.model.fit(quiet=True)
    legacy.eval()
    hyper_parameters = {k: v for k, v in legacy.hparams.items() if k != "layout_grids"}
    checkpoint = {"state_dict": legacy.state_dict(), "hyper_parameters": hyper_parameters}
    current = GaussFT(**KWARGS)
    assert current.model.offset_layout_gaussian is not None
    current.on_load_checkpoint(checkpoint)
    assert current.model.layout_grids == 1
    assert current.model.offset_layout_gaussian is None
    current.load_state_dict(checkpoint["state_dict"])  # strict: no second layout Gaussian expected
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        old, new = legacy.model(images), current.eval().model(images)
    torch.testing.assert_close(new.pred_score, old.pred_score)
    torch.testing.assert_close(new.anomaly_map, old.anomaly_map)


def test_the_layout_map_is_the_mean_of_the_grids_cell_maps() -> None:
    torch.manual_seed(1)
    model = GaussFT(**WIDE).model.eval()
    for _ in range(3):
        model.update_statistics(torch.rand(8, 3, 128, 128))
    model.fit(quiet=True)
    with torch.no_grad():
        features = model.extract(torch.rand(2, 3, 128, 128))
        cells = [
            layout_map(vector, gaussian)
            for layout_map, vector, gaussian in zip(
                model.layout_maps(), model.layout_samples(features), model.layout_gaussians(), strict=True
            )
        ]
        expected = model.anomaly_map_generator([(cells[0] + cells[1]) / 2], (128, 128))
        torch.testing.assert_close(model.upsampled_layout_map(features, (128, 128)), expected)
    assert F.mse_loss(cells[0], cells[1]) > 0
