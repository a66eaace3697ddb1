"""Score images with an exported anomaly model and write scores and heatmap overlays.

Works with any anomalib export (GaussFT or not): an OpenVINO IR ``.xml``, an ``.onnx``
file (run by OpenVINO, which reads ONNX directly) or a torch ``model.pt`` from
``anomalib export --export_type torch`` / ``Engine.export``. The exported graph
holds the whole pipeline (resize + normalisation, model, score normalisation and
thresholds), so the outputs are the normalised ``pred_score`` in ``[0, 1]``
(threshold at 0.5), ``pred_label``, ``anomaly_map`` and ``pred_mask``.

Usage::

    anomalib-gaussft-infer --model results/weights/openvino/model.xml --input images/ --output out/
    python -m anomalib_gaussft.infer ...   # the same

Writes ``OUTPUT/scores.csv`` (``image_path, pred_score, pred_label``) and, per image,
``OUTPUT/heatmaps/<stem>.png``: the image with the anomaly map blended over it (JET
colours, 50 %) and the contour of the predicted mask. Images of a folder keep their
sub-folder below ``heatmaps/`` so that ``good/000.png`` and ``crack/000.png`` do not
overwrite each other. OpenVINO's compiled-model cache goes to ``OUTPUT/openvino_cache``
instead of the current directory. Images that cannot be read (corrupt, empty, truncated) or scored are
skipped, named on stderr and listed in ``OUTPUT/skipped_images.csv`` (``image_path, reason``); every other
image is scored. Exit status: 0 when every image was scored, 1 when some were skipped, 2 for a bad model or
arguments.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import os
import pickle
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

__all__ = [
    "IMAGE_SUFFIXES",
    "Prediction",
    "find_images",
    "load_inferencer",
    "main",
    "predict",
    "render_overlay",
    "static_input_size",
]

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"})
OPENVINO_SUFFIXES = frozenset({".xml", ".onnx"})
TORCH_SUFFIXES = frozenset({".pt", ".pth"})
_TORCH_DEVICES = {"CPU": "cpu", "GPU": "cuda", "CUDA": "cuda", "XPU": "xpu", "AUTO": "auto"}


class ModelLoadError(RuntimeError):
    """The model file cannot be used (missing, wrong format, untrusted pickle)."""


class _Inferencer(Protocol):
    def predict(self, image: torch.Tensor) -> Any: ...  # noqa: ANN401


@dataclass
class Prediction:
    """Predictions for one image, as numpy arrays at the model's resolution."""

    pred_score: float
    pred_label: bool | None
    anomaly_map: np.ndarray | None  # (h, w), normalised: 0.5 is the pixel threshold
    pred_mask: np.ndarray | None  # (h, w) bool


@contextlib.contextmanager
def _working_directory(path: Path) -> Iterator[None]:
    """Temporarily change the working directory (``contextlib.chdir`` needs Python 3.11)."""
    previous = Path.cwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(previous)


@contextlib.contextmanager
def _trusted_pickle() -> Iterator[None]:
    """Set ``TRUST_REMOTE_CODE=1`` for anomalib's ``TorchInferencer`` only while it loads."""
    previous = os.environ.get("TRUST_REMOTE_CODE")
    os.environ["TRUST_REMOTE_CODE"] = "1"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("TRUST_REMOTE_CODE", None)
        else:
            os.environ["TRUST_REMOTE_CODE"] = previous


def load_inferencer(
    model_path: Path,
    device: str = "CPU",
    precision: str = "f32",
    trust_remote_code: bool = False,
    cache_dir: Path | None = None,
) -> _Inferencer:
    """Load an anomalib ``OpenVINOInferencer`` (``.xml``/``.onnx``) or ``TorchInferencer`` (``.pt``).

    Args:
        model_path: Exported model file.
        device: OpenVINO device (``CPU``, ``GPU``, ``AUTO``...); for torch models ``CPU``/``GPU``/``AUTO``.
        precision: ``"f32"`` runs OpenVINO in float32; ``"auto"`` keeps its default, which is bfloat16 on
            CPUs with AVX512-BF16/AMX (faster, scores differ by up to ~1e-2).
        trust_remote_code: Allow unpickling a torch ``.pt`` export (it can run arbitrary code).
        cache_dir: Working directory while OpenVINO compiles (it writes ``openvino_cache/`` there).

    Raises:
        ModelLoadError: If the file is missing, has an unknown suffix or is an untrusted pickle.

    """
    model_path = model_path.resolve()
    if not model_path.is_file():
        msg = f"Model file not found: '{model_path}'."
        raise ModelLoadError(msg)
    suffix = model_path.suffix.lower()
    if suffix in OPENVINO_SUFFIXES:
        from anomalib.deploy import OpenVINOInferencer

        config = (
            {"INFERENCE_PRECISION_HINT": "f32"} if precision == "f32" and device.upper() in {"CPU", "GPU"} else None
        )
        with _working_directory(cache_dir) if cache_dir is not None else contextlib.nullcontext():
            try:
                return OpenVINOInferencer(path=model_path, device=device, config=config)
            except RuntimeError as error:  # OpenVINO reports unreadable/incomplete models as RuntimeError
                hint = (
                    " (an ONNX export keeps its weights in 'model.onnx.data' next to it)" if suffix == ".onnx" else ""
                )
                msg = f"OpenVINO could not load '{model_path}'{hint}: {error}"
                raise ModelLoadError(msg) from error
    if suffix in TORCH_SUFFIXES:
        if not trust_remote_code:
            msg = (
                f"'{model_path}' is a pickled torch export: loading it can execute arbitrary code. "
                "Pass --trust-remote-code if you trust where it comes from, or use an OpenVINO (.xml) or ONNX "
                "export instead."
            )
            raise ModelLoadError(msg)
        from anomalib.deploy import TorchInferencer

        torch_device = _TORCH_DEVICES.get(device.upper(), device.lower())
        with _trusted_pickle():
            try:
                return TorchInferencer(path=model_path, device=torch_device)
            except (KeyError, ValueError, RuntimeError, AttributeError, ImportError, pickle.UnpicklingError) as error:
                msg = f"Could not load the torch export '{model_path}': {type(error).__name__}: {error}"
                raise ModelLoadError(msg) from error
    msg = (
        f"Unsupported model file '{model_path}': expected an OpenVINO .xml, an .onnx or a torch .pt export "
        "(anomalib export --export_type openvino|onnx|torch)."
    )
    raise ModelLoadError(msg)


def find_images(path: Path) -> list[Path]:
    """The image itself, or every image below a folder (recursive, sorted)."""
    if path.is_file():
        return [path]
    if path.is_dir():
        return sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    msg = f"Input not found: '{path}'."
    raise FileNotFoundError(msg)


def read_image(path: Path) -> Image.Image:
    """Read an image as RGB, raising ``OSError`` with the file name if it cannot be decoded."""
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as error:
        msg = f"cannot read image '{path}' ({type(error).__name__}: not an image file, or corrupt)"
        raise OSError(msg) from error


def _to_numpy(value: Any) -> np.ndarray | None:  # noqa: ANN401 - torch tensor or numpy array
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    return np.asarray(value)


def _as_2d(array: np.ndarray | None) -> np.ndarray | None:
    if array is None:
        return None
    array = np.squeeze(array)
    if array.ndim != 2:
        msg = f"expected a single-channel map, got shape {array.shape}"
        raise ValueError(msg)
    return array


def static_input_size(inferencer: _Inferencer) -> tuple[int, int] | None:
    """``(height, width)`` of an OpenVINO model exported with a fixed ``input_size``, else ``None``."""
    blob = getattr(inferencer, "input_blob", None)
    if blob is None:
        return None
    shape = blob.partial_shape
    if shape.rank.is_dynamic or len(shape) != 4 or not (shape[2].is_static and shape[3].is_static):
        return None
    return shape[2].get_length(), shape[3].get_length()


def predict(inferencer: _Inferencer, image: Image.Image, input_size: tuple[int, int] | None = None) -> Prediction:
    """Run one RGB image through the inferencer, resized first if the model has a fixed ``input_size``."""
    if input_size is not None and image.size != (input_size[1], input_size[0]):
        image = image.resize((input_size[1], input_size[0]), Image.Resampling.BILINEAR)
    tensor = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1).contiguous()
    with torch.inference_mode():
        result = inferencer.predict(tensor)
    score = _to_numpy(result.pred_score)
    label = _to_numpy(result.pred_label)
    mask = _as_2d(_to_numpy(result.pred_mask))
    return Prediction(
        pred_score=float(np.asarray(score).reshape(-1)[0]),
        pred_label=None if label is None else bool(np.asarray(label).reshape(-1)[0]),
        anomaly_map=_as_2d(_to_numpy(result.anomaly_map)),
        pred_mask=None if mask is None else mask.astype(bool),
    )


def render_overlay(image: Image.Image, prediction: Prediction, alpha: float = 0.5) -> Image.Image:
    """Blend the anomaly map over ``image`` (JET colours) and outline the predicted mask.

    The map is already normalised by the exported post-processor (0.5 = threshold), so its colours are
    comparable between images: blue is normal, red is above the threshold.
    """
    from anomalib.visualization.image.functional import (
        add_text_to_image,
        overlay_images,
        visualize_anomaly_map,
        visualize_mask,
    )

    overlays: list[Image.Image] = []
    alphas: list[float] = []
    if prediction.anomaly_map is not None:
        anomaly_map = np.clip(prediction.anomaly_map.astype(np.float32), 0.0, 1.0)
        heat = visualize_anomaly_map(Image.fromarray((anomaly_map * 255).round().astype(np.uint8), mode="L"))
        overlays.append(heat.resize(image.size, Image.Resampling.BILINEAR))
        alphas.append(alpha)
    if prediction.pred_mask is not None and prediction.pred_mask.any():
        mask = Image.fromarray(prediction.pred_mask.astype(np.uint8) * 255, mode="L")
        mask = mask.resize(image.size, Image.Resampling.NEAREST)
        overlays.append(visualize_mask(mask, mode="contour", color=(255, 255, 255)))
        alphas.append(1.0)
    result = overlay_images(image, overlays, alpha=alphas).convert("RGB") if overlays else image.copy()
    label = "" if prediction.pred_label is None else (" anomalous" if prediction.pred_label else " normal")
    if min(image.size) < 128:  # no room for the word on small images
        label = ""
    size = max(8, min(image.size) // 16)
    return add_text_to_image(result, f"{prediction.pred_score:.3f}{label}", size=size, position=(2, 2), padding=1)


def _heatmap_path(image_path: Path, input_root: Path, heatmap_dir: Path) -> Path:
    relative = image_path.relative_to(input_root).parent if input_root.is_dir() else Path()
    return heatmap_dir / relative / f"{image_path.stem}.png"


def _progress(items: list[Path], enabled: bool) -> Any:  # noqa: ANN401 - tqdm iterator or the list
    if not enabled:
        return items
    from tqdm import tqdm

    return tqdm(items, desc="Scoring", unit="img", file=sys.stderr, dynamic_ncols=True)


def _report(message: str) -> None:
    """Print to stderr without breaking a running tqdm bar."""
    from tqdm import tqdm

    tqdm.write(message, file=sys.stderr)


def run(
    model: Path,
    input_path: Path,
    output: Path,
    device: str = "CPU",
    precision: str = "f32",
    trust_remote_code: bool = False,
    progress: bool = True,
) -> int:
    """Score every image of ``input_path``; returns the number of images that failed."""
    images = find_images(input_path)
    if not images:
        msg = f"No images ({', '.join(sorted(IMAGE_SUFFIXES))}) found in '{input_path}'."
        raise FileNotFoundError(msg)
    output.mkdir(parents=True, exist_ok=True)
    inferencer = load_inferencer(model, device, precision, trust_remote_code, cache_dir=output)
    input_size = static_input_size(inferencer)
    heatmap_dir = output / "heatmaps"
    heatmap_dir.mkdir(exist_ok=True)

    anomalous = 0
    skipped: dict[str, str] = {}  # image → why it could not be scored
    with (output / "scores.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image_path", "pred_score", "pred_label"])
        for image_path in _progress(images, enabled=progress and input_path.is_dir()):
            try:
                image = read_image(image_path)
            except OSError as error:
                skipped[str(image_path)] = str(error)
                _report(f"ERROR: {error}")
                continue
            try:
                prediction = predict(inferencer, image, input_size)
            except (RuntimeError, ValueError) as error:
                skipped[str(image_path)] = f"scoring failed: {error}"
                _report(f"ERROR: scoring '{image_path}' failed: {error}")
                continue
            label = "" if prediction.pred_label is None else int(prediction.pred_label)
            anomalous += bool(prediction.pred_label)
            writer.writerow([str(image_path), f"{prediction.pred_score:.6f}", label])
            target = _heatmap_path(image_path, input_path, heatmap_dir)
            target.parent.mkdir(parents=True, exist_ok=True)
            render_overlay(image, prediction).save(target)

    scored = len(images) - len(skipped)
    print(f"Scored {scored} of {len(images)} image(s), {anomalous} anomalous -> {output / 'scores.csv'}")
    if skipped:
        with (output / "skipped_images.csv").open("w", newline="") as handle:
            csv.writer(handle).writerows([("image_path", "reason"), *skipped.items()])
        print(f"{len(skipped)} image(s) skipped; listed in {output / 'skipped_images.csv'}.", file=sys.stderr)
    return len(skipped)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line arguments."""
    parser = argparse.ArgumentParser(
        prog="python -m anomalib_gaussft.infer",
        description="Score images with an exported anomalib model (OpenVINO .xml, .onnx or torch .pt).",
    )
    parser.add_argument("--model", type=Path, required=True, help="model.xml, model.onnx or model.pt")
    parser.add_argument("--input", type=Path, required=True, help="an image or a folder (searched recursively)")
    parser.add_argument("--output", type=Path, required=True, help="folder for scores.csv and heatmaps/")
    parser.add_argument("--device", default="CPU", help="OpenVINO device (CPU, GPU, AUTO); CPU/GPU for .pt")
    parser.add_argument(
        "--precision",
        choices=("f32", "auto"),
        default="f32",
        help="OpenVINO inference precision: f32 (matches the torch model) or auto (bf16 on CPUs that have it)",
    )
    parser.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="allow loading a pickled torch .pt export (runs code from the file; only for trusted files)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status."""
    args = parse_args(argv)
    try:
        failed = run(
            model=args.model,
            input_path=args.input,
            output=args.output,
            device=args.device,
            precision=args.precision,
            trust_remote_code=args.trust_remote_code,
            progress=not args.no_progress,
        )
    except (ModelLoadError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
