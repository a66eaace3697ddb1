"""The benchmark's dataset converters: layout that anomalib's MVTecAD reads, masks aligned with their images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import make_magnetic_tile


def _write(folder: Path, stem: str, size: tuple[int, int], defect_box: tuple[int, int, int, int] | None) -> None:
    """A grayscale crop (``size`` = W x H) and its 0/255 mask: ``defect_box`` (x0, y0, x1, y1) bright, else 0."""
    folder.mkdir(parents=True, exist_ok=True)
    image = np.full((size[1], size[0]), 90, np.uint8)
    mask = np.zeros_like(image)
    if defect_box is not None:
        x0, y0, x1, y1 = defect_box
        image[y0:y1, x0:x1] = 250
        mask[y0:y1, x0:x1] = 255
    Image.fromarray(image).save(folder / f"{stem}.jpg", quality=100)
    Image.fromarray(mask).save(folder / f"{stem}.png")


@pytest.fixture
def tile_repo(tmp_path: Path) -> Path:
    repo = tmp_path / "repo"
    for i, size in enumerate([(100, 230), (300, 250), (200, 200), (150, 300), (120, 240)]):
        _write(repo / "MT_Free" / "Imgs", f"free_{i}", size, None)
    _write(repo / "MT_Crack" / "Imgs", "crack_0", (200, 100), (100, 50, 200, 100))  # right half of the bottom half
    _write(repo / "MT_Uneven" / "Imgs", "uneven_0", (160, 320), (0, 0, 80, 320))  # left half
    return repo


def test_magnetic_tile_layout_sizes_and_aligned_masks(tile_repo: Path, tmp_path: Path) -> None:
    out = tmp_path / "data" / "magnetic_tile"
    make_magnetic_tile.main(["--repo", str(tile_repo), "--out", str(out), "--size", "64", "--train-fraction", "0.6"])

    assert len(list((out / "train" / "good").glob("*.png"))) == 3
    assert len(list((out / "test" / "good").glob("*.png"))) == 2
    assert sorted(p.name for p in (out / "test").iterdir()) == ["crack", "good", "uneven"]
    crack = np.asarray(Image.open(out / "ground_truth" / "crack" / "crack_0_mask.png"))
    assert crack.shape == (64, 64)
    assert set(np.unique(crack)) == {0, 255}
    assert crack[32:, 32:].min() == 255
    assert crack[:32].max() == 0
    assert crack[:, :32].max() == 0
    image = Image.open(out / "test" / "crack" / "crack_0.png")
    assert image.mode == "RGB"
    assert image.size == (64, 64)
    pixels = np.asarray(image)[..., 0]
    assert pixels[40:, 40:].mean() > 200  # the bright defect sits under its mask
    assert pixels[:24, :24].mean() < 120
    uneven = np.asarray(Image.open(out / "ground_truth" / "uneven" / "uneven_0_mask.png"))
    assert uneven[:, :32].min() == 255
    assert uneven[:, 32:].max() == 0


def test_magnetic_tile_rejects_a_mask_of_another_size(tile_repo: Path, tmp_path: Path) -> None:
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(tile_repo / "MT_Crack" / "Imgs" / "crack_0.png")
    with pytest.raises(ValueError, match=r"crack_0\.png: mask size"):
        make_magnetic_tile.main(["--repo", str(tile_repo), "--out", str(tmp_path / "out")])


def test_magnetic_tile_refuses_to_overwrite(tile_repo: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    (out / "keep").mkdir(parents=True)
    with pytest.raises(SystemExit):
        make_magnetic_tile.main(["--repo", str(tile_repo), "--out", str(out)])
    assert (out / "keep").is_dir()
