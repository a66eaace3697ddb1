"""Build an MVTec-layout anomaly-detection set from the Magnetic Tile surface-defect dataset.

The Magnetic Tile dataset (Huang, Qiu, Yuan: "Surface defect saliency of magnetic tile", The Visual Computer
2020; https://github.com/abin24/Magnetic-tile-defect-datasets., free for research use with a citation) holds
1344 grayscale crops of magnetic-tile surfaces: ``MT_Free`` (952 defect-free) and five real defect types
(``MT_Blowhole`` 115, ``MT_Break`` 85, ``MT_Crack`` 57, ``MT_Fray`` 32, ``MT_Uneven`` 103), each image
``Imgs/<stem>.jpg`` with a pixel mask ``Imgs/<stem>.png``. A textured, unaligned surface whose defects range
from a few pixels (blowholes: median mask 0.14 % of the image) to large uneven areas (24 %); the crops vary in
size (about 103-632 x 222-403 px). It was not used to design any GaussFT default: it is a set to check that
the defaults chosen on ELPV, BSData and the textures generalise. This script writes::

    OUT/train/good/<stem>.png                         seeded share (default 70 %) of MT_Free
    OUT/test/good/<stem>.png                          the rest of MT_Free
    OUT/test/<defect>/<stem>.png                      every image of each defect type (lower-case names)
    OUT/ground_truth/<defect>/<stem>_mask.png         its mask, binarised to 0/255

as RGB PNGs (anomalib's ``MVTecAD`` lists ``*.png`` only), every image resized to ``--size`` x ``--size``
(bicubic; masks nearest). One size because anomalib's collate resizes a batch of mixed sizes to its largest
member, so an image's score would depend on its batch-mates; every model squashes to a square input anyway
(224 px here), and 320 keeps more pixels than that. Read it with
``anomalib.data.MVTecAD(root=OUT.parent, category=OUT.name)``.

Command used for ``/work/data/magnetic_tile/magnetic_tile``::

    python benchmarks/make_magnetic_tile.py --repo /work/data/cache/mt_repo \
        --out /work/data/magnetic_tile/magnetic_tile --size 320 --train-fraction 0.7 --seed 0

(``--repo``: the files of https://github.com/abin24/Magnetic-tile-defect-datasets. at commit cc4eb53.)
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

from common import finish_output, partial_output

NORMAL = "MT_Free"


def write_rgb(src: Path, dst: Path, side: int) -> tuple[int, int]:
    """Write one image as a ``side`` x ``side`` RGB PNG; its original size."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    with Image.open(src) as image:
        image.convert("RGB").resize((side, side), Image.Resampling.BICUBIC).save(dst)
        return image.size


def write_mask(src: Path, dst: Path, size: tuple[int, int], side: int) -> float:
    """Write one mask binarised to 0/255 at ``side`` x ``side``; its defect fraction. Raises on a size mismatch."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    with Image.open(src) as mask:
        if mask.size != size:
            msg = f"{src}: mask size {mask.size} != image size {size}"
            raise ValueError(msg)
        binary = np.asarray(mask.convert("L").resize((side, side), Image.Resampling.NEAREST)) > 127
    Image.fromarray((binary * 255).astype(np.uint8)).save(dst)
    return float(binary.mean())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repo", required=True, type=Path, help="files of the Magnetic-tile-defect-datasets repo")
    parser.add_argument("--out", required=True, type=Path, help="category folder to write (MVTec layout)")
    parser.add_argument("--size", type=int, default=320, help="side of the square images written")
    parser.add_argument("--train-fraction", type=float, default=0.7, help="share of MT_Free for training")
    parser.add_argument("--seed", type=int, default=0, help="seed of the normal train/test split")
    parser.add_argument("--force", action="store_true", help="overwrite an existing output folder")
    args = parser.parse_args(argv)

    normals = sorted((args.repo / NORMAL / "Imgs").glob("*.jpg"))
    defect_dirs = sorted(p for p in args.repo.glob("MT_*") if p.is_dir() and p.name != NORMAL)
    if not normals or not defect_dirs:
        parser.error(f"{args.repo} has no {NORMAL}/Imgs/*.jpg or no other MT_* folder")
    try:
        tmp = partial_output(args.out, args.force)
    except FileExistsError as error:
        parser.error(str(error))

    order = np.random.default_rng(args.seed).permutation(len(normals))
    n_train = round(args.train_fraction * len(normals))
    for rank, index in enumerate(order):
        split = "train" if rank < n_train else "test"
        write_rgb(normals[index], tmp / split / "good" / f"{normals[index].stem}.png", args.size)

    defects: dict[str, dict] = {}
    for folder in defect_dirs:
        name = folder.name.removeprefix("MT_").lower()
        fractions = []
        for image in sorted((folder / "Imgs").glob("*.jpg")):
            size = write_rgb(image, tmp / "test" / name / f"{image.stem}.png", args.size)
            mask = image.with_suffix(".png")
            if not mask.is_file():
                msg = f"{image}: no mask {mask.name} beside it"
                raise FileNotFoundError(msg)
            fractions.append(write_mask(mask, tmp / "ground_truth" / name / f"{image.stem}_mask.png", size, args.size))
        defects[name] = {"n": len(fractions), "mask_fraction_median": float(np.median(fractions))}
    meta = {
        "source": "https://github.com/abin24/Magnetic-tile-defect-datasets. (research use, cite Huang et al. 2020)",
        "n_train_good": n_train,
        "n_test_good": len(normals) - n_train,
        "defects": defects,
        "size": args.size,
        "train_fraction": args.train_fraction,
        "seed": args.seed,
    }
    finish_output(tmp, args.out, meta)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
