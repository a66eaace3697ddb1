"""GaussFT model: outputs, pre-processing, clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from anomalib_gaussft import GaussFT, ModelNotFittedError
from anomalib_gaussft.gaussft.feature_extractor import UnknownBackboneError
from conftest import TINY_BACKBONE


def _fitted(size: int = 64, **kwargs) -> GaussFT:
    model = GaussFT(backbone=TINY_BACKBONE, pre_trained=False, image_size=size, **kwargs)
    for _ in range(3):
        model.model.update_statistics(torch.rand(4, 3, size, size))
    model.model.fit()
    return model.eval()


@pytest.mark.parametrize("map_gaussian", ["regional", "shared", "per_position"])
@pytest.mark.parametrize("batch_size", [1, 3])
def test_forward_shapes_and_dtypes(map_gaussian: str, batch_size: int) -> None:
    model = _fitted(map_gaussian=map_gaussian)
    with torch.no_grad():
        out = model.model(torch.rand(batch_size, 3, 64, 64))
    assert out.pred_score.shape == (batch_size,)
    assert out.anomaly_map.shape == (batch_size, 1, 64, 64)
    assert out.pred_score.dtype == out.anomaly_map.dtype == torch.float32
    assert torch.isfinite(out.pred_score).all()


def test_image_score_is_sum_of_level_mahalanobis_distances() -> None:
    model = _fitted(image_score="gaussian_ad")
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        features = model.model.extract(images)
        expected = torch.zeros(2)
        for level, gaussian in model.model.image_gaussians.items():
            pooled = features[int(level)].mean((2, 3))
            centred = (pooled - gaussian.mean[0]).double()
            cov = torch.linalg.inv(gaussian.whitening[0].double().T @ gaussian.whitening[0].double())
            expected += torch.sqrt(torch.einsum("ni,ij,nj->n", centred, torch.linalg.inv(cov), centred)).float()
        actual = model.model(images).pred_score
    torch.testing.assert_close(actual, expected, rtol=1e-3, atol=1e-3)


def test_efficientnet_has_nine_levels_and_native_preprocessing() -> None:
    model = GaussFT(backbone="tf_efficientnet_lite0", pre_trained=False)
    assert model.model.levels == list(range(9))
    resize, normalize = model.pre_processor.transform.transforms
    assert list(resize.size) == [224, 224]
    assert list(normalize.mean) == [0.5, 0.5, 0.5]
    assert GaussFT(backbone="tf_efficientnet_lite0", pre_trained=False, image_size=96).model.image_size == (96, 96)


def test_default_backbone_is_the_papers_b4_at_380() -> None:
    model = GaussFT(pre_trained=False)
    assert model.hparams.backbone == "tf_efficientnet_b4"
    assert model.model.image_size == (380, 380)


def test_other_timm_backbones_use_their_feature_levels() -> None:
    model = GaussFT(backbone="test_resnet", pre_trained=False, image_size=64)
    assert model.model.levels == list(range(len(model.model.feature_extractor.model.feature_info)))


def test_unknown_backbone_is_a_clear_error() -> None:
    with pytest.raises(UnknownBackboneError, match="not_a_net"):
        GaussFT(backbone="not_a_net", pre_trained=False)


@pytest.mark.parametrize(("kwargs", "name"), [({"levels": [0, 42]}, "levels"), ({"map_levels": [-1]}, "map_levels")])
def test_bad_level_index_names_the_parameter(kwargs: dict, name: str) -> None:
    with pytest.raises(ValueError, match=f"'{name}'"):
        GaussFT(backbone=TINY_BACKBONE, pre_trained=False, image_size=64, **kwargs)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"map_gaussian": "pixel"}, "map_gaussian"),
        ({"image_size": 0}, "image_size"),
        ({"loss_distance": "cosine"}, "loss_distance"),
        ({"loss_features": "patches"}, "loss_features"),
        ({"map_neighbourhood": 2}, "map_neighbourhood"),
        ({"fine_tune_epochs": -1}, "fine_tune_epochs"),
        ({"held_out_fraction": 1.0}, "held_out_fraction"),
        ({"held_out_fraction": 0.0}, "held_out_fraction"),
        ({"learning_rate": -1e-3}, "learning_rate"),
        ({"false_alarm_rate": 1.5}, "false_alarm_rate"),
    ],
)
def test_bad_config_values_name_the_parameter(kwargs: dict, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        GaussFT(backbone=TINY_BACKBONE, pre_trained=False, **kwargs)


def test_default_test_metrics_are_anomalibs_and_aupro_is_opt_in() -> None:
    # anomalib's benchmark pipeline builds one table from every job's test results: GaussFT's keys must be
    # the stock models' (PaDiM, PatchCore, DFM) unless AUPRO is asked for.
    from anomalib.models.components import AnomalibModule

    stock = [metric.name for metric in AnomalibModule.configure_evaluator().test_metrics]
    default = GaussFT(backbone=TINY_BACKBONE, pre_trained=False, image_size=64)
    assert [metric.name for metric in default.evaluator.test_metrics] == stock
    with_aupro = GaussFT(backbone=TINY_BACKBONE, pre_trained=False, image_size=64, pixel_aupro=True)
    assert [metric.name for metric in with_aupro.evaluator.test_metrics] == [*stock, "pixel_AUPRO"]
    assert with_aupro.hparams.pixel_aupro is True


def test_predict_before_fit_is_a_clear_error() -> None:
    model = GaussFT(backbone=TINY_BACKBONE, pre_trained=False, image_size=64).eval()
    with pytest.raises(ModelNotFittedError, match="not fitted"):
        model(torch.rand(1, 3, 64, 64))


def test_empty_training_set_is_a_clear_error() -> None:
    model = GaussFT(backbone=TINY_BACKBONE, pre_trained=False, image_size=64)
    with pytest.raises(RuntimeError, match="empty"):
        model.model.fit()


def test_per_position_rejects_another_input_size() -> None:
    model = _fitted(map_gaussian="per_position")
    with pytest.raises(ValueError, match="fitted size"):
        model.model(torch.rand(1, 3, 96, 96))


def test_statistics_survive_a_weights_only_checkpoint(tmp_path) -> None:
    model = _fitted()
    path = tmp_path / "state.pt"
    torch.save(model.state_dict(), path)
    restored = GaussFT(backbone=TINY_BACKBONE, pre_trained=False, image_size=64)
    restored.load_state_dict(torch.load(path, weights_only=True))
    restored.eval()
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(restored.model(images).pred_score, model.model(images).pred_score, rtol=0, atol=0)


def test_local_weights_file_loads_by_name_and_by_position(tmp_path) -> None:
    source = GaussFT(backbone=TINY_BACKBONE, pre_trained=False, image_size=64).model.feature_extractor.model
    state = source.state_dict()
    by_name, renamed = tmp_path / "timm.pth", tmp_path / "other_impl.pth"
    torch.save(state, by_name)
    torch.save({f"_other.{i}": v for i, v in enumerate(state.values())} | {"_fc.weight": torch.zeros(3, 2)}, renamed)
    for path in (by_name, renamed):
        model = GaussFT(backbone=TINY_BACKBONE, pre_trained=False, image_size=64, backbone_weights=str(path))
        assert model.model.feature_extractor.weights_pending  # loaded when first needed (fit or first use)
        model.model.feature_extractor.ensure_weights()
        loaded = model.model.feature_extractor.model.state_dict()
        assert all(torch.equal(loaded[k], v) for k, v in state.items())


def test_local_weights_of_another_architecture_are_rejected(tmp_path) -> None:
    path = tmp_path / "wrong.pth"
    torch.save({f"w{i}": torch.zeros(i + 1) for i in range(500)}, path)
    model = GaussFT(backbone=TINY_BACKBONE, pre_trained=False, image_size=64, backbone_weights=str(path))
    with pytest.raises(ValueError, match=r"wrong\.pth"):
        model.model.feature_extractor.ensure_weights()
    missing = GaussFT(
        backbone=TINY_BACKBONE, pre_trained=False, image_size=64, backbone_weights=str(tmp_path / "no.pth")
    )
    with pytest.raises(FileNotFoundError, match=r"no\.pth"):
        missing.model.feature_extractor.ensure_weights()


def test_a_checkpoint_supplies_the_weights_so_none_are_loaded(tmp_path) -> None:
    """A model restored from a checkpoint needs neither the hub nor the training machine's weights file."""
    fitted = _fitted()
    restored = GaussFT(
        backbone=TINY_BACKBONE, pre_trained=True, image_size=64, backbone_weights=str(tmp_path / "gone.pth")
    )
    restored.load_state_dict(fitted.state_dict())
    assert not restored.model.feature_extractor.weights_pending
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(restored.eval().model(images).pred_score, fitted.model(images).pred_score)


def test_missing_hub_weights_fail_at_once_and_name_the_fixes() -> None:
    import time

    from anomalib_gaussft.gaussft.feature_extractor import WeightsUnavailableError

    model = GaussFT()  # the paper's B4, whose weights are not in the offline cache the tests use
    start = time.perf_counter()
    with pytest.raises(WeightsUnavailableError) as error:
        model.model.feature_extractor.ensure_weights()
    assert time.perf_counter() - start < 10
    message = str(error.value)
    assert "tf_efficientnet_b4" in message
    assert "--model.backbone_weights" in message
    assert "--model.pre_trained false" in message
    assert len(message.splitlines()) <= 3


def test_checkpoint_architecture_is_adopted_for_inference(tmp_path) -> None:
    model = _fitted()
    checkpoint = {"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams)}
    other = GaussFT(backbone=TINY_BACKBONE, pre_trained=False, image_size=96, map_gaussian="per_position")
    other.on_load_checkpoint(checkpoint)  # no trainer fitting: the checkpoint's architecture is taken
    assert other.hparams.map_gaussian == "regional"
    assert other.model.image_size == (64, 64)
    assert list(other.pre_processor.transform.transforms[0].size) == [64, 64]
    other.load_state_dict(checkpoint["state_dict"])
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(other.eval().model(images).pred_score, model.model(images).pred_score)
    same = GaussFT(backbone=TINY_BACKBONE, pre_trained=False, image_size=64)
    same.on_load_checkpoint(checkpoint)  # no error


def test_resuming_a_checkpoint_of_another_configuration_is_refused() -> None:
    from types import SimpleNamespace

    from lightning.pytorch.trainer.states import TrainerFn

    model = _fitted()
    checkpoint = {"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams)}
    other = GaussFT(backbone=TINY_BACKBONE, pre_trained=False, image_size=64, map_neighbourhood=5)
    other._trainer = SimpleNamespace(state=SimpleNamespace(fn=TrainerFn.FITTING))  # a fit resuming from it
    with pytest.raises(ValueError, match=r"Cannot resume.*map_neighbourhood: checkpoint 3 vs model 5"):
        other.on_load_checkpoint(checkpoint)


def test_a_checkpoint_from_before_map_neighbourhood_is_read_with_no_neighbourhood_average() -> None:
    """Checkpoints written before the option existed were fitted on unaveraged map features."""
    legacy = _fitted(map_neighbourhood=1, map_layout=False)
    later_keys = ("map_neighbourhood", "map_detail_levels", "map_layout")  # options added after such checkpoints
    hyper_parameters = {k: v for k, v in legacy.hparams.items() if k not in later_keys}
    checkpoint = {"state_dict": legacy.state_dict(), "hyper_parameters": hyper_parameters}
    current = GaussFT(backbone=TINY_BACKBONE, pre_trained=False, image_size=64)
    assert current.hparams.map_neighbourhood == 3
    current.on_load_checkpoint(checkpoint)
    assert current.model.map_neighbourhood == 1
    current.load_state_dict(checkpoint["state_dict"])
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(current.eval().model(images).anomaly_map, legacy.model(images).anomaly_map)


def test_a_checkpoint_with_the_combined_score_keeps_it() -> None:
    """A model saved with ``image_score: combined`` (3 z-scored terms) loads into the default (2 terms) as combined."""
    old = _fitted(image_score="combined")
    old.model.score_normalisation.fit(torch.rand(5, 3) * torch.tensor([100.0, 1.0, 10.0]))
    checkpoint = {"state_dict": old.state_dict(), "hyper_parameters": dict(old.hparams)}
    current = GaussFT(backbone=TINY_BACKBONE, pre_trained=False, image_size=64)
    assert current.model.score_normalisation.mean.shape == (2,)  # local: layout, map top
    current.on_load_checkpoint(checkpoint)
    assert current.model.image_score.value == "combined"
    current.load_state_dict(checkpoint["state_dict"])
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(current.eval().model(images).pred_score, old.model(images).pred_score)


def test_the_config_file_lists_every_option_with_its_default() -> None:
    import inspect

    import yaml

    config = yaml.safe_load((Path(__file__).resolve().parents[1] / "configs" / "gaussft.yaml").read_text())
    listed = config["model"]["init_args"]
    components = {"pre_processor", "post_processor", "evaluator", "visualizer"}
    parameters = {
        k: v for k, v in inspect.signature(GaussFT.__init__).parameters.items() if k not in {"self", *components}
    }
    assert set(listed) == set(parameters)
    for name, parameter in parameters.items():
        default = list(parameter.default) if isinstance(parameter.default, tuple) else parameter.default
        assert listed[name] == default, name


def test_a_checkpoint_from_before_map_detail_levels_is_read_without_a_fused_map() -> None:
    """Checkpoints written before the option existed have no detail Gaussians: their map is the averaged one."""
    legacy = _fitted(map_detail_levels=[], map_layout=False)  # map_layout came later still
    hyper_parameters = {k: v for k, v in legacy.hparams.items() if k not in ("map_detail_levels", "map_layout")}
    checkpoint = {"state_dict": legacy.state_dict(), "hyper_parameters": hyper_parameters}
    current = GaussFT(backbone=TINY_BACKBONE, pre_trained=False, image_size=64)
    assert current.model.fuses_maps
    current.on_load_checkpoint(checkpoint)
    assert not current.model.fuses_maps
    current.load_state_dict(checkpoint["state_dict"])  # strict: no detail Gaussians or fusion constants expected
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(current.eval().model(images).anomaly_map, legacy.model(images).anomaly_map)


def test_a_checkpoint_from_before_map_layout_is_read_without_the_layout_map() -> None:
    """Checkpoints written before the option existed have no layout map or its fusion constants."""
    legacy = _fitted(map_layout=False)
    legacy.model.map_fusion.update(torch.rand(2, 1, 64, 64), torch.rand(2, 1, 64, 64))
    legacy.model.map_fusion.fit()
    hyper_parameters = {k: v for k, v in legacy.hparams.items() if k != "map_layout"}
    checkpoint = {"state_dict": legacy.state_dict(), "hyper_parameters": hyper_parameters}
    current = GaussFT(backbone=TINY_BACKBONE, pre_trained=False, image_size=64)
    assert current.model.layout_map is not None
    current.on_load_checkpoint(checkpoint)
    assert current.model.layout_map is None
    current.load_state_dict(checkpoint["state_dict"])  # strict: no layout whitening or layout constants expected
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(current.eval().model(images).anomaly_map, legacy.model(images).anomaly_map)


def test_a_checkpoint_from_before_score_layout_map_scores_with_the_averaged_map_alone() -> None:
    """Checkpoints written before the option existed z-scored the top of the averaged map, without the layout map."""
    legacy = _fitted(score_layout_map=False)
    fusion = legacy.model.map_fusion
    fusion.update(torch.rand(2, 1, 64, 64), torch.rand(2, 1, 64, 64), torch.rand(2, 1, 64, 64) * 1e-3)
    fusion.fit()  # a tight layout tail: every test image's layout map exceeds it
    hyper_parameters = {k: v for k, v in legacy.hparams.items() if k != "score_layout_map"}
    checkpoint = {"state_dict": legacy.state_dict(), "hyper_parameters": hyper_parameters}
    current = GaussFT(backbone=TINY_BACKBONE, pre_trained=False, image_size=64)
    assert current.model.score_layout_map
    current.on_load_checkpoint(checkpoint)
    assert not current.model.score_layout_map
    current.load_state_dict(checkpoint["state_dict"])
    reading = GaussFT(backbone=TINY_BACKBONE, pre_trained=False, image_size=64)  # the same state, read as today's
    reading.load_state_dict(checkpoint["state_dict"])
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(current.eval().model(images).pred_score, legacy.model(images).pred_score)
        assert not torch.allclose(reading.eval().model(images).pred_score, legacy.model(images).pred_score)


def test_score_layout_map_needs_a_layout_map() -> None:
    kwargs = {"backbone": TINY_BACKBONE, "pre_trained": False, "image_size": 64}
    assert GaussFT(**kwargs).model.score_layout_map
    assert not GaussFT(**kwargs, map_layout=False).model.score_layout_map
    with pytest.raises(ValueError, match="score_layout_map=True needs the layout map"):
        GaussFT(**kwargs, map_layout=False, score_layout_map=True)
    with pytest.raises(ValueError, match="score_layout_map"):
        GaussFT(**kwargs, score_layout_map="yes")
