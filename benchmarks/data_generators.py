"""Small real-image datasets for tests, benchmarks and the demo (not part of the installed package).

Two generators write folders that anomalib's datamodules read directly:

* :func:`make_texture_dataset` crops scikit-image's real textures (``brick``, ``grass``, ``gravel``) into an
  MVTec-AD-style tree and pastes synthetic local defects (foreign texture, colour stain, dark/bright spot,
  scratch) with exact ground-truth masks. Read it with ``anomalib.data.MVTecAD(root=..., category=...)``.
* :func:`make_elpv_dataset` exports the ELPV solar-cell electroluminescence images (PyPI ``elpv-dataset``) into
  a ``train/good``, ``test/good``, ``test/defect`` tree for ``anomalib.data.Folder``.

Both are deterministic for a given seed and skip the work when a complete folder written with the same
parameters already exists.

Example:
    >>> from anomalib.data import MVTecAD
    >>> make_texture_dataset(Path("/tmp/tex"))
    ['brick', 'grass', 'gravel']
    >>> datamodule = MVTecAD(root="/tmp/tex", category="brick", num_workers=0)

CLI::

    python benchmarks/data_generators.py textures --root /tmp/tex --image-size 128
    python benchmarks/data_generators.py elpv --root /tmp/elpv --cell-type mono

Needs scikit-image (textures) and ``elpv-dataset`` (ELPV): the ``test`` extra installs both.

"""

from __future__ import annotations

import argparse
import colorsys
import json
import os
import shutil
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

__all__ = ["DEFAULT_TEXTURES", "main", "make_elpv_dataset", "make_texture_dataset"]

DEFAULT_TEXTURES: tuple[str, ...] = ("brick", "grass", "gravel")
_MARKER = ".dataset.json"
_FORMAT_VERSION = 1
# Fraction of each source texture's width used for training crops; test crops come from the rest so that test
# images are never copies of training pixels (when the texture is at least twice as wide as a crop).
_TRAIN_REGION = 0.6
_MIN_MASK_FRACTION = 0.01
_MAX_MASK_FRACTION = 0.10
_MIN_VISIBLE_DIFF = 30.0  # mean absolute grey-level change inside the mask
_MIN_FOREIGN_SHIFT = 45.0  # minimum mean brightness offset of a pasted foreign-texture patch
_DEFECT_KINDS = ("foreign_texture", "stain", "spot", "scratch")


# --------------------------------------------------------------------------------------------------------------
# Shared helpers
# --------------------------------------------------------------------------------------------------------------


def _rng(seed: int, name: str) -> np.random.Generator:
    """Return a generator seeded by ``seed`` and ``name`` (stable across runs and category lists)."""
    return np.random.default_rng([seed, zlib.crc32(name.encode())])


def _count_pngs(folder: Path) -> int:
    """Count PNG files directly inside ``folder`` (0 if it does not exist)."""
    return len(list(folder.glob("*.png"))) if folder.is_dir() else 0


def _is_complete(folder: Path, meta: dict[str, Any]) -> bool:
    """Check that ``folder`` was written with ``meta`` and still holds all of its files."""
    marker = folder / _MARKER
    if not marker.is_file():
        return False
    try:
        stored = json.loads(marker.read_text())
    except (OSError, ValueError):
        return False
    if stored.get("params") != meta["params"]:
        return False
    return all(_count_pngs(folder / split) == count for split, count in stored.get("counts", {}).items())


def _build_atomically(final: Path, meta: dict[str, Any], write: Callable[[Path], dict[str, int]]) -> dict[str, int]:
    """Write a dataset folder via a temporary sibling folder, then move it into place.

    Args:
        final: Destination folder.
        meta: JSON-serialisable description; ``meta["params"]`` decides whether an existing folder is reused.
        write: Called with the temporary folder; writes the files and returns PNG counts per sub-folder.

    Returns:
        PNG counts per sub-folder.

    Raises:
        FileExistsError: If ``final`` exists but was not written by this module.

    """
    if _is_complete(final, meta):
        return json.loads((final / _MARKER).read_text())["counts"]
    if final.exists() and not (final / _MARKER).is_file():
        msg = f"{final} exists and was not written by {Path(__file__).name}; remove it or choose another root."
        raise FileExistsError(msg)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        counts = write(tmp)
        (tmp / _MARKER).write_text(json.dumps({**meta, "counts": counts}, indent=2))
        if final.exists():  # stale folder written by this module with other parameters
            shutil.rmtree(final)
        try:
            tmp.rename(final)
        except OSError:
            if not _is_complete(final, meta):  # a concurrent writer did not finish the same job
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return counts


# --------------------------------------------------------------------------------------------------------------
# Textures (MVTec AD layout)
# --------------------------------------------------------------------------------------------------------------


def _load_texture(name: str) -> np.ndarray:
    """Load a scikit-image example texture as a 2-D ``uint8`` array."""
    import skimage.data

    loader = getattr(skimage.data, name, None)
    if loader is None:
        msg = f"skimage.data has no image called {name!r}"
        raise ValueError(msg)
    image = np.asarray(loader())
    if image.ndim == 3:
        image = np.asarray(Image.fromarray(image[..., :3]).convert("L"))
    return image.astype(np.uint8)


def _fit_texture(texture: np.ndarray, crop: int) -> np.ndarray:
    """Upscale ``texture`` if it is smaller than ``crop`` on either side."""
    height, width = texture.shape
    if min(height, width) >= crop:
        return texture
    factor = crop / min(height, width)
    size = (max(crop, round(width * factor)), max(crop, round(height * factor)))
    return np.asarray(Image.fromarray(texture).resize(size, Image.Resampling.BICUBIC))


def _random_crop(
    rng: np.random.Generator,
    texture: np.ndarray,
    crop: int,
    x_range: tuple[int, int] | None = None,
    augment: bool = True,
) -> np.ndarray:
    """Crop a ``crop`` x ``crop`` square, optionally limited to columns ``x_range``, with random flips/rot90."""
    height, width = texture.shape
    x_lo, x_hi = x_range if x_range is not None else (0, width)
    top = int(rng.integers(0, height - crop + 1))
    left = int(rng.integers(x_lo, x_hi - crop + 1))
    patch = texture[top : top + crop, left : left + crop]
    if augment:
        patch = np.rot90(patch, k=int(rng.integers(4)))
        if rng.random() < 0.5:
            patch = patch[:, ::-1]
    return np.ascontiguousarray(patch)


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Smooth zero-mean, unit-std noise on a ``size`` x ``size`` grid (bicubic upsampled lattice noise)."""
    lattice = rng.standard_normal((cells + 3, cells + 3)).astype(np.float32)
    noise = ndimage.zoom(lattice, size / cells, order=3)
    offset = (noise.shape[0] - size) // 2
    noise = noise[offset : offset + size, offset : offset + size]
    return (noise - noise.mean()) / (noise.std() + 1e-6)


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """Keep the largest 4-connected component of a boolean mask."""
    labels, count = ndimage.label(mask)
    if count <= 1:
        return mask
    sizes = ndimage.sum_labels(mask, labels, index=np.arange(1, count + 1))
    return labels == (int(np.argmax(sizes)) + 1)


def _blob_mask(rng: np.random.Generator, size: int) -> np.ndarray:
    """Irregular local blob: a random ellipse whose border is warped by smooth noise."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    for _ in range(20):
        area = rng.uniform(0.015, 0.06) * size * size
        aspect = rng.uniform(1.0, 2.5)
        semi_a = np.sqrt(area * aspect / np.pi)
        semi_b = semi_a / aspect
        margin = semi_a + 2
        cy, cx = rng.uniform(margin, size - margin, size=2) if size > 2 * margin else (size / 2, size / 2)
        theta = rng.uniform(0, np.pi)
        u = (xx - cx) * np.cos(theta) + (yy - cy) * np.sin(theta)
        v = -(xx - cx) * np.sin(theta) + (yy - cy) * np.cos(theta)
        radius = np.sqrt((u / semi_a) ** 2 + (v / semi_b) ** 2)
        warp = _smooth_noise(rng, size, cells=max(2, round(size / semi_a * rng.uniform(0.8, 1.6))))
        mask = _largest_component(radius + rng.uniform(0.2, 0.45) * warp < 1.0)
        mask = ndimage.binary_fill_holes(mask)
        if _MIN_MASK_FRACTION <= mask.mean() <= _MAX_MASK_FRACTION:
            return mask
    return radius < 1.0


def _scratch_mask(rng: np.random.Generator, size: int) -> np.ndarray:
    """Thin curved scratch drawn as a smooth random polyline."""
    for _ in range(20):
        length = rng.uniform(0.45, 0.8) * size
        width = max(3, round(rng.uniform(0.025, 0.045) * size))
        steps = 12
        angle = rng.uniform(0, 2 * np.pi)
        turns = np.cumsum(rng.normal(0, 0.18, size=steps))
        step = length / steps
        x, y = rng.uniform(0.25 * size, 0.75 * size, size=2)
        points = [(float(x), float(y))]
        for turn in turns:
            x += step * np.cos(angle + turn)
            y += step * np.sin(angle + turn)
            points.append((float(x), float(y)))
        canvas = Image.new("L", (size, size), 0)
        ImageDraw.Draw(canvas).line(points, fill=255, width=width, joint="curve")
        mask = np.asarray(canvas) > 0
        if _MIN_MASK_FRACTION <= mask.mean() <= _MAX_MASK_FRACTION:
            return mask
    return _blob_mask(rng, size)


def _random_colour(rng: np.random.Generator) -> np.ndarray:
    """Saturated random RGB colour in ``[0, 1]``."""
    rgb = colorsys.hsv_to_rgb(rng.uniform(0, 1), rng.uniform(0.6, 1.0), rng.uniform(0.6, 1.0))
    return np.asarray(rgb, dtype=np.float32)


def _apply_defect(
    rng: np.random.Generator,
    image: np.ndarray,
    kind: str,
    sources: Sequence[np.ndarray],
) -> tuple[np.ndarray, np.ndarray]:
    """Paste one local defect of type ``kind`` into a grey ``image``.

    Args:
        rng: Random generator.
        image: ``uint8`` grey image of shape ``[S, S]``.
        kind: One of ``_DEFECT_KINDS``.
        sources: Other grey textures used by ``"foreign_texture"`` defects.

    Returns:
        ``uint8`` RGB image ``[S, S, 3]`` and boolean mask ``[S, S]`` (never empty).

    """
    size = image.shape[0]
    base = np.repeat(image.astype(np.float32)[..., None], 3, axis=-1)
    mask = _scratch_mask(rng, size) if kind == "scratch" else _blob_mask(rng, size)
    # Soft inner border so the paste is not a hard cut-out; pixels outside the mask stay untouched.
    alpha = np.clip(ndimage.gaussian_filter(mask.astype(np.float32), 1.0) * 2.0, 0.0, 1.0) * mask

    if kind == "foreign_texture" and sources:
        # A coarser, calmer crop of another texture, shifted in brightness: foreign material on the surface.
        source = sources[int(rng.integers(len(sources)))]
        small = max(8, round(size / rng.uniform(1.5, 3.0)))
        patch = _random_crop(rng, _fit_texture(source, small), small)
        patch = np.asarray(Image.fromarray(patch).resize((size, size), Image.Resampling.BICUBIC), dtype=np.float32)
        local = float(image[mask].mean())
        direction = rng.choice([-1.0, 1.0])
        shift = rng.uniform(_MIN_FOREIGN_SHIFT, 1.5 * _MIN_FOREIGN_SHIFT)
        if not 30.0 <= local + direction * shift <= 225.0:
            direction = -direction
        contrast = rng.uniform(0.4, 0.7) * float(image.std()) / (float(patch[mask].std()) + 1e-6)
        patch = (patch - patch[mask].mean()) * contrast + local + direction * shift
        defect = np.repeat(patch[..., None], 3, axis=-1)
        strength = rng.uniform(0.85, 1.0)
    elif kind == "stain":
        shading = base / max(float(image.mean()), 1.0)
        defect = shading * _random_colour(rng) * 255.0 * rng.uniform(0.6, 0.9)
        strength = rng.uniform(0.7, 0.95)
    elif kind == "scratch":
        level = rng.uniform(215, 255) if rng.random() < 0.5 else rng.uniform(0, 40)
        defect = np.full_like(base, level) + rng.normal(0, 8, size=base.shape[:2])[..., None]
        strength = rng.uniform(0.8, 0.95)
    else:  # "spot": dark hole or bright blotch keeping some of the texture
        gain = rng.uniform(0.15, 0.4) if rng.random() < 0.6 else rng.uniform(1.6, 2.2)
        defect = base * gain
        strength = 1.0

    out = base * (1.0 - strength * alpha[..., None]) + np.clip(defect, 0, 255) * (strength * alpha[..., None])
    diff = np.abs(out - base).mean(axis=-1)[mask].mean()
    if diff < _MIN_VISIBLE_DIFF:  # e.g. a dark spot on an already dark crop: invert the change
        out = base * (1.0 - alpha[..., None]) + (255.0 - base) * alpha[..., None]
    return np.clip(out + 0.5, 0, 255).astype(np.uint8), mask


def make_texture_dataset(
    root: Path,
    textures: Sequence[str] = DEFAULT_TEXTURES,
    image_size: int = 128,
    n_train: int = 40,
    n_test_good: int = 12,
    n_test_defect: int = 12,
    seed: int = 0,
    augment: bool = True,
) -> list[str]:
    """Write MVTec-AD-style texture categories made from scikit-image's real textures.

    Layout per category ``<cat>``: ``train/good/000.png``, ``test/good/*.png``, ``test/defect/*.png`` and
    ``ground_truth/defect/<stem>_mask.png`` (``uint8`` 0/255, single channel). Images are RGB (grey replicated).
    Training crops come from the left 60 % of the source texture and test crops from the rest when it is wide
    enough. Each defect image gets one local defect (foreign texture, colour stain, dark/bright spot or scratch)
    covering 1-10 % of the image.

    Args:
        root: Output root (the ``root`` of ``anomalib.data.MVTecAD``).
        textures: Names of ``skimage.data`` images to use as categories.
        image_size: Side of the square images in pixels.
        n_train: Number of normal training images.
        n_test_good: Number of normal test images.
        n_test_defect: Number of defective test images.
        seed: Random seed; output is deterministic for a given seed.
        augment: Apply random flips and 90° rotations to the crops.

    Returns:
        The category names, in the order given.

    """
    root = Path(root)
    names = list(dict.fromkeys(textures))
    pool = {name: _load_texture(name) for name in dict.fromkeys([*names, *DEFAULT_TEXTURES])}

    for name in names:
        meta = {
            "format_version": _FORMAT_VERSION,
            "kind": "textures",
            "params": {
                "texture": name,
                "image_size": image_size,
                "n_train": n_train,
                "n_test_good": n_test_good,
                "n_test_defect": n_test_defect,
                "seed": seed,
                "augment": augment,
            },
        }

        def write(folder: Path, name: str = name) -> dict[str, int]:
            rng = _rng(seed, name)
            texture = _fit_texture(pool[name], image_size)
            sources = [_fit_texture(img, image_size) for other, img in pool.items() if other != name]
            width = texture.shape[1]
            split = min(max(round(_TRAIN_REGION * width), image_size), width - image_size)
            disjoint = width >= 2 * image_size
            train_range = (0, split) if disjoint else None
            test_range = (split, width) if disjoint else None

            dirs = {key: folder / key for key in ("train/good", "test/good", "test/defect", "ground_truth/defect")}
            for path in dirs.values():
                path.mkdir(parents=True, exist_ok=True)
            for i in range(n_train):
                crop = _random_crop(rng, texture, image_size, train_range, augment)
                Image.fromarray(crop).convert("RGB").save(dirs["train/good"] / f"{i:03d}.png")
            for i in range(n_test_good):
                crop = _random_crop(rng, texture, image_size, test_range, augment)
                Image.fromarray(crop).convert("RGB").save(dirs["test/good"] / f"{i:03d}.png")
            kinds = [_DEFECT_KINDS[i % len(_DEFECT_KINDS)] for i in range(n_test_defect)]
            for i, kind in enumerate(rng.permutation(kinds)):
                crop = _random_crop(rng, texture, image_size, test_range, augment)
                image, mask = _apply_defect(rng, crop, str(kind), sources)
                Image.fromarray(image).save(dirs["test/defect"] / f"{i:03d}.png")
                Image.fromarray(mask.astype(np.uint8) * 255).save(dirs["ground_truth/defect"] / f"{i:03d}_mask.png")
            return {key: _count_pngs(path) for key, path in dirs.items()}

        _build_atomically(root / name, meta, write)
    return names


# --------------------------------------------------------------------------------------------------------------
# ELPV (anomalib Folder layout)
# --------------------------------------------------------------------------------------------------------------


def _elpv_labels() -> tuple[Path, np.ndarray, np.ndarray, np.ndarray]:
    """Read ``elpv_dataset``'s ``labels.csv`` (same parsing as ``elpv_dataset.utils.load_dataset``).

    Returns:
        The data folder, relative image paths, defect probabilities and cell types (``"mono"``/``"poly"``).

    """
    try:
        from elpv_dataset import utils as elpv_utils
    except ImportError as exc:
        msg = "make_elpv_dataset needs the PyPI package 'elpv-dataset': pip install elpv-dataset"
        raise ImportError(msg) from exc
    labels = Path(elpv_utils.__file__).parent / "data" / "labels.csv"
    data = np.genfromtxt(labels, dtype=["|S19", "<f8", "|S4"], names=["path", "probability", "type"])
    return labels.parent, np.char.decode(data["path"]), data["probability"], np.char.decode(data["type"])


def make_elpv_dataset(
    root: Path,
    cell_type: str = "mono",
    image_size: int | None = None,
    train_fraction: float = 0.6,
    seed: int = 0,
    max_images: int | None = None,
) -> Path:
    """Export ELPV solar cells into ``root/elpv_<cell_type>/{train/good,test/good,test/defect}``.

    Normal cells have defect probability 0, defective cells probability 1; the uncertain ones (1/3, 2/3) are
    dropped. A seeded ``train_fraction`` of the normal cells goes to ``train/good``, the rest to ``test/good``.
    Images are 8-bit grey PNGs (300 x 300 unless resized) and keep their original ``cellNNNN`` names.
    Image files are read directly from the package's data folder, so only the selected images are loaded.

    Args:
        root: Output root.
        cell_type: ``"mono"``, ``"poly"`` or ``"all"``.
        image_size: Resize to ``image_size`` x ``image_size`` if given; otherwise copy the originals.
        train_fraction: Fraction of the normal cells used for training.
        seed: Random seed for the split and the subsample.
        max_images: Keep at most this many images per split (seeded subsample), for quick tests.

    Returns:
        The category folder ``root/elpv_<cell_type>``.

    """
    if cell_type not in ("mono", "poly", "all"):
        msg = f"cell_type must be 'mono', 'poly' or 'all', got {cell_type!r}"
        raise ValueError(msg)
    if not 0.0 < train_fraction < 1.0:
        msg = f"train_fraction must be in (0, 1), got {train_fraction}"
        raise ValueError(msg)
    final = Path(root) / f"elpv_{cell_type}"
    meta = {
        "format_version": _FORMAT_VERSION,
        "kind": "elpv",
        "params": {
            "cell_type": cell_type,
            "image_size": image_size,
            "train_fraction": train_fraction,
            "seed": seed,
            "max_images": max_images,
        },
    }

    def write(folder: Path) -> dict[str, int]:
        data_dir, paths, probs, types = _elpv_labels()
        selected = np.ones(len(paths), dtype=bool) if cell_type == "all" else types == cell_type
        normal = paths[selected & (probs == 0.0)]
        defect = paths[selected & (probs == 1.0)]
        rng = _rng(seed, f"elpv_{cell_type}")
        normal = normal[rng.permutation(len(normal))]
        defect = defect[rng.permutation(len(defect))]
        n_train = round(train_fraction * len(normal))
        splits = {"train/good": normal[:n_train], "test/good": normal[n_train:], "test/defect": defect}
        counts = {}
        for split, files in splits.items():
            out_dir = folder / split
            out_dir.mkdir(parents=True, exist_ok=True)
            for rel in sorted(files[:max_images] if max_images is not None else files):
                source = data_dir / rel
                target = out_dir / Path(rel).name
                if image_size is None:
                    shutil.copyfile(source, target)
                else:
                    with Image.open(source) as image:
                        image.convert("L").resize((image_size, image_size), Image.Resampling.BILINEAR).save(target)
            counts[split] = _count_pngs(out_dir)
        return counts

    _build_atomically(final, meta, write)
    return final


# --------------------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------------------


def _print_counts(folder: Path, subdirs: Sequence[str]) -> None:
    """Print the number of PNG files per split of ``folder``."""
    counts = ", ".join(f"{sub}: {_count_pngs(folder / sub)}" for sub in subdirs)
    print(f"{folder}: {counts}")


def main(argv: Sequence[str] | None = None) -> None:
    """Command-line entry point (``python benchmarks/data_generators.py {textures,elpv} ...``)."""
    parser = argparse.ArgumentParser(
        prog="python benchmarks/data_generators.py", description="Write small anomaly-detection datasets."
    )
    commands = parser.add_subparsers(dest="command", required=True)

    tex = commands.add_parser("textures", help="MVTec-AD-style texture categories from scikit-image textures")
    tex.add_argument("--root", type=Path, required=True)
    tex.add_argument("--textures", nargs="+", default=list(DEFAULT_TEXTURES))
    tex.add_argument("--image-size", type=int, default=128)
    tex.add_argument("--n-train", type=int, default=40)
    tex.add_argument("--n-test-good", type=int, default=12)
    tex.add_argument("--n-test-defect", type=int, default=12)
    tex.add_argument("--seed", type=int, default=0)
    tex.add_argument("--no-augment", action="store_true", help="no random flips / 90° rotations")

    elpv = commands.add_parser("elpv", help="ELPV solar cells in an anomalib Folder layout")
    elpv.add_argument("--root", type=Path, required=True)
    elpv.add_argument("--cell-type", choices=["mono", "poly", "all"], default="mono")
    elpv.add_argument("--image-size", type=int, default=None)
    elpv.add_argument("--train-fraction", type=float, default=0.6)
    elpv.add_argument("--seed", type=int, default=0)
    elpv.add_argument("--max-images", type=int, default=None)

    args = parser.parse_args(argv)
    if args.command == "textures":
        names = make_texture_dataset(
            args.root,
            textures=args.textures,
            image_size=args.image_size,
            n_train=args.n_train,
            n_test_good=args.n_test_good,
            n_test_defect=args.n_test_defect,
            seed=args.seed,
            augment=not args.no_augment,
        )
        for name in names:
            _print_counts(args.root / name, ("train/good", "test/good", "test/defect", "ground_truth/defect"))
    else:
        folder = make_elpv_dataset(
            args.root,
            cell_type=args.cell_type,
            image_size=args.image_size,
            train_fraction=args.train_fraction,
            seed=args.seed,
            max_images=args.max_images,
        )
        _print_counts(folder, ("train/good", "test/good", "test/defect"))


if __name__ == "__main__":
    main()
