"""Build an MVTec-layout anomaly-detection set from BSData (ball-screw drive surfaces, real pitting).

BSData (Schlagenhauf & Landwehr, https://github.com/2Obe/BSData, CC BY-SA 4.0) holds 1104 RGB photographs of
ball-screw drive spindles (``data/*.jpg``) and labelme polygon annotations of "pitting" for 394 of them
(``label/<stem>.json``). The images without an annotation are presumed normal (small pits may hide in
them: the labels are not exhaustive by construction). Images come in many sizes from two screw types; this
script keeps **one image size** (default: the most common one, 1130 x 460 px, 855 images: 688 unannotated,
167 annotated) so the set is one product view, and writes::

    OUT/train/good/<stem>.png                   seeded share (default 70 %) of the presumed-normal images
    OUT/test/good/<stem>.png                    the other presumed-normal images
    OUT/test/defect/<stem>.png                  every annotated image of that size
    OUT/ground_truth/defect/<stem>_mask.png     its polygons rasterised at full size (0/255), then resized
                                                with nearest neighbour like the image

PNG everywhere (anomalib's ``MVTecAD`` lists ``*.png`` only). ``--max-side`` downscales every image
(bicubic/antialiased) so its longer side is at most that many pixels; masks are resized with nearest
neighbour to the same size. The default 560 keeps 228 rows of a 1130 x 460 image, i.e. at least the 224
rows a 224-px model sees after its square resize.

Read it with ``anomalib.data.MVTecAD(root=OUT.parent, category=OUT.name)``.

Command used for ``/work/data/bsdata/bsdata``::

    python benchmarks/make_bsdata.py --repo /work/data/cache/BSData_repo --out /work/data/bsdata/bsdata \
        --max-side 560 --train-fraction 0.7 --seed 0 --done /work/data/bsdata/DONE

(``--repo`` is a checkout of https://github.com/2Obe/BSData, commit 7204b28.)
"""

from __future__ import annotations

import argparse
import collections
import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from common import partial_output


def rasterise(label_file: Path, size: tuple[int, int]) -> Image.Image:
    """Union of the labelme polygons (every shape; BSData has only 'Pitting' polygons) as an L-mode 0/255 mask."""
    record = json.loads(label_file.read_text())
    mask = Image.new("L", size, 0)
    draw = ImageDraw.Draw(mask)
    for shape in record["shapes"]:
        points = [tuple(map(float, p)) for p in shape["points"]]
        kind = shape.get("shape_type", "polygon")
        if kind == "polygon" and len(points) >= 3:
            draw.polygon(points, fill=255, outline=255)
        elif kind == "rectangle" and len(points) == 2:
            draw.rectangle([points[0], points[1]], fill=255, outline=255)
        elif kind == "circle" and len(points) == 2:
            (cx, cy), (px, py) = points
            r = float(np.hypot(px - cx, py - cy))
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255, outline=255)
        else:
            msg = f"{label_file}: unsupported shape {kind!r} with {len(points)} points"
            raise ValueError(msg)
    return mask


def target_size(size: tuple[int, int], max_side: int | None) -> tuple[int, int]:
    width, height = size
    if not max_side or max(width, height) <= max_side:
        return width, height
    scale = max_side / max(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repo", required=True, type=Path, help="checkout of github.com/2Obe/BSData")
    parser.add_argument("--out", required=True, type=Path, help="category folder to write (MVTec layout)")
    parser.add_argument(
        "--size", default=None, help="keep images of this WxH only (default: the most common size, 1130x460)"
    )
    parser.add_argument("--max-side", type=int, default=560, help="downscale so the longer side is <= this (0: no)")
    parser.add_argument("--train-fraction", type=float, default=0.7, help="share of presumed normals for training")
    parser.add_argument("--seed", type=int, default=0, help="seed of the normal train/test split")
    parser.add_argument("--done", type=Path, default=None, help="touch this file when complete")
    parser.add_argument("--force", action="store_true", help="overwrite an existing output folder")
    args = parser.parse_args(argv)

    images = sorted((args.repo / "data").glob("*.jpg"))
    labels = {p.stem: p for p in (args.repo / "label").glob("*.json")}
    if not images or not labels:
        parser.error(f"{args.repo} has no data/*.jpg or label/*.json")
    sizes: dict[Path, tuple[int, int]] = {}
    for path in images:
        with Image.open(path) as image:
            sizes[path] = image.size
    counts = collections.Counter(sizes.values())
    if args.size:
        width, height = (int(v) for v in args.size.lower().split("x"))
        keep_size = (width, height)
    else:
        keep_size = counts.most_common(1)[0][0]
    kept = [p for p in images if sizes[p] == keep_size]
    normals = [p for p in kept if p.stem not in labels]
    defects = [p for p in kept if p.stem in labels]
    missing = sorted(set(labels) - {p.stem for p in images})
    rng = np.random.default_rng(args.seed)
    order = rng.permutation(len(normals))
    n_train = round(args.train_fraction * len(normals))
    train = sorted(normals[i] for i in order[:n_train])
    test_good = sorted(normals[i] for i in order[n_train:])

    try:
        tmp = partial_output(args.out, args.force)
    except FileExistsError as error:
        parser.error(str(error))
    out_size = target_size(keep_size, args.max_side)

    def write_image(src: Path, dst: Path) -> None:
        dst.parent.mkdir(parents=True, exist_ok=True)
        with Image.open(src) as image:
            image = image.convert("RGB")
            if image.size != out_size:
                image = image.resize(out_size, Image.Resampling.BICUBIC, reducing_gap=None)
            image.save(dst)

    mask_fractions = []
    for path in train:
        write_image(path, tmp / "train" / "good" / f"{path.stem}.png")
    for path in test_good:
        write_image(path, tmp / "test" / "good" / f"{path.stem}.png")
    for path in defects:
        write_image(path, tmp / "test" / "defect" / f"{path.stem}.png")
        record = json.loads(labels[path.stem].read_text())
        if (record.get("imageWidth"), record.get("imageHeight")) not in ((None, None), keep_size):
            msg = f"{labels[path.stem]}: annotation size {record['imageWidth']}x{record['imageHeight']} != image"
            raise ValueError(msg)
        mask = rasterise(labels[path.stem], keep_size)
        if mask.size != out_size:
            mask = mask.resize(out_size, Image.Resampling.NEAREST)
        mask_fractions.append(float((np.asarray(mask) > 127).mean()))
        dst = tmp / "ground_truth" / "defect" / f"{path.stem}_mask.png"
        dst.parent.mkdir(parents=True, exist_ok=True)
        mask.save(dst)
    meta = {
        "source": "https://github.com/2Obe/BSData (CC BY-SA 4.0)",
        "kept_size": list(keep_size),
        "output_size": list(out_size),
        "sizes_in_repo": {f"{w}x{h}": n for (w, h), n in counts.most_common()},
        "n_train_good": len(train),
        "n_test_good": len(test_good),
        "n_test_defect": len(defects),
        "labels_without_image": missing,
        "defect_mask_fraction": {
            "mean": float(np.mean(mask_fractions)),
            "median": float(np.median(mask_fractions)),
            "min": float(np.min(mask_fractions)),
            "max": float(np.max(mask_fractions)),
        },
        "train_fraction": args.train_fraction,
        "seed": args.seed,
        "max_side": args.max_side,
        "note": "unannotated images are presumed normal; small pits may be unlabelled",
    }
    (tmp / "bsdata_meta.json").write_text(json.dumps(meta, indent=1))
    tmp.rename(args.out)
    print(json.dumps(meta, indent=1))
    if args.done:
        args.done.parent.mkdir(parents=True, exist_ok=True)
        args.done.touch()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
