"""The layout term as a map: per-cell conditional Mahalanobis distances, added to the heatmap above their tail."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from anomalib_gaussft import GaussFT
from anomalib_gaussft.gaussft.feature_samples import LAYOUT_GRID
from anomalib_gaussft.gaussft.gaussian import StreamingGaussian
from anomalib_gaussft.gaussft.layout_map import CELLS, LayoutMap
from anomalib_gaussft.gaussft.map_fusion import TAIL_QUANTILE, MapFusion
from conftest import TINY_BACKBONE

KWARGS = {"backbone": TINY_BACKBONE, "pre_trained": False, "image_size": 64}


def _conditional_reference(x: np.ndarray, mean: np.ndarray, covariance: np.ndarray, channels: int) -> np.ndarray:
    """``sqrt(d²/C)`` of each cell given the other cells, from the conditional Gaussian written out (``(N, 9)``)."""
    dim = covariance.shape[0]
    out = np.zeros((len(x), CELLS))
    for j in range(CELLS):
        cell = np.arange(j, dim, CELLS)  # channel-major layout vector: entry c · 9 + j
        rest = np.setdiff1d(np.arange(dim), cell)
        gain = covariance[np.ix_(cell, rest)] @ np.linalg.inv(covariance[np.ix_(rest, rest)])
        conditional_cov = covariance[np.ix_(cell, cell)] - gain @ covariance[np.ix_(rest, cell)]
        residual = (x[:, cell] - mean[cell]) - (x[:, rest] - mean[rest]) @ gain.T
        squared = np.einsum("ni,ij,nj->n", residual, np.linalg.inv(conditional_cov), residual)
        out[:, j] = np.sqrt(squared / channels)
    return out


def test_cell_map_matches_the_conditional_gaussian_of_each_cell() -> None:
    channels = 3
    dim = channels * CELLS
    generator = torch.Generator().manual_seed(0)
    mixing = torch.randn(dim, dim, generator=generator) / dim**0.5  # correlated cells
    train = torch.randn(400, dim, generator=generator) @ mixing + 2.0
    gaussian = StreamingGaussian(1, dim)
    gaussian.update(train[:, None])
    estimate = gaussian.fit()
    layout_map = LayoutMap(channels)
    layout_map.fit(gaussian)
    test = torch.randn(5, dim, generator=generator) @ mixing * 3 + 2.0
    cells = layout_map(test[:, None], gaussian)
    assert cells.shape == (5, 1, LAYOUT_GRID, LAYOUT_GRID)
    expected = _conditional_reference(
        test.double().numpy(), estimate["mean"][0].numpy(), estimate["covariance"][0].numpy(), channels
    )
    np.testing.assert_allclose(cells.reshape(5, CELLS).double().numpy(), expected, rtol=2e-3, atol=1e-4)


def test_the_layout_map_adds_only_its_excess_over_its_held_out_tail() -> None:
    generator = torch.Generator().manual_seed(1)
    held = [torch.rand(6, 1, 16, 16, generator=generator) * k for k in (1.0, 2.0, 3.0)]
    fusion = MapFusion(detail=True, layout=True)
    fusion.update(*held)
    fusion.fit()
    assert fusion.names == ["averaged", "detail", "layout"]
    averaged, detail = torch.rand(2, 1, 16, 16, generator=generator), torch.rand(2, 1, 16, 16, generator=generator)
    without = MapFusion(detail=True)
    without.median.copy_(fusion.median)
    without.scale.copy_(fusion.scale)
    base = without(averaged, detail)
    quiet = fusion.layout_median + 0.5 * fusion.layout_scale  # below the tail everywhere: adds nothing
    torch.testing.assert_close(fusion(averaged, detail, quiet.expand(2, 1, 16, 16)), base)
    loud = fusion.layout_median + 3.0 * fusion.layout_scale  # scaled 3: adds 2, times the image's excess weight
    weighted = base + 2.0 * fusion.excess_weight(base)  # the weight itself: the tests below
    torch.testing.assert_close(fusion(averaged, detail, loud.expand(2, 1, 16, 16)), weighted)
    with pytest.raises(ValueError, match="pass every one of these maps"):
        fusion(averaged, detail)


def test_the_layout_tail_is_a_gaussian_q99_of_the_held_out_pixels_and_the_other_maps_keep_quantiles() -> None:
    """Nine values per image make an empirical q99 noisy: the layout map's tail is ``mean + z99 · std``."""
    generator = torch.Generator().manual_seed(2)
    averaged = torch.rand(5, 1, 12, 12, generator=generator)
    detail = torch.rand(5, 1, 12, 12, generator=generator) * 2
    layout = torch.randn(5, 1, 12, 12, generator=generator).exp()  # heavy upper tail: q99 ≠ mean + 2.33 std
    fusion = MapFusion(detail=True, layout=True)
    for a, d, m in zip(averaged.split(2), detail.split(2), layout.split(2), strict=True):
        fusion.update(a, d, m)
    fusion.fit()
    values = layout.double().numpy().ravel()
    z99 = 2.3263478740  # the standard normal's 99th percentile (TAIL_QUANTILE), from a table
    assert TAIL_QUANTILE == 0.99
    assert float(fusion.layout_median) == pytest.approx(values.mean(), rel=1e-5)
    assert float(fusion.layout_scale) == pytest.approx(z99 * values.std(ddof=1), rel=1e-5)
    assert float(fusion.layout_scale) != pytest.approx(np.quantile(values, TAIL_QUANTILE) - values.mean(), rel=0.05)
    median, tail = np.quantile(detail.double().numpy().ravel(), [0.5, TAIL_QUANTILE])
    assert float(fusion.median[1]) == pytest.approx(median, rel=1e-5)
    assert float(fusion.scale[1]) == pytest.approx(tail - median, rel=1e-5)
    names = [name for name, _, _ in fusion.constants]
    assert names == ["averaged", "detail", "layout"]
    single = MapFusion(detail=False, layout=True)  # one pixel of one map: no spread to estimate, still finite
    single.update(torch.full((1, 1, 1, 1), 2.0), layout=torch.full((1, 1, 1, 1), 3.0))
    single.fit()
    assert torch.isfinite(single.layout_scale).all()
    assert float(single.layout_scale) > 0


def test_map_layout_follows_the_image_score_and_refuses_a_score_without_layout() -> None:
    assert GaussFT(**KWARGS).model.layout_map is not None
    assert GaussFT(**KWARGS, image_score="combined").model.layout_map is not None
    assert GaussFT(**KWARGS, image_score="gaussian_ad").model.layout_map is None
    assert GaussFT(**KWARGS, map_layout=False).model.layout_map is None
    with pytest.raises(ValueError, match="map_layout=True needs the layout term"):
        GaussFT(**KWARGS, image_score="gaussian_ad", map_layout=True)
    with pytest.raises(ValueError, match="map_layout"):
        GaussFT(**KWARGS, map_layout="yes")


def test_a_fitted_model_lifts_an_out_of_layout_region_in_its_heatmap() -> None:
    """A fitted model's layout map fires on an image whose coarse layout is off, and the heatmap carries it."""
    torch.manual_seed(0)
    model = GaussFT(**KWARGS).model.eval()
    for _ in range(4):
        model.update_statistics(torch.rand(8, 3, 64, 64) * 0.2 + 0.4)
    model.fit()
    normal = torch.rand(4, 3, 64, 64) * 0.2 + 0.4
    with torch.no_grad():
        features = model.extract(normal)
        _, layout = model.fused_maps(features, (64, 64))
        model.map_fusion.update(model.averaged_map(features, (64, 64)), *model.fused_maps(features, (64, 64)))
        model.map_fusion.fit()
        odd = normal.clone()
        odd[:, :, :32, :32] = 1.0  # a quarter of the image saturated
        _, odd_layout = model.fused_maps(model.extract(odd), (64, 64))
    assert layout.shape == odd_layout.shape == (4, 1, 64, 64)
    assert odd_layout.amax() > layout.amax()


def _fitted_fusion(generator: torch.Generator) -> tuple[MapFusion, torch.Tensor, torch.Tensor]:
    """A fusion fitted on 7 held-out images of different brightness, and their raw averaged and detail maps."""
    brightness = torch.linspace(0.5, 2.0, 7)[:, None, None, None]
    averaged = torch.rand(7, 1, 16, 16, generator=generator) * brightness
    detail = torch.rand(7, 1, 16, 16, generator=generator) * 2 * brightness
    layout = torch.rand(7, 1, 16, 16, generator=generator)
    fusion = MapFusion(detail=True, layout=True)
    fusion.update(averaged[:4], detail[:4], layout[:4])
    fusion.update(averaged[4:], detail[4:], layout[4:])
    fusion.fit()
    return fusion, averaged, detail


def test_the_excess_weight_constants_are_the_mean_and_gaussian_q99_of_the_held_out_local_peaks() -> None:
    fusion, averaged, detail = _fitted_fusion(torch.Generator().manual_seed(3))
    median, scale = fusion.median.double().numpy(), fusion.scale.double().numpy()
    local = np.maximum(  # each held-out image's scaled local map, computed apart from the module
        (averaged.double().numpy() - median[0]) / scale[0], (detail.double().numpy() - median[1]) / scale[1]
    )
    peaks = local.reshape(7, -1).max(axis=1)
    z99 = 2.3263478740
    tail = peaks.mean() + z99 * peaks.std(ddof=1)
    assert float(fusion.layout_gate) == pytest.approx(tail, rel=1e-5)
    assert float(fusion.layout_weight_cap) == pytest.approx(tail / peaks.mean(), rel=1e-5)


def test_the_excess_weight_is_the_tail_over_the_local_peak_floored_at_the_typical_peak() -> None:
    """``τ / max(peak, μ)``: ``τ / μ`` for a quiet image, 1/4 when the local maps peak at 4 τ."""
    fusion, _, _ = _fitted_fusion(torch.Generator().manual_seed(4))
    tail = float(fusion.layout_gate)
    typical = tail / float(fusion.layout_weight_cap)
    assert 0 < typical < tail
    peaks = torch.tensor([0.5 * typical, 1.5 * typical, 4 * tail])
    local = torch.full((3, 1, 16, 16), 0.1 * typical)
    local[:, 0, 3, 3] = peaks  # each image's peak
    # raw maps whose scaled values are ``local`` (the detail map stays below it)
    averaged = local * fusion.scale[0] + fusion.median[0]
    detail = (local - 1.0) * fusion.scale[1] + fusion.median[1]
    layout = (fusion.layout_median + 3.0 * fusion.layout_scale).expand(3, 1, 16, 16)  # excess 2 everywhere
    expected = torch.tensor([tail / typical, tail / (1.5 * typical), 0.25])
    torch.testing.assert_close(fusion.excess_weight(local).flatten(), expected)
    torch.testing.assert_close(fusion(averaged, detail, layout), local + 2.0 * expected[:, None, None, None])


def test_a_checkpoint_from_before_the_excess_weight_keeps_the_whole_excess() -> None:
    fusion, averaged, detail = _fitted_fusion(torch.Generator().manual_seed(5))
    new_keys = ("layout_gate", "layout_weight_cap")
    old_state = {k: v for k, v in fusion.state_dict().items() if k not in new_keys}
    loaded = MapFusion(detail=True, layout=True)
    loaded.load_state_dict(old_state)  # strict: the missing constants are filled in, not an error
    assert torch.isinf(loaded.layout_gate).all()
    assert float(loaded.layout_weight_cap) == 1.0
    bright_averaged, bright_detail = averaged * 10, detail * 10  # local maps far above the gate
    layout = (loaded.layout_median + 3.0 * loaded.layout_scale).expand(7, 1, 16, 16)  # excess 2 everywhere
    local = torch.maximum(loaded.scaled_averaged(bright_averaged), (bright_detail - loaded.median[1]) / loaded.scale[1])
    torch.testing.assert_close(loaded(bright_averaged, bright_detail, layout), local + 2.0)
    assert (fusion(bright_averaged, bright_detail, layout) < local + 2.0).all()  # the gated fit adds less
