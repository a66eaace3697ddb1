"""Fine-tuning: the loss, what is trained, the held-out split and the forgetting-based stopping rule."""

from __future__ import annotations

import contextlib
import itertools
from pathlib import Path

import pytest
import torch
from anomalib.data import MVTecAD
from anomalib.engine import Engine
from lightning.pytorch import Callback, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint

from anomalib_gaussft import GaussFT
from anomalib_gaussft.gaussft.forgetting import ForgettingCallback
from anomalib_gaussft.gaussft.held_out import held_out_split
from anomalib_gaussft.gaussft.image_score import TERMS
from anomalib_gaussft.gaussft.loss import GaussianLoss
from conftest import TINY_BACKBONE


def _tiny(**kwargs) -> GaussFT:
    return GaussFT(backbone=TINY_BACKBONE, pre_trained=False, image_size=64, **kwargs)


def _datamodule(root: Path) -> MVTecAD:
    return MVTecAD(root=root, category="brick", train_batch_size=4, eval_batch_size=8, num_workers=0, seed=0)


def _fit_gaussians(model: GaussFT, images: torch.Tensor) -> None:
    model.model.eval()
    model.model.update_statistics(images)
    model.model.fit()


def _loss(model: GaussFT, images: torch.Tensor, folds: torch.Tensor | None = None, loss=None) -> torch.Tensor:
    """The fine-tuning loss of pre-processed images (``folds``: each image's cross-fitting fold)."""
    kind = model.hparams.loss_features
    samples = model.model.loss_samples(model.model.extract(images), kind)
    return (loss or model.loss)(samples, model.model.loss_targets(kind), folds)


def _descend(model: GaussFT, images: torch.Tensor, learning_rate: float, steps: int = 10) -> list[float]:
    """The loss over ``steps`` AdamW steps on fixed images against fixed Gaussians."""
    from anomalib_gaussft.gaussft.trainable_layers import fine_tuning_optimizer

    trainable = [p for p in model.model.parameters() if p.requires_grad]
    optimizer = fine_tuning_optimizer(trainable, learning_rate, 1e-4, "constant", total_steps=steps, epochs=1)
    losses = []
    for _ in range(steps):
        optimizer["optimizer"].zero_grad()
        loss = _loss(model, images)
        loss.backward()
        optimizer["optimizer"].step()
        losses.append(loss.item())
    return losses


def test_fine_tuning_steps_lower_the_mahalanobis_loss() -> None:
    model = _tiny(fine_tune_epochs=1, learning_rate=1e-3)
    images = torch.rand(16, 3, 64, 64)
    _fit_gaussians(model, images)
    model.model.train()
    losses = _descend(model, images, learning_rate=1e-3)
    assert losses[-1] < 0.8 * losses[0]


def test_cross_fitted_loss_scores_each_image_against_the_other_fold() -> None:
    from anomalib_gaussft.gaussft.gaussian import StreamingGaussian

    model = _tiny(fine_tune_epochs=1).eval()
    images = torch.rand(12, 3, 64, 64)
    folds = torch.tensor([0, 1] * 6)
    with torch.no_grad():
        features = model.model.extract(images)
        model.loss.update(model.model.loss_samples(features, "pooled"), folds)
        model.loss.fit()
        fold_gaussians = []
        for index in range(2):
            fitted = {}
            for level, gaussian in model.model.image_gaussians.items():
                fold_gaussian = StreamingGaussian(1, gaussian.dim)
                fold_gaussian.update(model.model.pooled(features[int(level)])[folds == index])
                fold_gaussian.fit()
                fitted[level] = fold_gaussian
            fold_gaussians.append(fitted)
        expected = 0.0
        for level, gaussian in model.model.image_gaussians.items():
            pooled = model.model.pooled(features[int(level)])
            other = torch.stack(
                [
                    fold_gaussians[1 - int(f)][level].squared_mahalanobis(pooled[i : i + 1])[0, 0]
                    for i, f in enumerate(folds)
                ]
            )
            expected += other.mean() / gaussian.dim
        actual = _loss(model, images, folds)
    assert actual.item() > 0
    torch.testing.assert_close(actual, torch.as_tensor(expected), rtol=1e-4, atol=1e-4)


def test_euclidean_center_loss_matches_a_numpy_reference() -> None:
    """The ablation loss: Σ_levels mean_i ||f_i − μ||² / (C · mean variance), no whitening."""
    model = _tiny(fine_tune_epochs=1, loss_distance="euclidean").eval()
    images = torch.rand(10, 3, 64, 64)
    _fit_gaussians(model, images)
    with torch.no_grad():
        features = model.model.extract(images)
        actual = _loss(model, images)  # no folds: against the model's own Gaussians
        mahalanobis = _loss(model, images, loss=GaussianLoss(model.loss.target_shapes, "in_sample", "mahalanobis"))
    expected = 0.0
    for level, gaussian in model.model.image_gaussians.items():
        pooled = model.model.pooled(features[int(level)])[:, 0].double().numpy()
        centred = pooled - pooled.mean(0)
        # LW-shrunk covariance keeps the trace: trace(Σ)/C is the average empirical variance.
        average_variance = (centred**2).mean(0).mean()
        expected += ((centred**2).sum(1) / average_variance).mean() / gaussian.dim
    assert abs(actual.item() - expected) < 1e-3 * expected
    assert abs(actual.item() - mahalanobis.item()) > 1e-3  # a different objective, not the paper's in disguise


def test_gradients_reach_trainable_levels_only_and_batchnorm_stays_frozen() -> None:
    model = _tiny(fine_tune_epochs=1, trainable_levels=[3, 4])
    images = torch.rand(8, 3, 64, 64)
    _fit_gaussians(model, images)
    backbone = model.model.feature_extractor.model
    running_before = {k: v.clone() for k, v in backbone.state_dict().items() if "running" in k}
    model.on_train_epoch_start()  # puts the model in train mode with frozen BatchNorm
    _loss(model, images).backward()
    for index, stage in enumerate(backbone.blocks, start=1):
        grads = [p.grad for p in stage.parameters()]
        if index in (3, 4):
            assert all(g is not None and g.abs().sum() > 0 for g in grads), f"stage {index} got no gradient"
        else:
            assert all(g is None for g in grads), f"frozen stage {index} got a gradient"
    assert backbone.conv_stem.weight.grad is None
    running_after = {k: v for k, v in backbone.state_dict().items() if "running" in k}
    assert all(torch.equal(running_before[k], running_after[k]) for k in running_before)


def test_held_out_split_is_deterministic_and_order_independent() -> None:
    paths = [f"img_{i:03d}.png" for i in range(50)]
    fit, held = held_out_split(paths, 0.2, seed=3)
    assert len(held) == 10
    assert not set(fit) & set(held)
    assert set(fit) | set(held) == set(range(50))
    reversed_paths = paths[::-1]
    _, held_r = held_out_split(reversed_paths, 0.2, seed=3)
    assert {reversed_paths[i] for i in held_r} == {paths[i] for i in held}
    assert held_out_split(paths, 0.2, seed=4)[1] != held
    with pytest.raises(ValueError, match="held_out_fraction"):
        held_out_split(paths, 1.0, seed=0)
    with pytest.raises(ValueError, match="at least 2"):
        held_out_split(paths[:3], 0.2, seed=0)


def test_monitor_keeps_best_and_stops_after_patience() -> None:
    monitor = ForgettingCallback(patience=2, pseudo_anomalies=["cutout"])
    flags = [monitor.record(e, s) for e, s in enumerate([0.5, 0.7, 0.9, 0.6, 0.95, 0.4, 0.3])]
    assert flags == [True, True, True, False, True, False, False]
    assert monitor.best_epoch == 4
    assert monitor.should_stop


class _ScriptedForgetting(ForgettingCallback):
    """Replays a crafted pseudo-AUROC sequence and snapshots the weights of every epoch."""

    sequence = (0.50, 0.60, 0.90, 0.70, 0.65, 0.99)

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.snapshots: dict[int, dict[str, torch.Tensor]] = {}

    def pseudo_anomaly_auroc(self, pl_module) -> dict[str, float]:
        real = super().pseudo_anomaly_auroc(pl_module)  # exercise the real code path too
        assert 0.0 <= real["all"] <= 1.0
        self.calls = getattr(self, "calls", 0) + 1
        return {"all": self.sequence[self.calls - 1]}

    def evaluate(self, trainer, pl_module, epoch: int, loss: float) -> None:
        self.snapshots[epoch] = {k: v.clone() for k, v in pl_module.model.feature_extractor.state_dict().items()}
        super().evaluate(trainer, pl_module, epoch, loss)


class _Scripted(GaussFT):
    """GaussFT with the scripted forgetting check; records what it trained on and how often it validated."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        h = self.hparams
        self.forgetting = _ScriptedForgetting(h.patience, h.pseudo_anomalies, h.seed, h.wise_alphas)
        self.trained_paths: list[str] = []
        self.validation_batches = 0
        self.held_out_dataset = None

    def training_step(self, batch, *args, **kwargs):
        kept = [
            str(p)
            for p, held in zip(batch.image_path, self.held_out.is_held_out(batch.image_path), strict=True)
            if not held
        ]
        self.trained_paths.extend(kept)
        return super().training_step(batch, *args, **kwargs)

    def finish_fit(self) -> None:
        self.held_out_dataset = self.held_out.dataset  # what the held-out and fit loaders read
        super().finish_fit()

    def validation_step(self, batch, *args, **kwargs):
        self.validation_batches += 1
        return super().validation_step(batch, *args, **kwargs)


@pytest.mark.slow
def test_stopping_rule_restores_the_best_epoch_and_never_trains_on_held_out(texture_root: Path, tmp_path: Path) -> None:
    seed_everything(0)
    model = _Scripted(  # the paper's rule: keep the best epoch
        backbone=TINY_BACKBONE,
        pre_trained=False,
        image_size=64,
        fine_tune_epochs=6,
        patience=2,
        wise_alphas=None,
        learning_rate=1e-2,
    )
    datamodule = _datamodule(texture_root)
    engine = Engine(default_root_dir=tmp_path, logger=False)
    engine.fit(model=model, datamodule=datamodule)

    # 0.5, 0.6, 0.9 (best, epoch 2), 0.7, 0.65 -> two epochs without improvement: stop after epoch 4.
    forgetting = model.forgetting
    assert [h["epoch"] for h in forgetting.history] == [0, 1, 2, 3, 4]
    assert all(h["loss"] > 0 for h in forgetting.history[1:]), "the loss must not be degenerate"
    assert forgetting.best_epoch == 2
    restored = model.model.feature_extractor.state_dict()
    assert all(torch.equal(restored[k], v) for k, v in forgetting.snapshots[2].items())
    assert not all(torch.equal(restored[k], v) for k, v in forgetting.snapshots[4].items())  # training did move it

    held_out = model.held_out.held_out_paths
    train_paths = {str(p) for p in datamodule.train_data.samples.image_path}
    assert held_out
    assert held_out < train_paths
    assert not held_out & set(model.trained_paths)
    assert set(model.trained_paths) == train_paths - held_out
    assert model.held_out_dataset is datamodule.train_data
    # The datamodule's validation split (here: the test split, with real anomalies) ran exactly once, after
    # the final model was fixed: it cannot have influenced the stopping decision.
    assert model.validation_batches == len(datamodule.val_dataloader())
    assert (Path(engine.trainer.default_root_dir) / "fine_tuning_curve.png").is_file()


class _ScriptedInterpolation(_Scripted):
    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        # epochs 0-2, then α = .25, .5, .75 (α = 0 and 1 reuse epochs 0 and 2): .5 and .75 tie, the smaller wins
        self.forgetting.sequence = (0.50, 0.60, 0.70, 0.65, 0.80, 0.80)


@pytest.mark.slow
def test_wise_ft_keeps_the_interpolation_with_the_best_pseudo_auroc(texture_root: Path, tmp_path: Path) -> None:
    from anomalib_gaussft.gaussft.weight_interpolation import trainable_weights

    seed_everything(0)
    model = _ScriptedInterpolation(
        backbone=TINY_BACKBONE, pre_trained=False, image_size=64, fine_tune_epochs=2, learning_rate=1e-2
    )
    Engine(default_root_dir=tmp_path, logger=False).fit(model=model, datamodule=_datamodule(texture_root))
    forgetting = model.forgetting
    assert [h["epoch"] for h in forgetting.history] == [0, 1, 2]  # no patience: the whole budget
    assert [(r["alpha"], r["pseudo_auroc"]) for r in forgetting.interpolation] == [
        (0.0, 0.5), (0.25, 0.65), (0.5, 0.8), (0.75, 0.8), (1.0, 0.7)
    ]  # fmt: skip
    assert forgetting.kept_alpha == 0.5
    kept = trainable_weights(model.model.feature_extractor)
    assert kept, "fine-tuning trained nothing"
    start, last = forgetting.snapshots[0], forgetting.snapshots[2]
    for name, value in kept.items():
        torch.testing.assert_close(value, 0.5 * start[name] + 0.5 * last[name], rtol=1e-6, atol=1e-6)
    assert any(not torch.equal(start[n], last[n]) for n in kept)  # the end points differ: a real interpolation
    assert forgetting.pretrained is None  # dropped after use (a torch export pickles the module)


def test_warmup_cosine_schedule() -> None:
    from anomalib_gaussft.gaussft.trainable_layers import warmup_cosine

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = warmup_cosine(optimizer, warmup_steps=4, total_steps=12)
    rates = []
    for _ in range(12):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert rates[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])  # linear warm-up
    assert rates[4] == pytest.approx(1.0)  # then a cosine from the peak ...
    assert rates[8] == pytest.approx(0.5)
    assert all(a > b for a, b in itertools.pairwise(rates[4:]))  # ... decreasing towards 0
    assert rates[-1] < 0.05


def test_default_trains_the_deeper_half_of_an_efficientnet() -> None:
    lite = GaussFT(backbone="tf_efficientnet_lite0", pre_trained=False, image_size=64, fine_tune_epochs=1)
    assert lite.trainable_levels == [5, 6, 7, 8]
    backbone = lite.model.feature_extractor.model
    assert not any(p.requires_grad for p in backbone.blocks[3].parameters())  # level 4
    assert all(p.requires_grad for p in backbone.blocks[4].parameters())  # level 5
    assert _tiny(fine_tune_epochs=1).trainable_levels == [4, 5, 6]  # 7-level test backbone


@pytest.mark.slow
def test_same_seed_gives_identical_scores(texture_root: Path, tmp_path: Path) -> None:
    scores = []
    for run in range(2):
        seed_everything(0)
        model = _tiny(fine_tune_epochs=2, patience=5, learning_rate=1e-3)
        engine = Engine(default_root_dir=tmp_path / str(run), logger=False)
        engine.fit(model=model, datamodule=_datamodule(texture_root))
        model.eval()
        with torch.no_grad():
            torch.manual_seed(1)
            scores.append(model.model(torch.rand(4, 3, 64, 64)).pred_score)
    torch.testing.assert_close(scores[0], scores[1], rtol=0, atol=0)


def test_invalid_fine_tuning_config_names_the_parameter() -> None:
    for kwargs, name in [
        ({"fine_tune_epochs": -1}, "fine_tune_epochs"),
        ({"held_out_fraction": 1.5}, "held_out_fraction"),
        ({"patience": 0}, "patience"),
        ({"pseudo_anomalies": ["mixup", "rotate"]}, "pseudo_anomalies"),
        ({"learning_rate": 0}, "learning_rate"),
    ]:
        with pytest.raises(ValueError, match=name):
            _tiny(**kwargs)
    with pytest.raises(ValueError, match="trainable_levels"):
        GaussFT(backbone="test_resnet", pre_trained=False, image_size=64, trainable_levels=[1])


class _Interrupt(Callback):
    """Stop the run after a given epoch, as a crash after that epoch's checkpoint would."""

    def __init__(self, after_epoch: int) -> None:
        self.after_epoch = after_epoch

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if trainer.current_epoch == self.after_epoch:
            raise KeyboardInterrupt


@pytest.mark.slow
@pytest.mark.parametrize("loss_features", ["pooled", "local"])
def test_interrupted_fine_tuning_resumes_to_the_same_scores(
    texture_root: Path, tmp_path: Path, loss_features: str
) -> None:
    def make() -> GaussFT:
        return _tiny(fine_tune_epochs=3, patience=5, learning_rate=1e-3, loss_features=loss_features)

    def scores(model: GaussFT) -> torch.Tensor:
        model.eval()
        with torch.no_grad():
            return model.model(torch.rand(4, 3, 64, 64, generator=torch.Generator().manual_seed(1))).pred_score

    seed_everything(0)
    uninterrupted = make()
    Engine(default_root_dir=tmp_path / "a", logger=False).fit(model=uninterrupted, datamodule=_datamodule(texture_root))

    seed_everything(0)
    # mode="max" only gives it a state key distinct from the ModelCheckpoint that anomalib adds.
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, every_n_epochs=1, mode="max")
    interrupted = make()
    engine = Engine(default_root_dir=tmp_path / "b", logger=False, callbacks=[checkpoints, _Interrupt(after_epoch=1)])
    with contextlib.suppress(KeyboardInterrupt, SystemExit):
        engine.fit(model=interrupted, datamodule=_datamodule(texture_root))
    assert interrupted.forgetting.history[-1]["epoch"] < 3
    assert not bool(interrupted.model.is_fitted)  # an interrupted fine-tuning is not a usable model

    seed_everything(123)  # a different global state: the resumed run must not depend on it
    resumed = make()
    Engine(default_root_dir=tmp_path / "c", logger=False).fit(
        model=resumed, datamodule=_datamodule(texture_root), ckpt_path=str(tmp_path / "ckpt" / "last.ckpt")
    )
    assert [h["epoch"] for h in resumed.forgetting.history] == [h["epoch"] for h in uninterrupted.forgetting.history]
    torch.testing.assert_close(scores(resumed), scores(uninterrupted), rtol=1e-5, atol=1e-5)


def test_layers_past_the_deepest_loss_level_are_not_trained() -> None:
    """They would get no gradient (and DDP's all-reduce fails on trainable parameters without one)."""
    model = _tiny(fine_tune_epochs=1, levels=[0, 1, 2, 3], map_levels=[2, 3])
    backbone = model.model.feature_extractor.model
    assert model.trainable_levels == [0, 1, 2, 3]
    assert all(p.requires_grad for stage in backbone.blocks[:3] for p in stage.parameters())
    assert not any(p.requires_grad for stage in backbone.blocks[3:] for p in stage.parameters())
    assert not any(p.requires_grad for p in backbone.conv_head.parameters())
    images = torch.rand(6, 3, 64, 64)
    _fit_gaussians(model, images)
    _loss(model, images).backward()
    assert all(p.grad is not None for p in backbone.parameters() if p.requires_grad)
    with pytest.raises(ValueError, match="trainable_levels"):
        _tiny(fine_tune_epochs=1, levels=[0, 1, 2, 3], map_levels=[2, 3], trainable_levels=[3, 5])


def test_forgetting_auroc_ranks_raw_distances_like_sklearn() -> None:
    """GaussFT's scores are distances in the hundreds: the metric must rank them, not squash them."""
    from sklearn.metrics import roc_auc_score

    from anomalib_gaussft.gaussft.forgetting import separation_auroc

    generator = torch.Generator().manual_seed(0)
    normal = 300 + 50 * torch.randn(40, generator=generator)
    anomalous = 340 + 60 * torch.randn(60, generator=generator)
    anomalous[:5] = normal[:5]  # ties count one half
    expected = roc_auc_score([0] * 40 + [1] * 60, torch.cat([normal, anomalous]).numpy())
    assert 0.6 < expected < 0.95
    assert separation_auroc(normal, anomalous) == pytest.approx(expected, abs=1e-6)
    assert separation_auroc(normal, normal + 1e4) == 1.0


@pytest.mark.parametrize("layout_grids", [1, 2])
def test_local_loss_is_the_mean_squared_map_plus_the_layout_distance(layout_grids: int) -> None:
    """In-sample local loss = Σ_map levels mean(level map²) + Σ_grids mean(layout d²) / D: a reference via the
    scoring path (one grid: the score's layout term itself; two: each grid's Gaussian scoring its own vectors)."""
    model = _tiny(fine_tune_epochs=1, loss_features="local", loss_gaussian="in_sample", layout_grids=layout_grids)
    model.eval()
    images = torch.rand(12, 3, 64, 64)
    _fit_gaussians(model, images)
    with torch.no_grad():
        features = model.model.extract(images)
        actual = _loss(model, images)
        maps = sum(level_map.square().mean() for level_map in model.model.level_maps(features))
        if layout_grids == 1:
            layout_column = TERMS[model.model.image_score.value].index("layout")
            layout_distance = model.model.score_terms(features, torch.zeros(12, 1, 64, 64))[:, layout_column]  # d
            layout = layout_distance.square().mean() / model.model.layout_gaussian.dim
        else:
            grids = zip(model.model.layout_gaussians(), model.model.layout_samples(features), strict=True)
            layout = sum(g.squared_mahalanobis(v).mean() / g.dim for g, v in grids)
        expected = maps + layout
    grid_targets = {"layout"} if layout_grids == 1 else {"layout", "layout_1"}
    assert set(model.loss.target_shapes) == {"map_3", "map_4", "map_5", *grid_targets}
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4)


def test_cross_fitted_local_loss_uses_the_other_folds_regional_gaussians() -> None:
    from anomalib_gaussft.gaussft.gaussian import StreamingGaussian

    model = _tiny(fine_tune_epochs=1, loss_features="local").eval()
    images = torch.rand(12, 3, 64, 64)
    folds = torch.tensor([0, 1] * 6)
    with torch.no_grad():
        features = model.model.extract(images)
        samples = model.model.loss_samples(features, "local")
        model.loss.update(samples, folds)
        model.loss.fit()
        actual = _loss(model, images, folds)
        expected = 0.0
        for name, target in model.model.loss_targets("local").items():
            values, index = samples[name]
            per_fold = []
            for fold in (0, 1):  # an independent fit of each fold's Gaussians
                gaussian = StreamingGaussian(target.groups, target.dim)
                gaussian.update(values[folds == fold], group_index=index)
                gaussian.fit()
                per_fold.append(gaussian.squared_mahalanobis(values, group_index=index))
            other = torch.where((folds == 0)[:, None], per_fold[1], per_fold[0])
            expected += other.mean() / target.dim
    torch.testing.assert_close(actual, torch.as_tensor(expected), rtol=1e-4, atol=1e-4)


def test_local_loss_trains_the_map_levels_and_lowers_with_steps() -> None:
    model = _tiny(fine_tune_epochs=1, loss_features="local", loss_gaussian="in_sample")
    assert model.trainable_levels == [3, 4, 5]  # the map levels' stages, not the deeper half
    images = torch.rand(16, 3, 64, 64)
    _fit_gaussians(model, images)
    model.model.eval()  # no dropout noise: the descent itself is tested
    losses = _descend(model, images, learning_rate=5e-5, steps=20)
    assert losses[-1] < 0.9 * losses[0]
    assert all(b < a for a, b in itertools.pairwise(losses))


def test_forgetting_detection_ranks_by_the_models_image_score() -> None:
    """The pseudo-anomaly AUROC of the default score: its terms z-scored on the held-out normals, summed (sklearn)."""
    from types import SimpleNamespace

    from sklearn.metrics import roc_auc_score

    model = _tiny(fine_tune_epochs=1, loss_features="local")
    _fit_gaussians(model, torch.rand(16, 3, 64, 64))
    model.model.score_normalisation.mean.fill_(100.0)  # not fitted while fine-tuning: must not be used
    normals = [torch.rand(6, 3, 64, 64), torch.rand(5, 3, 64, 64)]
    held_out = SimpleNamespace(loader=lambda part: [SimpleNamespace(image=x) for x in normals])
    cpu = torch.device("cpu")
    pl_module = SimpleNamespace(model=model.model, device=cpu, held_out=held_out, preprocess=lambda x: x)
    callback = ForgettingCallback(patience=None, pseudo_anomalies=["cutout", "mixup"], seed=0)
    actual = callback.pseudo_anomaly_auroc(pl_module)
    with torch.no_grad():
        terms = [model.model.raw_score_terms(model.model.extract(x), (64, 64)) for x in normals]
        anomalies = [
            model.model.raw_score_terms(model.model.extract(images), (64, 64))
            for index, x in enumerate(normals)
            for images in callback.generator(x, index).values()
        ]
    normal_terms = torch.cat(terms).double()
    z = lambda t: ((t.double() - normal_terms.mean(0)) / normal_terms.std(0)).sum(1)  # noqa: E731
    scores = torch.cat([z(normal_terms), *[z(a) for a in anomalies]]).numpy()
    labels = [0] * len(normal_terms) + [1] * (len(scores) - len(normal_terms))
    assert normal_terms.shape[1] == 2  # the default "local" score: layout and map terms
    assert actual["all"] == pytest.approx(roc_auc_score(labels, scores), abs=1e-6)  # float32 AUROC vs float64


@pytest.mark.parametrize("map_gaussian", ["shared", "regional"])
def test_local_loss_reads_the_neighbourhood_means_the_map_gaussians_read(map_gaussian: str) -> None:
    """The local loss's map samples are each position's 3 × 3 mean, for every kind of map Gaussian."""
    from conftest import neighbourhood_mean_reference

    model = _tiny(fine_tune_epochs=1, loss_features="local", map_gaussian=map_gaussian).eval()
    with torch.no_grad():
        features = model.model.extract(torch.rand(3, 3, 64, 64))
        samples = model.model.loss_samples(features, "local")
    for level in model.model.map_levels:
        n, c, h, w = features[level].shape
        expected = neighbourhood_mean_reference(features[level].double().numpy(), 3)
        expected = torch.from_numpy(expected).reshape(n, c, h * w).transpose(1, 2)
        torch.testing.assert_close(samples[f"map_{level}"][0].double(), expected, rtol=1e-5, atol=1e-6)
