"""Local evidence: regional map Gaussians, the layout term, the z-scored "local" image score, its held-out fit."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from anomalib.data import MVTecAD
from anomalib.engine import Engine
from anomalib.models.components import GaussianBlur2d
from anomalib.models.components.filters.blur import compute_kernel_size
from sklearn.covariance import LedoitWolf

from anomalib_gaussft import GaussFT
from anomalib_gaussft.gaussft.anomaly_map import AnomalyMapGenerator
from anomalib_gaussft.gaussft.gaussian import StreamingGaussian
from anomalib_gaussft.gaussft.held_out import held_out_split
from anomalib_gaussft.gaussft.image_score import top_fraction_mean
from anomalib_gaussft.gaussft.regions import region_grid, region_index
from conftest import TINY_BACKBONE


def test_region_index_tiles_the_map_in_near_equal_blocks() -> None:
    index = region_index(10, 7, region_grid(10, 7, 3)).view(10, 7)
    assert index.unique().tolist() == list(range(9))
    assert index[0, 0] == 0
    assert index[9, 6] == 8
    sizes = torch.bincount(index.flatten())
    assert sizes.max() - sizes.min() <= 7  # rows 3/3/4 × cols 2/2/3
    assert (index.diff(dim=0) >= 0).all()
    assert (index.diff(dim=1) >= 0).all()
    assert region_grid(2, 9, 7) == (2, 7)  # never more regions than positions


def test_grouped_gaussian_matches_sklearn_per_region() -> None:
    h, w, dim = 5, 6, 3
    grid = region_grid(h, w, 2)
    index = region_index(h, w, grid)
    samples = torch.randn(30, h * w, dim, dtype=torch.float64) * 2 + 50
    gaussian = StreamingGaussian(grid[0] * grid[1], dim)
    for chunk in samples.split(7):
        gaussian.update(chunk, group_index=index)
    estimate = gaussian.fit()
    distances = gaussian.squared_mahalanobis(samples[:2].float(), group_index=index)
    for region in range(4):
        members = samples[:, index == region].reshape(-1, dim).numpy()
        reference = LedoitWolf().fit(members)
        np.testing.assert_allclose(estimate["covariance"][region].numpy(), reference.covariance_, atol=1e-9)
        position = int((index == region).nonzero()[0, 0])
        centred = samples[0, position].numpy() - reference.location_
        expected = centred @ np.linalg.inv(reference.covariance_) @ centred
        assert float(distances[0, position]) == pytest.approx(expected, rel=1e-3)


def test_matrix_blur_equals_anomalibs_gaussian_blur() -> None:
    kernel = compute_kernel_size(4.0)
    reference_blur = GaussianBlur2d(kernel_size=(kernel, kernel), sigma=(4.0, 4.0), channels=1)
    generator = AnomalyMapGenerator(sigma=4.0, image_size=(64, 48))
    for size in ((64, 48), (40, 72)):  # the fitted size (buffers) and another (built when needed)
        maps = torch.rand(2, 1, *size) * 3
        torch.testing.assert_close(generator.blur(maps), reference_blur(maps), atol=1e-5, rtol=1e-5)


def test_top_fraction_mean_is_the_mean_of_the_largest_values() -> None:
    maps = torch.rand(3, 1, 20, 30)
    k = math.ceil(0.01 * 600)
    expected = np.sort(maps.flatten(1).numpy(), axis=1)[:, -k:].mean(1)
    np.testing.assert_allclose(top_fraction_mean(maps).numpy(), expected, rtol=1e-6)


def _adaptive_pool_reference(features: np.ndarray, grid: int) -> np.ndarray:
    """Adaptive average pooling written out: bin i spans [⌊i·h/g⌋, ⌈(i+1)·h/g⌉)."""
    n, c, h, w = features.shape
    out = np.zeros((n, c, grid, grid))
    for i in range(grid):
        for j in range(grid):
            rows = slice(i * h // grid, -(-(i + 1) * h // grid))
            cols = slice(j * w // grid, -(-(j + 1) * w // grid))
            out[:, :, i, j] = features[:, :, rows, cols].mean(axis=(2, 3))
    return out.reshape(n, -1)


def _mahalanobis_reference(train: np.ndarray, samples: np.ndarray) -> np.ndarray:
    """Distances of ``samples`` to sklearn's Ledoit-Wolf Gaussian of ``train`` (both ``(N, D)``)."""
    reference = LedoitWolf().fit(train)
    centred = samples - reference.location_
    return np.sqrt(np.einsum("ni,ij,nj->n", centred, np.linalg.inv(reference.covariance_), centred))


@pytest.mark.parametrize("image_score", ["local", "combined"])
def test_normalised_score_is_the_sum_of_its_z_scored_terms(image_score: str) -> None:
    """local: layout + map top; combined: the paper's pooled score (Σ of per-level distances) before them."""
    model = GaussFT(backbone=TINY_BACKBONE, pre_trained=False, image_size=64, image_score=image_score).model.eval()
    assert model.image_score.value == image_score
    train, held_out, test = torch.rand(40, 3, 64, 64), torch.rand(8, 3, 64, 64), torch.rand(3, 3, 64, 64)
    for chunk in train.split(10):
        model.update_statistics(chunk)
    model.fit()
    with torch.no_grad():
        train_features = model.extract(train)
        layout_train = _adaptive_pool_reference(train_features[model.layout_level].double().numpy(), 3)
        pooled_train = {lvl: train_features[lvl].double().mean((2, 3)).numpy() for lvl in model.levels}

        def terms(images: torch.Tensor) -> np.ndarray:
            features = model.extract(images)
            vectors = _adaptive_pool_reference(features[model.layout_level].double().numpy(), 3)
            layout = _mahalanobis_reference(layout_train, vectors)
            anomaly_map = model.averaged_map(features, images.shape[-2:]).double().numpy()
            # plus the layout map's excess over its tail (fusion not fitted here: tail at 1, the map's own units)
            _, layout_map = model.fused_maps(features, images.shape[-2:])
            anomaly_map = anomaly_map + np.maximum(layout_map.double().numpy() - 1, 0)
            top = np.sort(anomaly_map.reshape(len(images), -1), axis=1)[:, -math.ceil(0.01 * 64 * 64) :].mean(1)
            if image_score == "local":
                return np.stack([layout, top], axis=1)
            pooled = sum(
                _mahalanobis_reference(pooled_train[lvl], features[lvl].double().mean((2, 3)).numpy())
                for lvl in model.levels
            )
            return np.stack([pooled, layout, top], axis=1)

        normal_terms = terms(held_out)
        model.score_normalisation.fit(torch.from_numpy(normal_terms))
        mean, std = normal_terms.mean(0), normal_terms.std(0, ddof=1)
        expected = ((terms(test) - mean) / std).sum(1)
        actual = model(test).pred_score.double().numpy()
    np.testing.assert_allclose(actual, expected, rtol=2e-3, atol=2e-3)


def _datamodule(root: Path) -> MVTecAD:
    return MVTecAD(root=root, category="brick", train_batch_size=8, eval_batch_size=8, num_workers=0)


def _train_images(datamodule: MVTecAD) -> tuple[list[str], torch.Tensor]:
    datamodule.setup()
    dataset = datamodule.train_data
    paths = [str(dataset[i].image_path) for i in range(len(dataset))]
    return paths, torch.stack([dataset[i].image for i in range(len(dataset))])


@pytest.mark.parametrize("false_alarm_rate", [None, 0.2])
def test_held_out_normals_fix_the_normalisation_then_join_the_fit(
    texture_root: Path, tmp_path: Path, false_alarm_rate: float | None
) -> None:
    """Fit on 80 %, z constants from the held-out 20 %, then refit on all (not with calibration: split conformal)."""
    kwargs = {"backbone": TINY_BACKBONE, "pre_trained": False, "image_size": 64, "fine_tune_epochs": 0}
    model = GaussFT(**kwargs, false_alarm_rate=false_alarm_rate, held_out_fraction=0.25)
    datamodule = _datamodule(texture_root)
    Engine(default_root_dir=tmp_path, logger=False, enable_progress_bar=False).fit(model=model, datamodule=datamodule)
    paths, images = _train_images(datamodule)
    fit_indices, held_indices = held_out_split(paths, 0.25, seed=0)

    reference = GaussFT(**kwargs).model.eval()
    reference.load_state_dict(model.model.state_dict())
    preprocess = model.pre_processor.transform
    with torch.no_grad():
        held = preprocess(images[held_indices])
        features = reference.extract(held)
        # Without calibration the final Gaussians saw every training image; with it the held-out normals stay out.
        fitted = images if false_alarm_rate is None else images[fit_indices]
        reference.reset_statistics()
        reference.update_statistics(preprocess(fitted))
        reference.fit()
        torch.testing.assert_close(reference.state_dict(), model.model.state_dict(), atol=1e-4, rtol=1e-4)
        if false_alarm_rate is not None:  # the normalisation came from these same Gaussians
            size = held.shape[-2:]
            _, layout = reference.fused_maps(features, size)  # on the fusion scale fitted from these same images
            terms = reference.score_terms(features, reference.averaged_map(features, size), None, layout)
            torch.testing.assert_close(model.model.score_normalisation.mean, terms.mean(0), atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(model.model.score_normalisation.std, terms.std(0), atol=1e-4, rtol=1e-4)
    assert model.model.score_normalisation.std.gt(0).all()


def test_too_few_images_fit_all_with_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from data_generators import make_texture_dataset

    make_texture_dataset(
        tmp_path / "data", textures=("brick",), image_size=64, n_train=3, n_test_good=2, n_test_defect=2
    )
    model = GaussFT(backbone=TINY_BACKBONE, pre_trained=False, image_size=64, fine_tune_epochs=0)
    with caplog.at_level(logging.WARNING):
        engine = Engine(default_root_dir=tmp_path, logger=False, enable_progress_bar=False)
        engine.fit(model=model, datamodule=_datamodule(tmp_path / "data"))
    assert "Too few training images to hold out normals" in caplog.text
    assert model.model.score_normalisation.mean.tolist() == [0.0, 0.0]  # unnormalised sum of the 2 terms
    assert int(model.model.map_gaussians["3"].num_samples) > 0  # every image was fitted
    with torch.no_grad():
        assert torch.isfinite(model.model(torch.rand(2, 3, 64, 64)).pred_score).all()


def _statistics_bytes(module: torch.nn.Module) -> int:
    """Bytes of the fitted state outside the backbone (benchmarks' ``stats_mb``)."""
    state = module.state_dict().items()
    return sum(t.numel() * t.element_size() for key, t in state if not key.startswith("feature_extractor."))


def test_default_statistics_stay_under_a_fifth_of_padims() -> None:
    """#14's budget at the benchmark setting (lite0, 224 px): GaussFT's default statistics ≤ 1/5 of PaDiM's."""
    from anomalib.models.image.padim.torch_model import PadimModel

    images = torch.rand(2, 3, 224, 224)
    gaussft = GaussFT(backbone="tf_efficientnet_lite0", pre_trained=False, image_size=224).model
    gaussft.update_statistics(images)
    gaussft.fit(quiet=True)
    padim = PadimModel(
        backbone="tf_efficientnet_lite0", layers=["blocks.1", "blocks.2", "blocks.4"], pre_trained=False, n_features=100
    ).train()
    padim.gaussian.fit(padim(images))
    ours, theirs = _statistics_bytes(gaussft), _statistics_bytes(padim)
    assert theirs > 100 * 2**20  # PaDiM: 100 × 100 inverse covariances at each of the 56 × 56 positions
    assert ours <= theirs / 5, f"GaussFT {ours / 2**20:.1f} MiB vs PaDiM {theirs / 2**20:.1f} MiB"
