"""Streaming Gaussian statistics against sklearn and direct computations."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.covariance import LedoitWolf

from anomalib_gaussft.gaussft.gaussian import StreamingGaussian


def _fit(data: torch.Tensor, batches: int = 1) -> tuple[StreamingGaussian, dict[str, torch.Tensor]]:
    gaussian = StreamingGaussian(groups=data.shape[1], dim=data.shape[2])
    for chunk in torch.tensor_split(data, batches):
        gaussian.update(chunk)
    return gaussian, gaussian.fit()


@pytest.mark.parametrize(("n", "d"), [(200, 8), (30, 50), (5, 12)])
def test_ledoit_wolf_matches_sklearn(n: int, d: int) -> None:
    rng = np.random.default_rng(n + d)
    x = rng.normal(size=(n, d)) @ rng.normal(size=(d, d)) + 3.0
    _, est = _fit(torch.from_numpy(x)[:, None, :])
    reference = LedoitWolf().fit(x)
    np.testing.assert_allclose(est["covariance"][0].numpy(), reference.covariance_, rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(est["shrinkage"][0].item(), reference.shrinkage_, rtol=1e-8, atol=1e-12)
    np.testing.assert_allclose(est["mean"][0].numpy(), reference.location_, rtol=1e-10)


def test_streaming_equals_one_shot() -> None:
    data = torch.randn(97, 3, 10, dtype=torch.float64) * 5 + 100.0
    _, one = _fit(data, batches=1)
    _, many = _fit(data, batches=13)
    for key in ("mean", "covariance", "shrinkage"):
        torch.testing.assert_close(one[key], many[key], rtol=1e-9, atol=1e-9)


def test_per_group_gaussians_are_independent() -> None:
    data = torch.randn(60, 4, 6, dtype=torch.float64)
    data[:, 2] *= 10
    _, joint = _fit(data)
    _, single = _fit(data[:, 2:3])
    torch.testing.assert_close(joint["covariance"][2], single["covariance"][0])


def test_mahalanobis_matches_direct_computation() -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(size=(300, 7)) @ rng.normal(size=(7, 7))
    gaussian, est = _fit(torch.from_numpy(x)[:, None, :].float())
    queries = torch.randn(20, 1, 7)
    inv = np.linalg.inv(est["covariance"][0].numpy())
    centred = queries[:, 0].double().numpy() - est["mean"][0].numpy()
    expected = np.einsum("ni,ij,nj->n", centred, inv, centred)
    actual = gaussian.squared_mahalanobis(queries)[:, 0].double().numpy()
    np.testing.assert_allclose(actual, expected, rtol=1e-4)


def test_fewer_samples_than_dimensions_gives_finite_scores() -> None:
    gaussian, est = _fit(torch.randn(4, 1, 64))
    assert 0 < est["shrinkage"].item() <= 1
    scores = gaussian.squared_mahalanobis(torch.randn(10, 1, 64))
    assert torch.isfinite(scores).all()
    assert (scores > 0).all()


def test_constant_features_get_a_ridge_not_nan() -> None:
    data = torch.ones(10, 1, 5)  # identical training images: zero covariance
    gaussian, est = _fit(data)
    assert est["ridge"].item() > 0
    assert torch.isfinite(gaussian.whitening).all()
    assert torch.isfinite(gaussian.squared_mahalanobis(data)).all()
    data[:, 0, 0] = torch.arange(10.0)  # one varying feature, four constant: shrinkage alone suffices
    gaussian, est = _fit(data)
    assert torch.isfinite(gaussian.whitening).all()
    assert torch.isfinite(gaussian.squared_mahalanobis(data)).all()


def test_too_few_samples_and_non_finite_input_are_errors() -> None:
    gaussian = StreamingGaussian(1, 3)
    with pytest.raises(RuntimeError, match="empty"):
        gaussian.fit()
    gaussian.update(torch.randn(1, 1, 3))
    with pytest.raises(ValueError, match="at least 2"):
        gaussian.fit()
    with pytest.raises(FloatingPointError, match="NaN"):
        gaussian.update(torch.full((2, 1, 3), float("nan")))
    with pytest.raises(ValueError, match="shape"):
        gaussian.update(torch.randn(2, 3))


def test_moments_merge_across_shifts_like_one_process() -> None:
    """What DDP does: two processes with different shifts, re-expressed about a common one, then summed."""
    data = torch.randn(80, 2, 6, dtype=torch.float64) * 3 + 50.0
    _, one = _fit(data)
    parts = [StreamingGaussian(2, 6), StreamingGaussian(2, 6)]
    parts[0].update(data[:30])
    parts[1].update(data[30:] + 0)  # its own shift
    common = (parts[0].accumulators()["shift"] + parts[1].accumulators()["shift"]) / 2
    for part in parts:
        part.shift_to(common)
    merged = parts[0].accumulators()
    for key, value in parts[1].accumulators().items():
        if key != "shift":
            merged[key] += value
    est = parts[0].fit()
    for key in ("mean", "covariance", "shrinkage"):
        torch.testing.assert_close(one[key], est[key], rtol=1e-9, atol=1e-9)
