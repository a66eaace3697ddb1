"""Build an MVTec-layout anomaly-detection set from KolektorSDD (electrical commutators, real surface cracks).

KolektorSDD (Tabernik, Šela, Skvarč, Skočaj: "Segmentation-based deep-learning approach for surface-defect
detection", J. Intell. Manuf. 2020; CC BY-NC-SA 4.0, research use) holds 399 grayscale images, about
500 x 1240-1280 px, of the plastic embedding of 50 commutators: 347 defect-free and 52 with real cracks, each
with a pixel mask. The public GitHub copy used here, https://github.com/stoy95536/KolektorSDD_Yolov8_Datasets
(commit 81e5cf3), keeps the original JPEGs and stores every mask as YOLO segmentation polygons (the external
contours of the original mask, coordinates normalised to the image size; an empty label file for a
defect-free image). This script rasterises the polygons back to masks at the original size and writes::

    OUT/train/good/<id>.png                   seeded share (default 70 %) of the defect-free images
    OUT/test/good/<id>.png                    the rest of them
    OUT/test/crack/<id>.png                   every image with a defect
    OUT/ground_truth/crack/<id>_mask.png      its mask, 0/255

as RGB PNGs of one size (``--width`` x ``--height``, default 256 x 640: bicubic, masks nearest), because
anomalib's collate resizes a batch of mixed sizes to its largest member, so an image's score would depend on
its batch-mates. Every model squashes them to its square input (224 px here). Read it with
``anomalib.data.MVTecAD(root=OUT.parent, category=OUT.name)``.

It was added after every GaussFT default was chosen and is used only to check that they generalise.

Command used for ``/work/data/kolektorsdd/kolektorsdd``::

    python benchmarks/make_kolektorsdd.py --repo /work/data/cache/ksdd_repo --out /work/data/kolektorsdd/kolektorsdd

(``--repo``: the files of that repository, e.g. ``git archive 81e5cf3 | tar -x -C REPO``.)
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from common import finish_output, partial_output


def read_polygons(label: Path, size: tuple[int, int]) -> list[list[tuple[float, float]]]:
    """YOLO segmentation polygons of one label file, in pixels of an image of ``size`` (w, h)."""
    polygons = []
    for number, line in enumerate(label.read_text().splitlines(), start=1):
        values = line.split()
        if not values:
            continue
        coords = [float(v) for v in values[1:]]
        if len(coords) < 6 or len(coords) % 2:
            msg = f"{label}:{number}: a polygon needs an even number (>= 6) of coordinates, got {len(coords)}"
            raise ValueError(msg)
        polygons.append([(x * size[0], y * size[1]) for x, y in zip(coords[::2], coords[1::2], strict=True)])
    return polygons


def rasterise(polygons: list[list[tuple[float, float]]], size: tuple[int, int]) -> Image.Image:
    """A 0/255 mask of ``size`` with the polygons filled (their outlines included)."""
    mask = Image.new("L", size, 0)
    draw = ImageDraw.Draw(mask)
    for polygon in polygons:
        draw.polygon(polygon, fill=255, outline=255)
    return mask


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repo", required=True, type=Path, help="files of the KolektorSDD_Yolov8_Datasets repo")
    parser.add_argument("--out", required=True, type=Path, help="category folder to write (MVTec layout)")
    parser.add_argument("--width", type=int, default=256, help="width of the images written")
    parser.add_argument("--height", type=int, default=640, help="height of the images written")
    parser.add_argument("--train-fraction", type=float, default=0.7, help="share of defect-free images for training")
    parser.add_argument("--seed", type=int, default=0, help="seed of the normal train/test split")
    parser.add_argument("--force", action="store_true", help="overwrite an existing output folder")
    args = parser.parse_args(argv)

    images = sorted((args.repo / "Datasets" / "images").glob("*/*.jpg"))
    if not images:
        parser.error(f"{args.repo} has no Datasets/images/*/*.jpg")
    normals, defects = [], []
    for image in images:
        label = args.repo / "Datasets" / "labels" / image.parent.name / f"{image.stem}.txt"
        if not label.is_file():
            parser.error(f"{image}: no label file {label}")
        (defects if label.read_text().strip() else normals).append((image, label))
    try:
        tmp = partial_output(args.out, args.force)
    except FileExistsError as error:
        parser.error(str(error))

    size = (args.width, args.height)

    def write(image: Path, dst: Path) -> tuple[int, int]:
        dst.parent.mkdir(parents=True, exist_ok=True)
        with Image.open(image) as source:
            source.convert("RGB").resize(size, Image.Resampling.BICUBIC).save(dst)
            return source.size

    def name(image: Path) -> str:
        return f"{image.parent.name}_{image.stem}"

    order = np.random.default_rng(args.seed).permutation(len(normals))
    n_train = round(args.train_fraction * len(normals))
    for rank, index in enumerate(order):
        image = normals[index][0]
        write(image, tmp / ("train" if rank < n_train else "test") / "good" / f"{name(image)}.png")
    fractions = []
    for image, label in defects:
        original = write(image, tmp / "test" / "crack" / f"{name(image)}.png")
        mask = rasterise(read_polygons(label, original), original).resize(size, Image.Resampling.NEAREST)
        (tmp / "ground_truth" / "crack").mkdir(parents=True, exist_ok=True)
        mask.save(tmp / "ground_truth" / "crack" / f"{name(image)}_mask.png")
        fractions.append(float((np.asarray(mask) > 127).mean()))
    meta = {
        "source": "https://github.com/stoy95536/KolektorSDD_Yolov8_Datasets (KolektorSDD, CC BY-NC-SA 4.0)",
        "n_train_good": n_train,
        "n_test_good": len(normals) - n_train,
        "n_test_crack": len(defects),
        "mask_fraction_median": float(np.median(fractions)),
        "size": list(size),
        "train_fraction": args.train_fraction,
        "seed": args.seed,
    }
    finish_output(tmp, args.out, meta)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
