"""Build an MVTec-layout anomaly-detection set from DeepPCB (aligned PCB scans, template vs tested image).

DeepPCB (Tang, He, Xu, Hu, Zhang: "Online PCB defect detector on a new PCB defect dataset", arXiv 2019;
https://github.com/tangsanli5201/DeepPCB, MIT licence, research use) holds 1500 pairs of 640 x 640 binarised
crops of linear-scan CCD images of printed circuit boards: a defect-free template and the aligned tested image
of the same place, with 3-12 defects per tested image (open, short, mousebite, spur, spurious copper, pin hole;
real ones plus ones drawn in "according to the PCB defect patterns") annotated as axis-aligned boxes. This
script keeps the dataset's own split (``trainval.txt`` 1000 pairs, ``test.txt`` 500) and writes::

    OUT/train/good/<id>.png                   the template of every trainval pair
    OUT/test/good/<id>.png                    the template of ``--test-pairs`` seeded test pairs
    OUT/test/defect/<id>.png                  the tested image of the same pairs
    OUT/ground_truth/defect/<id>_mask.png     its boxes filled, 0/255

as RGB PNGs of ``--size`` x ``--size`` (bicubic; masks nearest). Each test template and its tested image
differ only by the defects, so every score difference between them is the defects'. The masks are boxes, so
pixel AUROC counts the box around a thin defect as defect: it favours no model, but it is lower than
with exact masks. Read it with ``anomalib.data.MVTecAD(root=OUT.parent, category=OUT.name)``.

It was added after every GaussFT default was chosen and is used only to check that they generalise.

Command used for ``/work/data/deeppcb/deeppcb``::

    python benchmarks/make_deeppcb.py --repo /work/data/cache/deeppcb_repo --out /work/data/deeppcb/deeppcb

(``--repo``: the files of that repository at commit 08e98c4, e.g. ``git archive HEAD | tar -x -C REPO``.)
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from common import finish_output, partial_output


def read_pairs(list_file: Path) -> list[tuple[Path, Path]]:
    """(image stem path, annotation path) of each line ``groupX/X/<id>.jpg groupX/X_not/<id>.txt``."""
    pairs = []
    for number, line in enumerate(list_file.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.split()
        if len(fields) != 2:
            msg = f"{list_file}:{number}: expected '<image> <annotation>', got {line!r}"
            raise ValueError(msg)
        image, annotation = (list_file.parent / field for field in fields)
        pairs.append((image.with_suffix(""), annotation))
    return pairs


def read_boxes(annotation: Path) -> list[tuple[int, int, int, int]]:
    """The ``x1 y1 x2 y2 type`` boxes of one annotation file (commas or spaces)."""
    boxes = []
    for number, line in enumerate(annotation.read_text().splitlines(), start=1):
        values = line.replace(",", " ").split()
        if not values:
            continue
        if len(values) != 5:
            msg = f"{annotation}:{number}: expected 'x1 y1 x2 y2 type', got {line!r}"
            raise ValueError(msg)
        x1, y1, x2, y2 = (int(v) for v in values[:4])
        boxes.append((x1, y1, x2, y2))
    return boxes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repo", required=True, type=Path, help="files of the DeepPCB repository")
    parser.add_argument("--out", required=True, type=Path, help="category folder to write (MVTec layout)")
    parser.add_argument("--size", type=int, default=320, help="side of the square images written")
    parser.add_argument("--test-pairs", type=int, default=250, help="test pairs drawn from test.txt (seeded)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the test-pair draw")
    parser.add_argument("--force", action="store_true", help="overwrite an existing output folder")
    args = parser.parse_args(argv)

    data = args.repo / "PCBData"
    if not (data / "trainval.txt").is_file() or not (data / "test.txt").is_file():
        parser.error(f"{args.repo} has no PCBData/trainval.txt and PCBData/test.txt")
    train, test = read_pairs(data / "trainval.txt"), read_pairs(data / "test.txt")
    if args.test_pairs > len(test):
        parser.error(f"--test-pairs {args.test_pairs} > {len(test)} pairs in test.txt")
    test = [test[i] for i in sorted(np.random.default_rng(args.seed).permutation(len(test))[: args.test_pairs])]
    try:
        tmp = partial_output(args.out, args.force)
    except FileExistsError as error:
        parser.error(str(error))

    side = (args.size, args.size)

    def write(src: Path, dst: Path) -> tuple[int, int]:
        if not src.is_file():
            msg = f"{src}: listed in the split but missing"
            raise FileNotFoundError(msg)
        dst.parent.mkdir(parents=True, exist_ok=True)
        with Image.open(src) as image:
            image.convert("RGB").resize(side, Image.Resampling.BICUBIC).save(dst)
            return image.size

    for stem, _ in train:
        write(stem.with_name(f"{stem.name}_temp.jpg"), tmp / "train" / "good" / f"{stem.name}.png")
    fractions = []
    for stem, annotation in test:
        write(stem.with_name(f"{stem.name}_temp.jpg"), tmp / "test" / "good" / f"{stem.name}.png")
        size = write(stem.with_name(f"{stem.name}_test.jpg"), tmp / "test" / "defect" / f"{stem.name}.png")
        mask = Image.new("L", size, 0)
        draw = ImageDraw.Draw(mask)
        for box in read_boxes(annotation):
            draw.rectangle(box, fill=255)
        mask = mask.resize(side, Image.Resampling.NEAREST)
        (tmp / "ground_truth" / "defect").mkdir(parents=True, exist_ok=True)
        mask.save(tmp / "ground_truth" / "defect" / f"{stem.name}_mask.png")
        fractions.append(float((np.asarray(mask) > 127).mean()))
    meta = {
        "source": "https://github.com/tangsanli5201/DeepPCB (MIT licence, research use)",
        "n_train_good": len(train),
        "n_test_good": len(test),
        "n_test_defect": len(test),
        "mask_fraction_median": float(np.median(fractions)),
        "size": args.size,
        "seed": args.seed,
    }
    finish_output(tmp, args.out, meta)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
