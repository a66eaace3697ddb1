"""The fused anomaly map: averaged and detail maps scaled on held-out normals and maxed; the layout map's excess."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from anomalib.data import MVTecAD
from anomalib.engine import Engine

from anomalib_gaussft import GaussFT
from anomalib_gaussft.gaussft.map_fusion import PIXELS_PER_IMAGE, TAIL_QUANTILE, MapFusion
from conftest import TINY_BACKBONE

KWARGS = {"backbone": TINY_BACKBONE, "pre_trained": False, "image_size": 64}


def test_fusion_scales_each_map_to_its_held_out_median_and_tail() -> None:
    averaged, detail = torch.rand(9, 1, 20, 30) * 3 + 1, torch.randn(9, 1, 20, 30) * 0.5 + 2
    fusion = MapFusion()
    for a, d in zip(averaged.split(4), detail.split(4), strict=True):  # streamed in batches
        fusion.update(a, d)
    fusion.fit()
    constants = []
    for index, maps in enumerate((averaged, detail)):
        median, tail = np.quantile(maps.double().numpy().ravel(), [0.5, TAIL_QUANTILE])  # 600 px < the subsample
        assert float(fusion.median[index]) == pytest.approx(median, rel=1e-5)
        assert float(fusion.scale[index]) == pytest.approx(tail - median, rel=1e-5)
        constants.append((median, tail - median))
    new_a, new_d = torch.rand(2, 1, 20, 30), torch.rand(2, 1, 20, 30) * 4
    expected = np.maximum(
        (new_a.numpy() - constants[0][0]) / constants[0][1], (new_d.numpy() - constants[1][0]) / constants[1][1]
    )
    np.testing.assert_allclose(fusion(new_a, new_d).numpy(), expected, rtol=1e-4, atol=1e-5)


def test_fusion_subsamples_large_maps_evenly() -> None:
    """Large maps keep a strided sample of about PIXELS_PER_IMAGE pixels each; its quantiles stay close."""
    torch.manual_seed(0)
    maps = torch.rand(6, 1, 256, 256)
    fusion = MapFusion()
    fusion.update(maps, maps * 2)
    assert len(fusion._pixels[0]) == 6 * PIXELS_PER_IMAGE
    fusion.fit()
    median, tail = np.quantile(maps.numpy().ravel(), [0.5, TAIL_QUANTILE])
    assert float(fusion.median[0]) == pytest.approx(median, abs=0.01)
    assert float(fusion.scale[1]) == pytest.approx(2 * (tail - median), abs=0.02)


def test_fusion_refuses_to_fit_without_maps() -> None:
    with pytest.raises(ValueError, match="at least one held-out normal map"):
        MapFusion().fit()


def test_detail_levels_default_to_the_finest_map_level_of_an_averaged_map() -> None:
    default = GaussFT(**KWARGS).model
    assert default.map_detail_levels == [min(default.map_levels)]
    assert default.fuses_maps
    assert list(default.detail_gaussians) == [str(min(default.map_levels))]
    assert default.layout_map is not None  # and the layout term's map, where it exceeds its held-out tail
    # nothing to add to an unaveraged map
    assert not GaussFT(**KWARGS, map_neighbourhood=1, map_layout=False).model.fuses_maps
    off = GaussFT(**KWARGS, map_detail_levels=[], map_layout=False).model
    assert not off.fuses_maps
    assert not any(key.startswith(("map_fusion", "detail_gaussians")) for key in off.state_dict())
    with pytest.raises(ValueError, match="no detail map"):
        off.detail_map({}, (64, 64))
    with pytest.raises(ValueError, match="'map_detail_levels' has invalid level"):
        GaussFT(**KWARGS, map_detail_levels=[42])


def test_detail_map_is_the_unaveraged_map_of_its_level_and_the_output_fuses_it() -> None:
    """Reference: a model whose only map level is the detail level, without the neighbourhood average, half the blur."""
    model = GaussFT(**KWARGS, map_detail_levels=[4], map_layout=False).model.eval()
    assert model.anomaly_map_generator.sigma == 4.0
    reference = GaussFT(**KWARGS, map_levels=[4], map_neighbourhood=1, sigma=2.0, map_layout=False).model.eval()
    assert not reference.fuses_maps
    reference.feature_extractor.load_state_dict(model.feature_extractor.state_dict())  # the same random backbone
    train, held_out, test = torch.rand(24, 3, 64, 64), torch.rand(6, 3, 64, 64), torch.rand(3, 3, 64, 64)
    for each in (model, reference):
        for chunk in train.split(8):
            each.update_statistics(chunk)
        each.fit()
    with torch.no_grad():
        features = model.extract(test)
        detail = model.detail_map(features, (64, 64))
        torch.testing.assert_close(detail, reference.averaged_map(reference.extract(test), (64, 64)))
        held_features = model.extract(held_out)
        held_averaged, held_detail = (
            model.averaged_map(held_features, (64, 64)),
            model.detail_map(held_features, (64, 64)),
        )
        model.map_fusion.update(held_averaged, held_detail)
        model.map_fusion.fit()
        averaged = model.averaged_map(features, (64, 64))
        scaled = []
        for test_map, held_map in ((averaged, held_averaged), (detail, held_detail)):
            median, tail = np.quantile(held_map.double().numpy().ravel(), [0.5, TAIL_QUANTILE])
            scaled.append((test_map - median) / (tail - median))
        expected = torch.maximum(*scaled).float()
        torch.testing.assert_close(model(test).anomaly_map, expected, rtol=1e-4, atol=1e-4)


def _fit(root: Path, tmp_path: Path, **kwargs) -> GaussFT:
    torch.manual_seed(0)  # the same random backbone for every call
    model = GaussFT(**KWARGS, fine_tune_epochs=0, held_out_fraction=0.25, **kwargs)
    datamodule = MVTecAD(root=root, category="brick", train_batch_size=8, eval_batch_size=8, num_workers=0)
    Engine(default_root_dir=tmp_path, logger=False, enable_progress_bar=False).fit(model=model, datamodule=datamodule)
    return model.eval()


def test_fit_scales_the_fusion_on_held_out_normals_and_only_the_layout_excess_reaches_the_score(
    texture_root: Path, tmp_path: Path
) -> None:
    fused = _fit(texture_root, tmp_path / "fused")
    averaged_only = _fit(texture_root, tmp_path / "averaged", score_layout_map=False)
    plain = _fit(texture_root, tmp_path / "plain", map_detail_levels=[], map_layout=False)
    assert fused.model.score_layout_map
    assert not plain.model.score_layout_map
    assert fused.model.map_fusion.median.ne(0).all()
    assert fused.model.map_fusion.scale.ne(1).all()
    assert fused.model.map_fusion.layout_scale.ne(1).all()  # the layout map's tail, from the same held-out pass
    images = torch.rand(4, 3, 64, 64) * torch.linspace(0.2, 1.0, 4)[:, None, None, None]
    with torch.no_grad():
        fused_out, averaged_out, plain_out = fused.model(images), averaged_only.model(images), plain.model(images)
    torch.testing.assert_close(averaged_out.pred_score, plain_out.pred_score)  # the detail map never reaches it
    assert not torch.allclose(fused_out.anomaly_map, plain_out.anomaly_map)
    # The default's map term: top 1 % of the averaged map plus the layout map's excess, each on its held-out scale.
    model, fusion = fused.model, fused.model.map_fusion
    with torch.no_grad():
        features = model.extract(images)
        averaged = model.averaged_map(features, images.shape[-2:]).double().numpy()
        _, layout = model.fused_maps(features, images.shape[-2:])
        layout = layout.double().numpy()
        terms = model.score_terms(features, model.averaged_map(features, images.shape[-2:]))  # the layout term
    scaled = (averaged - float(fusion.median[0])) / float(fusion.scale[0])
    excess = np.maximum((layout - float(fusion.layout_median)) / float(fusion.layout_scale) - 1, 0)
    flat = np.sort((scaled + excess).reshape(4, -1), axis=1)[:, ::-1]
    top = flat[:, : int(np.ceil(0.01 * flat.shape[1]))].mean(1)
    mean, std = model.score_normalisation.mean.double().numpy(), model.score_normalisation.std.double().numpy()
    expected = (terms[:, 0].double().numpy() - mean[0]) / std[0] + (top - mean[1]) / std[1]
    np.testing.assert_allclose(fused_out.pred_score.double().numpy(), expected, rtol=1e-4, atol=1e-4)
    assert excess.max() > 0  # the check saw the layout excess at work
