"""Bad input: every case gets a clear error naming the file or parameter, or a tested correct handling.

Config values (negative epochs, held_out_fraction outside (0, 1), unknown names) are in test_model.py.
"""

from __future__ import annotations

import io
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from anomalib.data import Folder, ImageBatch, MVTecAD
from anomalib.data.utils import read_image
from anomalib.engine import Engine
from PIL import Image

from anomalib_gaussft import GaussFT
from anomalib_gaussft.gaussft.held_out import held_out_split
from anomalib_gaussft.gaussft.input_checks import UnusableImagesError, image_problem
from conftest import TINY_BACKBONE

SIZE = 32  # test_efficientnet's total stride: the smallest image_size it accepts


def _rgb(seed: int, size: int = SIZE) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


def _write(folder: Path, n: int, size: int = SIZE, start: int = 0) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"{start + i:03d}.png" for i in range(n)]
    for i, path in enumerate(paths):
        Image.fromarray(_rgb(start + i, size)).save(path)
    return paths


def _dataset(root: Path, n_train: int, n_test: int = 2) -> Path:
    """``root/good`` (training) and ``root/test`` (normal test images, also the validation set)."""
    _write(root / "good", n_train)
    _write(root / "test", n_test, start=100)
    return root


def _folder(root: Path) -> Folder:
    return Folder(
        name="bad_input",
        root=root,
        normal_dir="good",
        normal_test_dir="test",
        val_split_mode="same_as_test",
        train_batch_size=4,
        eval_batch_size=4,
        num_workers=0,
    )


def _model(**kwargs) -> GaussFT:
    kwargs = {"image_size": SIZE, "fine_tune_epochs": 0, **kwargs}
    return GaussFT(backbone=TINY_BACKBONE, pre_trained=False, visualizer=False, **kwargs)


def _engine(tmp_path: Path) -> Engine:
    return Engine(
        default_root_dir=tmp_path / "results", logger=False, accelerator="cpu", devices=1, enable_progress_bar=False
    )


def _truncated(path: Path, fmt: str) -> Path:
    buffer = io.BytesIO()
    Image.fromarray(_rgb(7)).save(buffer, format=fmt)
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    return path


def _predict_scores(engine: Engine, model: GaussFT, root: Path) -> list[ImageBatch]:
    batches = engine.predict(model=model, datamodule=_folder(root))
    assert batches
    for batch in batches:
        assert torch.isfinite(batch.pred_score).all()
        assert torch.isfinite(batch.anomaly_map).all()
    return batches


# ---- 1. corrupt, empty and truncated files ---------------------------------------------------------------------
@pytest.mark.slow
def test_unreadable_training_images_fail_early_in_one_error(tmp_path: Path) -> None:
    root = _dataset(tmp_path / "data", n_train=4)
    good = root / "good"
    (good / "corrupt.png").write_bytes(np.random.default_rng(0).bytes(300))
    (good / "empty.png").write_bytes(b"")
    _truncated(good / "truncated.png", "PNG")
    _truncated(good / "truncated.jpg", "JPEG")

    model = _model()
    with pytest.raises(UnusableImagesError) as error:
        _engine(tmp_path).fit(model=model, datamodule=_folder(root))
    problems = {Path(path).name: reason for path, reason in error.value.problems.items()}
    assert set(problems) == {"corrupt.png", "empty.png", "truncated.png", "truncated.jpg"}  # all, and only them
    for path in error.value.problems:
        assert path in str(error.value)
    assert "empty file" in problems["empty.png"]
    assert "cannot identify image file" in problems["corrupt.png"]
    assert "truncated" in problems["truncated.png"].lower()
    assert "truncated" in problems["truncated.jpg"].lower()
    assert not bool(model.model.is_fitted)  # failed before any statistics


@pytest.mark.slow
def test_unreadable_test_image_is_named_before_testing(tmp_path: Path) -> None:
    root = _dataset(tmp_path / "data", n_train=4)
    model = _model()
    engine = _engine(tmp_path)
    engine.fit(model=model, datamodule=_folder(root))
    bad = _truncated(root / "test" / "truncated.png", "PNG")
    with pytest.raises(UnusableImagesError, match="test data") as error:
        engine.test(model=model, datamodule=_folder(root))
    assert [Path(p).name for p in error.value.problems] == [bad.name]


@pytest.mark.slow
def test_predict_scores_readable_images_and_names_the_rest(tmp_path: Path) -> None:
    root = _dataset(tmp_path / "data", n_train=6)
    model, engine = _model(), _engine(tmp_path)
    engine.fit(model=model, datamodule=_folder(root))
    folder = tmp_path / "to_score"
    readable = _write(folder, 3, start=50)
    (folder / "empty.png").write_bytes(b"")
    (folder / "corrupt.png").write_bytes(b"not an image")
    _truncated(folder / "truncated.png", "PNG")
    with pytest.raises(UnusableImagesError) as error:
        engine.predict(model=model, data_path=folder)
    assert set(error.value.problems) == {str(folder / name) for name in ("empty.png", "corrupt.png", "truncated.png")}
    assert "truncated" in error.value.problems[str(folder / "truncated.png")]
    scored = [str(path) for batch in error.value.predictions for path in batch.image_path]
    assert sorted(scored) == sorted(str(path) for path in readable)  # every readable image, nothing else
    listing = next((tmp_path / "results").rglob("skipped_images.csv")).read_text().splitlines()
    assert listing[0] == "image_path,reason"
    assert len(listing) == 4


# ---- 2. grayscale, RGBA, 16-bit ----------------------------------------------------------------------------------
def _save_modes(folder: Path) -> list[Path]:
    """One image per mode that anomalib's loader converts faithfully (16-bit within 0..255 included)."""
    folder.mkdir(parents=True, exist_ok=True)
    rgb = _rgb(42)
    images = {
        "gray.png": Image.fromarray(rgb[..., 0]),
        "rgba.png": Image.fromarray(np.dstack([rgb, np.full(rgb.shape[:2], 128, np.uint8)])),
        "palette.png": Image.fromarray(rgb).convert("P"),
        "gray16_low.png": Image.fromarray(rgb[..., 1].astype(np.uint16)),
    }
    for name, image in images.items():
        image.save(folder / name)
    return [folder / name for name in images]


def _save_16_bit(path: Path, high: int) -> Path:
    ramp = np.linspace(0, high, SIZE * SIZE).reshape(SIZE, SIZE).astype(np.uint16)
    Image.fromarray(ramp).save(path)
    assert Image.open(path).mode == "I;16"
    return path


def test_anomalib_loader_clips_16_bit_images_to_white(tmp_path: Path) -> None:
    """Why GaussFT rejects them: PIL's convert('RGB') clips instead of rescaling (if this changes, relax the check)."""
    image = read_image(_save_16_bit(tmp_path / "ramp16.png", 65535), as_tensor=True)
    assert (image == 1.0).float().mean() > 0.99


def test_16_bit_rgb_png_is_read_as_its_high_byte(tmp_path: Path) -> None:
    import cv2

    pixels = np.random.default_rng(0).integers(0, 65536, (SIZE, SIZE, 3)).astype(np.uint16)
    cv2.imwrite(str(tmp_path / "rgb48.png"), pixels[..., ::-1])  # OpenCV writes BGR
    assert image_problem(tmp_path / "rgb48.png") is None
    image = read_image(tmp_path / "rgb48.png", as_tensor=True)
    torch.testing.assert_close(image, torch.from_numpy(pixels >> 8).permute(2, 0, 1).float() / 255)


@pytest.mark.parametrize(
    ("mode", "values", "usable"),
    [
        ("I;16", [0, 17, 255], True),
        ("I;16", [0, 1000, 4095], False),  # 12-bit camera data
        ("I", [0, 70000], False),
        ("F", [0.0, 0.5, 1.0], False),  # [0, 1] floats become 0/1
        ("F", [0.0, 128.0, 255.0], True),
    ],
)
def test_high_bit_depth_images_are_usable_only_within_8_bit(
    tmp_path: Path, mode: str, values: list, usable: bool
) -> None:
    dtype = {"I;16": np.uint16, "I": np.int32, "F": np.float32}[mode]
    path = tmp_path / "image.tif"
    image = Image.fromarray(np.resize(np.array(values, dtype=dtype), (SIZE, SIZE)))
    assert image.mode == mode
    image.save(path)
    problem = image_problem(path)
    if usable:
        assert problem is None
        assert read_image(path, as_tensor=True).std() > 0
    else:
        assert "clips" in problem
        assert "8 bits" in problem


@pytest.mark.slow
def test_16_bit_training_images_are_a_clear_error(tmp_path: Path) -> None:
    root = _dataset(tmp_path / "data", n_train=4)
    bad = {_save_16_bit(root / "good" / f"sensor{i}.png", 4095 * (i + 1)).name for i in range(2)}
    with pytest.raises(UnusableImagesError, match=r"I;16 image with values 0\.\.4095") as error:
        _engine(tmp_path).fit(model=_model(), datamodule=_folder(root))
    assert {Path(p).name for p in error.value.problems} == bad
    assert "convert it to 8 bits" in str(error.value)


@pytest.mark.slow
def test_grayscale_rgba_palette_and_low_range_16_bit_images_train_and_score(tmp_path: Path) -> None:
    root = _dataset(tmp_path / "data", n_train=3, n_test=0)
    train = _save_modes(root / "good")
    test = _save_modes(root / "test")
    for path in test:
        image = read_image(path, as_tensor=True)
        assert image.shape == (3, SIZE, SIZE)
        assert image.std() > 0.05  # not reduced to a constant image
    rgb = torch.from_numpy(_rgb(42)).permute(2, 0, 1).float() / 255
    torch.testing.assert_close(read_image(root / "test" / "rgba.png", as_tensor=True), rgb)  # alpha dropped
    torch.testing.assert_close(read_image(root / "test" / "gray.png", as_tensor=True), rgb[:1].expand(3, -1, -1))
    model = _model()
    engine = _engine(tmp_path)
    engine.fit(model=model, datamodule=_folder(root))
    assert model.model.image_gaussians["0"].num_samples.item() == 3 + len(train)
    scored = [Path(p).name for batch in _predict_scores(engine, model, root) for p in batch.image_path]
    assert sorted(scored) == sorted(p.name for p in test)


# ---- 3. tiny images, tiny image_size ---------------------------------------------------------------------------
@pytest.mark.slow
def test_images_smaller_than_the_backbone_stride_are_resized(tmp_path: Path) -> None:
    root = tmp_path / "data"
    _write(root / "good", 4, size=8)
    Image.fromarray(_rgb(9, 48)[:20]).save(root / "good" / "wide.png")  # 48x20: another size and aspect ratio
    _write(root / "test", 2, size=8, start=100)
    model = _model()
    engine = _engine(tmp_path)
    engine.fit(model=model, datamodule=_folder(root))
    assert model.model.image_gaussians["0"].num_samples.item() == 5
    for batch in _predict_scores(engine, model, root):
        assert batch.anomaly_map.shape[-2:] == (SIZE, SIZE)


@pytest.mark.parametrize("image_size", [8, SIZE - 1, (64, 16)])
def test_image_size_below_the_backbone_stride_is_a_clear_error(image_size: int | tuple[int, int]) -> None:
    with pytest.raises(ValueError, match=r"image_size .* too small .* stride 32"):
        _model(image_size=image_size)


def test_image_size_equal_to_the_backbone_stride_is_accepted() -> None:
    assert _model(image_size=SIZE).model.image_size == (SIZE, SIZE)


# ---- 4. too few training images ---------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize(
    ("kwargs", "n_train", "match"),
    [
        ({}, 1, r"at least 2 normal training images .* \(Folder\(root=.*\)\) has 1: .*000\.png"),
        ({"fine_tune_epochs": 1}, 3, r"held_out_fraction=0.2 holds out 2 .* at least 4 training images"),
        ({"false_alarm_rate": 0.5}, 3, r"held_out_fraction=0.2 holds out 2 .* at least 4 training images"),
    ],
)
def test_too_few_training_images_are_a_clear_error(tmp_path: Path, kwargs: dict, n_train: int, match: str) -> None:
    root = _dataset(tmp_path / "data", n_train=n_train)
    model = _model(**kwargs)
    with pytest.raises(ValueError, match=match):
        _engine(tmp_path).fit(model=model, datamodule=_folder(root))
    assert not bool(model.model.is_fitted)


def test_held_out_error_gives_the_number_of_images_needed() -> None:
    with pytest.raises(ValueError, match=r"held_out_fraction=0.8 holds out 6 .* at least 8 training images"):
        held_out_split([f"{i}.png" for i in range(7)], 0.8, seed=0)
    assert len(held_out_split([f"{i}.png" for i in range(8)], 0.8, seed=0)[0]) == 2


# ---- 5. fewer images than feature dimensions --------------------------------------------------------------------
@pytest.mark.slow
def test_fewer_images_than_features_fit_with_shrinkage_and_warn(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = _dataset(tmp_path / "data", n_train=4)
    model = _model()
    engine = _engine(tmp_path)
    with caplog.at_level(logging.WARNING, logger="anomalib_gaussft"):
        engine.fit(model=model, datamodule=_folder(root))
    assert "Fitted on 4 images while the widest level has 256 features" in caplog.text
    widest = max(model.model.image_gaussians.values(), key=lambda g: g.dim)
    assert widest.dim == 256
    assert widest.shrinkage.item() > 0
    assert torch.isfinite(widest.whitening).all()
    _predict_scores(engine, model, root)


# ---- 6. NaN / Inf -----------------------------------------------------------------------------------------------
def _batch(nan_index: int | None = None) -> ImageBatch:
    images = torch.rand(3, 3, SIZE, SIZE)
    if nan_index is not None:
        images[nan_index, 1, 2, 3] = float("nan")
    return ImageBatch(image=images, image_path=["a.png", "b.png", "c.png"])


def test_nan_pixels_name_the_offending_images() -> None:
    with pytest.raises(FloatingPointError, match=r"NaN/Inf pixel values .* \['b.png'\]") as error:
        _model().training_step(_batch(nan_index=1), 0)
    assert "a.png" not in str(error.value)


def test_nan_features_from_finite_images_blame_the_backbone() -> None:
    model = _model()
    with torch.no_grad():
        model.model.feature_extractor.model.conv_stem.weight.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match=r"backbone .* \['a.png', 'b.png', 'c.png'\]"):
        model.training_step(_batch(), 0)


def test_nan_fine_tuning_loss_names_the_offending_images() -> None:
    model = _model(fine_tune_epochs=1)  # no trainer: no held-out split, every image is trained on
    with pytest.raises(FloatingPointError, match=r"\['c.png'\]"):
        model.training_step(_batch(nan_index=2), 0)


# ---- 7. empty or missing dataset folders ------------------------------------------------------------------------
@pytest.mark.slow
def test_missing_and_empty_training_folders_are_named(tmp_path: Path) -> None:
    root = _dataset(tmp_path / "data", n_train=0)
    with pytest.raises(RuntimeError, match=r"Found 0 .* images in .*good"):  # anomalib's own error
        _engine(tmp_path).fit(model=_model(), datamodule=_folder(root))
    with pytest.raises(FileNotFoundError, match="does_not_exist"):  # anomalib's own error
        _engine(tmp_path).fit(model=_model(), datamodule=_folder(tmp_path / "does_not_exist"))


@pytest.mark.slow
def test_empty_training_split_is_a_clear_error(tmp_path: Path) -> None:
    root = tmp_path / "mvtec"
    (root / "brick" / "train" / "good").mkdir(parents=True)
    _write(root / "brick" / "test" / "good", 2)
    datamodule = MVTecAD(root=root, category="brick", train_batch_size=2, eval_batch_size=2, num_workers=0)
    with pytest.raises(ValueError, match=r"training set is empty \(MVTecAD\(root=.*mvtec, category=brick"):
        _engine(tmp_path).fit(model=_model(), datamodule=datamodule)
