"""Checks of the input images before GaussFT uses them.

anomalib's loader (``read_image``: PIL ``Image.open(path).convert("RGB")``) fails deep inside a
DataLoader on the first unreadable file, and for truncated files PIL's message does not name the file.
Worse, it silently clips 16-bit and float images to 0..255. GaussFT therefore decodes every image it
will read once before fitting (and testing) and raises one error that lists each unusable file and why.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Subset

from anomalib_gaussft.errors import GaussFTUserError

# Modes whose values PIL's convert("RGB") clips to 0..255 (and truncates to integers) instead of rescaling.
HIGH_BIT_DEPTH_MODES = frozenset({"I", "I;16", "I;16L", "I;16B", "I;16N", "F"})
MIN_TRAINING_IMAGES = 2


class UnusableImagesError(GaussFTUserError, ValueError):
    """Image files that cannot be read, or that anomalib's loader would damage; ``problems`` maps path → reason."""

    def __init__(self, problems: dict[str, str], where: str) -> None:
        self.problems = dict(problems)
        listing = "\n".join(f"  {path}: {reason}" for path, reason in self.problems.items())
        super().__init__(
            f"{len(self.problems)} unusable image file(s) in the {where}:\n{listing}\n"
            "Remove, replace or convert these files (see docs/limits.md)."
        )


def _clipping_problem(image: Image.Image) -> str | None:
    """Why converting a high-bit-depth image to 8-bit RGB would lose its values, or ``None``."""
    values = np.asarray(image)
    low, high = float(values.min()), float(values.max())
    integral = values.dtype.kind != "f" or bool(np.array_equal(values, np.floor(values)))
    if low >= 0 and high <= 255 and integral:
        return None
    return (
        f"{image.mode} image with values {low:g}..{high:g}: anomalib's loader (PIL convert('RGB')) clips them to "
        "0..255 instead of rescaling, which destroys the image; convert it to 8 bits first "
        "(e.g. scale the sensor's range to 0..255)"
    )


def image_problem(path: str | Path) -> str | None:
    """Why anomalib's loader cannot use the image at ``path`` faithfully, or ``None`` if it can."""
    try:
        if os.path.getsize(path) == 0:
            return "empty file (0 bytes)"
        with Image.open(path) as image:
            image.load()  # decodes every pixel: truncated files pass Image.open but fail here
            return _clipping_problem(image) if image.mode in HIGH_BIT_DEPTH_MODES else None
    except Exception as err:  # noqa: BLE001 - whatever PIL raises, anomalib's loader would raise it too
        return f"cannot be read ({type(err).__name__}: {err})"


def find_unusable_images(paths: Iterable[str | Path]) -> dict[str, str]:
    """``{path: reason}`` for every unusable image among ``paths`` (decoded in a few threads)."""
    unique = list(dict.fromkeys(str(p) for p in paths))
    if not unique:
        return {}
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1, len(unique))) as pool:
        reasons = list(pool.map(image_problem, unique))
    return {path: reason for path, reason in zip(unique, reasons, strict=True) if reason is not None}


def check_images(paths: Iterable[str | Path], where: str) -> None:
    """Raise :class:`UnusableImagesError` listing every unusable image among ``paths``."""
    problems = find_unusable_images(paths)
    if problems:
        raise UnusableImagesError(problems, where)


def dataset_image_paths(dataset: Any) -> list[str] | None:  # noqa: ANN401 - any map-style dataset
    """Image paths of an anomalib dataset without reading any image (``None`` if it does not list them)."""
    if dataset is None:
        return None
    samples = getattr(dataset, "samples", None)
    if samples is not None and "image_path" in samples:
        return [str(p) for p in samples["image_path"]]
    filenames = getattr(dataset, "image_filenames", None)  # anomalib's PredictDataset
    if filenames is not None:
        return [str(p) for p in filenames]
    if isinstance(dataset, Subset):
        parent = dataset_image_paths(dataset.dataset)
        return None if parent is None else [parent[i] for i in dataset.indices]
    return None


def check_training_set_size(paths: Sequence[str], where: str) -> None:
    """Raise a ``ValueError`` when fewer than 2 training images are given (a Gaussian needs 2)."""
    if len(paths) >= MIN_TRAINING_IMAGES:
        return
    if not paths:
        msg = f"The training set is empty ({where}): GaussFT needs at least {MIN_TRAINING_IMAGES} normal training "
        msg += "images to fit its Gaussians."
    else:
        msg = f"GaussFT needs at least {MIN_TRAINING_IMAGES} normal training images to fit its Gaussians; the "
        msg += f"training set ({where}) has {len(paths)}: {', '.join(paths)}."
    raise ValueError(msg)


def non_finite_features_error(image_paths: Sequence[str], images: torch.Tensor) -> FloatingPointError:
    """The error for NaN/Inf features: names the batch's images with NaN/Inf pixels, else blames the backbone."""
    bad = (~torch.isfinite(images.detach().flatten(1)).all(1)).tolist()
    named = [str(p) for p, is_bad in zip(image_paths, bad, strict=True) if is_bad]
    if named:
        msg = f"NaN/Inf pixel values after pre-processing in {named}: check these files and the pre-processor "
        msg += "or augmentations."
    else:
        msg = f"The backbone produced NaN/Inf features from the finite images {[str(p) for p in image_paths]}: its "
        msg += "weights are probably no longer finite (a diverged fine-tuning: lower learning_rate)."
    return FloatingPointError(msg)


def check_finite(features: dict[int, torch.Tensor], paths: Sequence[Any] | None, images: torch.Tensor) -> None:
    """Raise an error naming the images (or blaming the backbone) when features hold NaN/Inf."""
    if not all(torch.isfinite(f).all() for f in features.values()):
        names = [str(p) for p in paths] if paths is not None else [f"image {i}" for i in range(len(images))]
        raise non_finite_features_error(names, images)


def check_fit_data(datamodule: Any) -> None:  # noqa: ANN401 - an anomalib datamodule, or None
    """Before fitting: every training/validation image usable and at least 2 training images.

    Checks nothing without a datamodule (plain dataloaders are only set up after ``on_fit_start``) or when its
    datasets do not list their image paths.
    """
    train_paths = dataset_image_paths(getattr(datamodule, "train_data", None))
    if train_paths is None:
        return
    val_paths = dataset_image_paths(getattr(datamodule, "val_data", None)) or []
    check_images([*train_paths, *val_paths], "training/validation data")
    where = ", ".join(
        f"{key}={getattr(datamodule, key)}"
        for key in ("root", "category", "normal_dir")
        if getattr(datamodule, key, None) is not None
    )
    check_training_set_size(train_paths, f"{type(datamodule).__name__}({where})")


def check_dataloaders(dataloaders: Any, where: str) -> None:  # noqa: ANN401 - a DataLoader, a list of them or None
    """Check the images of every dataloader whose dataset lists its image paths."""
    loaders = dataloaders if isinstance(dataloaders, list | tuple) else [dataloaders]
    groups = [dataset_image_paths(getattr(loader, "dataset", None)) for loader in loaders]
    check_images([path for group in groups if group for path in group], where)


def skip_unusable_images(dataloaders: Any) -> dict[str, str]:  # noqa: ANN401 - a DataLoader, a list of them or None
    """Drop unreadable images from the datasets of ``dataloaders`` (before predicting); ``{path: reason}`` of each.

    Handles anomalib's ``PredictDataset`` (``image_filenames``) and its datasets (``samples``); other datasets are
    left as they are.
    """
    skipped: dict[str, str] = {}
    for loader in dataloaders if isinstance(dataloaders, list | tuple) else [dataloaders]:
        dataset = getattr(loader, "dataset", None)
        problems = find_unusable_images(dataset_image_paths(dataset) or [])
        if not problems:
            continue
        if isinstance(getattr(dataset, "image_filenames", None), list):
            dataset.image_filenames = [p for p in dataset.image_filenames if str(p) not in problems]
        elif getattr(dataset, "samples", None) is not None:
            dataset.samples = dataset.samples[~dataset.samples["image_path"].astype(str).isin(problems)]
        else:
            continue
        skipped.update(problems)
    return skipped
