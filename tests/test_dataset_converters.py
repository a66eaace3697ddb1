"""The benchmark's dataset converters: layout that anomalib's MVTecAD reads, masks aligned with their images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import make_deeppcb
import make_kolektorsdd
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


@pytest.fixture
def kolektor_repo(tmp_path: Path) -> Path:
    """Five images as the YOLO copy stores them: four defect-free (empty labels), one with a polygon."""
    repo = tmp_path / "ksdd"
    for split, stems in (("train", ["000", "001", "002"]), ("val", ["003", "004"])):
        (repo / "Datasets" / "images" / split).mkdir(parents=True)
        (repo / "Datasets" / "labels" / split).mkdir(parents=True)
        for stem in stems:
            image = np.full((200, 80), 90, np.uint8)
            label = ""
            if stem == "004":  # a bright defect in the right half of the bottom quarter, as a normalised polygon
                image[150:, 40:] = 250
                label = "0 0.5 0.75 1.0 0.75 1.0 1.0 0.5 1.0"
            Image.fromarray(image).save(repo / "Datasets" / "images" / split / f"{stem}.jpg", quality=100)
            (repo / "Datasets" / "labels" / split / f"{stem}.txt").write_text(label)
    return repo


def test_kolektorsdd_layout_and_polygon_masks(kolektor_repo: Path, tmp_path: Path) -> None:
    out = tmp_path / "data" / "kolektorsdd"
    make_kolektorsdd.main(["--repo", str(kolektor_repo), "--out", str(out), "--width", "32", "--height", "64"])

    assert len(list((out / "train" / "good").glob("*.png"))) == 3  # round(0.7 * 4)
    assert len(list((out / "test" / "good").glob("*.png"))) == 1
    assert [p.name for p in (out / "test" / "crack").iterdir()] == ["val_004.png"]
    mask = np.asarray(Image.open(out / "ground_truth" / "crack" / "val_004_mask.png"))
    assert mask.shape == (64, 32)
    assert set(np.unique(mask)) == {0, 255}
    assert mask[49:, 17:].min() == 255
    assert mask[:47].max() == 0
    assert mask[:, :15].max() == 0
    pixels = np.asarray(Image.open(out / "test" / "crack" / "val_004.png"))
    assert pixels.shape == (64, 32, 3)
    assert pixels[52:, 20:, 0].mean() > 200  # the bright defect sits under its mask
    assert pixels[:24, :12, 0].mean() < 120


def test_kolektorsdd_rejects_an_odd_polygon(kolektor_repo: Path, tmp_path: Path) -> None:
    (kolektor_repo / "Datasets" / "labels" / "val" / "004.txt").write_text("0 0.5 0.5 1.0")
    with pytest.raises(ValueError, match=r"004\.txt:1: a polygon needs"):
        make_kolektorsdd.main(["--repo", str(kolektor_repo), "--out", str(tmp_path / "out")])


@pytest.fixture
def pcb_repo(tmp_path: Path) -> Path:
    """DeepPCB's layout: two trainval pairs, two test pairs; the tested images carry one bright box each."""
    data = tmp_path / "pcb" / "PCBData"
    (data / "group1" / "1").mkdir(parents=True)
    (data / "group1" / "1_not").mkdir(parents=True)
    lines = {"trainval": [], "test": []}
    for index, split in enumerate(["trainval", "trainval", "test", "test"]):
        stem = f"1000{index}"
        template = np.zeros((80, 80), np.uint8)
        tested = template.copy()
        tested[60:80, 40:80] = 255  # the defect: right half of the bottom quarter
        Image.fromarray(template).save(data / "group1" / "1" / f"{stem}_temp.jpg", quality=100)
        Image.fromarray(tested).save(data / "group1" / "1" / f"{stem}_test.jpg", quality=100)
        (data / "group1" / "1_not" / f"{stem}.txt").write_text("40,60,79,79,1\n")
        lines[split].append(f"group1/1/{stem}.jpg group1/1_not/{stem}.txt")
    for split, entries in lines.items():
        (data / f"{split}.txt").write_text("\n".join(entries) + "\n")
    return tmp_path / "pcb"


def test_deeppcb_layout_pairs_and_box_masks(pcb_repo: Path, tmp_path: Path) -> None:
    out = tmp_path / "data" / "deeppcb"
    make_deeppcb.main(["--repo", str(pcb_repo), "--out", str(out), "--size", "40", "--test-pairs", "2"])

    assert sorted(p.name for p in (out / "train" / "good").iterdir()) == ["10000.png", "10001.png"]
    assert sorted(p.name for p in (out / "test" / "good").iterdir()) == ["10002.png", "10003.png"]
    assert sorted(p.name for p in (out / "test" / "defect").iterdir()) == ["10002.png", "10003.png"]
    mask = np.asarray(Image.open(out / "ground_truth" / "defect" / "10002_mask.png"))
    assert mask.shape == (40, 40)
    assert mask[31:, 21:].min() == 255
    assert mask[:29].max() == 0
    assert mask[:, :19].max() == 0
    tested = np.asarray(Image.open(out / "test" / "defect" / "10002.png"))[..., 0]
    template = np.asarray(Image.open(out / "test" / "good" / "10002.png"))[..., 0]
    assert tested[32:, 22:].mean() > 200  # the defect sits under its mask, and only the tested image has it
    assert template.max() < 50


def test_deeppcb_rejects_a_missing_image_and_too_many_pairs(pcb_repo: Path, tmp_path: Path) -> None:
    with pytest.raises(SystemExit):
        make_deeppcb.main(["--repo", str(pcb_repo), "--out", str(tmp_path / "a"), "--test-pairs", "3"])
    (pcb_repo / "PCBData" / "group1" / "1" / "10003_test.jpg").unlink()
    with pytest.raises(FileNotFoundError, match=r"10003_test\.jpg: listed in the split but missing"):
        make_deeppcb.main(["--repo", str(pcb_repo), "--out", str(tmp_path / "b"), "--test-pairs", "2"])
