"""CPU inference speed of GaussFT (torch, OpenVINO FP32/INT8) against PaDiM and PatchCore (OpenVINO).

Every model uses the same backbone (tf_efficientnet_lite0, ImageNet weights), the
same resolution (224 px) and the same pre-processing (resize + the backbone's own
mean/std), and is fitted through ``anomalib.engine.Engine`` on the same small
texture set. Each model is exported with ``Engine.export`` (static 224 x 224 input,
dynamic batch); the bare backbone (OpenVINO FP32) gives the floor no
feature-based detector can beat.

Timings: batch-1 latency (median, p90) and images/second, plus batch-8 throughput.
Models are timed in interleaved rounds, so a load change on a shared machine hits
every row alike. OpenVINO rows run with ``INFERENCE_PRECISION_HINT=f32`` unless
marked bf16 (OpenVINO's CPU default where AVX512-BF16/AMX exists). Image AUROC is
computed on the texture set's test images from each model's own outputs (sklearn,
raw ranking; tiny test set, a sanity check rather than a quality benchmark).

Example:
    python benchmarks/bench_inference.py --hf-cache /work/shared/hf-cache/hub

    # air-gapped, weights from a file instead of the hub cache:
    python benchmarks/bench_inference.py --backbone-weights lite0.safetensors
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common import BACKBONE, BASELINES, build_model, machine_description, mvtec_datamodule

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_HF_CACHE = REPO_ROOT.parent / "shared" / "hf-cache" / "hub"
REFERENCE = "GaussFT OpenVINO FP32"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hf-cache", type=Path, default=None, help="HF hub cache with timm/tf_efficientnet_lite0")
    parser.add_argument("--backbone-weights", type=Path, default=None, help="local .pth/.safetensors for the backbone")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--n-train", type=int, default=32, help="normal training images of the texture set")
    parser.add_argument("--n-test", type=int, default=8, help="good and defective test images (each)")
    parser.add_argument("--runs", type=int, default=60, help="batch-1 calls per model (over all rounds)")
    parser.add_argument("--batch", type=int, default=8, help="batch size of the throughput column")
    parser.add_argument("--batch-runs", type=int, default=6, help="batched calls per model (over all rounds)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds")
    parser.add_argument("--coreset-ratio", type=float, default=0.01, help="PatchCore coreset sampling ratio")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default 0: one per logical core)")
    parser.add_argument("--work-dir", type=Path, default=None, help="data, checkpoints and exports (default: temp)")
    parser.add_argument("--output", type=Path, default=REPO_ROOT / "docs" / "results_inference.md")
    return parser.parse_args(argv)


def configure_hub(args: argparse.Namespace) -> str:
    """Point huggingface_hub at the local cache (must run before anything imports it)."""
    cache = args.hf_cache
    if cache is None and "HF_HUB_CACHE" not in os.environ and DEFAULT_HF_CACHE.is_dir():
        cache = DEFAULT_HF_CACHE
    if cache is not None:
        os.environ["HF_HUB_CACHE"] = str(Path(cache).resolve())
        os.environ["HF_HUB_OFFLINE"] = "1"
    return os.environ.get("HF_HUB_CACHE", "(huggingface_hub default)")


@dataclass
class Row:
    name: str
    run: Any  # callable: numpy (N, 3, H, W) float32 -> pred_score numpy (N,) or None
    size_mb: float | None = None
    fixed_batch: int | None = None  # static batch size of the exported graph, if any
    auroc: float | None = None
    latencies: list[float] = field(default_factory=list)
    batch_seconds: list[float] = field(default_factory=list)


# ---- models ------------------------------------------------------------------------------------


def build_models(args: argparse.Namespace) -> dict[str, Any]:
    """GaussFT (frozen), PaDiM and PatchCore on the benchmark backbone (PaDiM/PatchCore: ``common.BASELINES``)."""
    size, weights = args.image_size, args.backbone_weights
    patchcore = {**BASELINES["patchcore"], "coreset_sampling_ratio": args.coreset_ratio}
    return {
        "GaussFT": build_model("gaussft", {"fine_tune_epochs": 0}, size, weights),
        "PaDiM": build_model("padim", dict(BASELINES["padim"]), size, weights),
        "PatchCore": build_model("patchcore", patchcore, size, weights),
    }


def export_backbone(path: Path, image_size: int, weights: Path | None) -> Path:
    """The bare backbone (all stages + head conv, as GaussFT uses it) as OpenVINO FP32."""
    import openvino as ov
    import torch

    from anomalib_gaussft.gaussft.feature_extractor import MultiLevelFeatureExtractor

    path.parent.mkdir(parents=True, exist_ok=True)
    extractor = MultiLevelFeatureExtractor(BACKBONE, pre_trained=True, weights_path=weights)
    extractor.ensure_weights()
    backbone = extractor.model.eval()
    example = torch.zeros(1, 3, image_size, image_size)
    batch = torch.export.Dim("batch")
    onnx_path = path.with_suffix(".onnx")
    torch.onnx.export(backbone, (example,), str(onnx_path), dynamo=True, opset_version=18, dynamic_shapes=({0: batch},))
    xml = path.with_suffix(".xml")
    ov.save_model(ov.convert_model(onnx_path), xml, compress_to_fp16=False)
    return xml


def compile_openvino(xml: Path, precision: str | None = "f32") -> tuple[Any, int | None]:
    import numpy as np
    import openvino as ov

    config = {"PERFORMANCE_HINT": "LATENCY"}
    if precision:
        config["INFERENCE_PRECISION_HINT"] = precision
    compiled = ov.Core().compile_model(str(xml), "CPU", config)
    request = compiled.create_infer_request()
    names = [port.any_name for port in compiled.outputs]

    def run(images: np.ndarray) -> np.ndarray | None:
        results = request.infer(images)
        outputs = {name: results[port] for name, port in zip(names, compiled.outputs, strict=True)}
        return outputs["pred_score"].reshape(-1) if "pred_score" in outputs else None

    batch_dim = compiled.inputs[0].partial_shape[0]
    return run, (batch_dim.get_length() if batch_dim.is_static else None)


def torch_runner(model: Any) -> Any:
    import numpy as np
    import torch

    model.eval()

    def run(images: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return model(torch.from_numpy(images)).pred_score.numpy().reshape(-1)

    return run


def _files_mb(xml: Path) -> float:
    return (xml.stat().st_size + xml.with_suffix(".bin").stat().st_size) / 2**20


# ---- timing and report -------------------------------------------------------------------------


def time_rows(rows: list[Row], images: Any, args: argparse.Namespace) -> None:
    """Interleaved rounds: each round times every row once at batch 1 and at ``args.batch``."""
    import numpy as np

    single = [images[i : i + 1] for i in range(len(images))]
    batch = np.concatenate([images] * (args.batch // len(images) + 1))[: args.batch]
    for row in rows:  # warm-up: first calls allocate and tune
        for item in single[:3]:
            row.run(item)
        if row.fixed_batch is None:
            row.run(batch)
    per_round = max(1, args.runs // args.rounds)
    batch_per_round = max(1, args.batch_runs // args.rounds)
    for _ in range(args.rounds):
        for row in rows:
            for i in range(per_round):
                start = time.perf_counter()
                row.run(single[i % len(single)])
                row.latencies.append(time.perf_counter() - start)
            for _ in range(batch_per_round if row.fixed_batch is None else 0):
                start = time.perf_counter()
                row.run(batch)
                row.batch_seconds.append(time.perf_counter() - start)


def machine_lines() -> list[str]:
    """The machine section: CPU, cores, RAM, vector ISA, library versions (torch's and OpenVINO's build strings)."""
    import openvino
    import torch

    info = machine_description()
    memory = f", {info['ram_gib']:.0f} GiB RAM" if "ram_gib" in info else ""
    return [
        f"- CPU: {info['cpu']}, {info['logical_cores']} logical cores visible{memory}; ISA: "
        f"{', '.join(info['isa']) or 'n/a'}",
        f"- torch {torch.__version__} ({torch.get_num_threads()} threads), OpenVINO {openvino.__version__}, "
        f"anomalib {info['anomalib']}, numpy {info['numpy']}, Python {info['python']}, {info['os']}",
    ]


def render(rows: list[Row], args: argparse.Namespace, context: dict[str, Any]) -> str:
    import numpy as np

    def ips(row: Row) -> float:
        return len(row.latencies) / sum(row.latencies)

    def batch_ips(row: Row) -> float:
        return args.batch * len(row.batch_seconds) / sum(row.batch_seconds) if row.batch_seconds else float("nan")

    def number(value: float, digits: int) -> str:
        return "n/a" if np.isnan(value) else f"{value:.{digits}f}"

    reference = next(r for r in rows if r.name == REFERENCE)
    header = (
        f"| model | median latency, batch 1 (ms) | p90 (ms) | images/s, batch 1 | × {REFERENCE} | "
        f"images/s, batch {args.batch} | × ref | model files (MB) | image AUROC |"
    )
    lines = [header, "|" + "---|" * 9]
    for row in rows:
        lat = np.array(row.latencies) * 1000
        lines.append(
            f"| {row.name} | {statistics.median(lat):.1f} | {np.percentile(lat, 90):.1f} | {ips(row):.1f} | "
            f"{ips(row) / ips(reference):.2f} | {number(batch_ips(row), 1)} | "
            f"{number(batch_ips(row) / batch_ips(reference), 2)} | "
            f"{'' if row.size_mb is None else f'{row.size_mb:.1f}'} | "
            f"{'—' if row.auroc is None else f'{row.auroc:.3f}'} |"
        )
    command = shlex.join([Path(sys.executable).name, *sys.argv])
    return "\n".join(
        [
            "# Inference speed on CPU",
            "",
            f"Backbone `{BACKBONE}` (ImageNet weights) for every model, input {args.image_size} × "
            f"{args.image_size}, the same texture set (`brick`, {args.n_train} normal training images, "
            f"{args.n_test} + {args.n_test} test images) for fitting. OpenVINO rows: `Engine.export` IR, "
            "CPU plugin, `PERFORMANCE_HINT=LATENCY`, `INFERENCE_PRECISION_HINT=f32` unless the row says bf16. "
            "Torch row: the Lightning module's forward (pre-processing, model, post-processing) under "
            "`torch.inference_mode`. Ratios are throughput relative to "
            f"**{REFERENCE}** (higher is faster). {len(reference.latencies)} batch-1 calls and "
            f"{len(reference.batch_seconds)} batch-{args.batch} calls per model in {args.rounds} interleaved rounds.",
            "",
            *lines,
            "",
            "Rows: *GaussFT OpenVINO INT8* is NNCF post-training quantisation (`CompressionType.INT8_PTQ`, "
            f"calibrated on the validation images). *PaDiM*: layers blocks.1/2/4 (strides 4/8/16), 100 random "
            f"feature dims, per-position Gaussians. *PatchCore*: layers blocks.2/4, coreset ratio {args.coreset_ratio} "
            f"(memory bank of {context.get('memory_bank', '?')} patches), 9 neighbours. *Backbone only*: "
            "all stages + head conv of the timm model, no pre- or post-processing: the floor for any detector "
            "on these features. n/a: anomalib 2.7's PatchCore export has a static batch size (its memory-bank "
            "search loops over Python-sized chunks, which torch.export specialises), so it is exported for batch 1. "
            "Image AUROC: sklearn on each model's own scores over the test images (tiny set: "
            "a sanity check, not a quality benchmark).",
            "",
            "## Machine",
            "",
            *machine_lines(),
            f"- Load average (1 min) before / after timing: {context['load_before']:.2f} / "
            f"{context['load_after']:.2f} (a shared machine: other processes compete for the cores)",
            f"- Total script time: {context['elapsed']:.0f} s",
            "",
            "## Command",
            "",
            "```",
            f"HF_HUB_CACHE={context['hf_cache']} HF_HUB_OFFLINE=1 {command}"
            if args.hf_cache is None and args.backbone_weights is None
            else command,
            "```",
            "",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    hf_cache = configure_hub(args)
    started = time.perf_counter()
    warnings.filterwarnings("ignore")

    import logging

    import numpy as np
    import torch
    from anomalib.deploy import CompressionType, ExportType
    from anomalib.engine import Engine
    from sklearn.metrics import roc_auc_score

    from data_generators import make_texture_dataset

    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    logging.getLogger("anomalib").setLevel(logging.WARNING)
    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    torch.manual_seed(0)

    work = Path(args.work_dir or tempfile.mkdtemp(prefix="bench_inference_"))
    data_root = work / "data"
    make_texture_dataset(
        data_root,
        textures=("brick",),
        image_size=args.image_size,
        n_train=args.n_train,
        n_test_good=args.n_test,
        n_test_defect=args.n_test,
    )

    def datamodule() -> Any:
        return mvtec_datamodule(data_root, "brick", train_batch_size=8, eval_batch_size=8)

    test = datamodule()
    test.setup()
    batches = list(test.test_dataloader())
    images = torch.cat([b.image for b in batches]).numpy().astype(np.float32)
    labels = torch.cat([b.gt_label for b in batches]).int().numpy()

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - started:6.1f}s] {message}", file=sys.stderr, flush=True)

    models = build_models(args)
    exports: dict[str, Path] = {}
    onnx_kwargs = {"opset_version": 18}
    size = (args.image_size, args.image_size)
    for name, model in models.items():
        engine = Engine(
            default_root_dir=work / "results" / name,
            logger=False,
            accelerator="cpu",
            devices=1,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        engine.fit(model=model, datamodule=datamodule())
        log(f"fitted {name}")
        # anomalib's PatchCore searches its memory bank in Python-sized chunks, so torch.export bakes the
        # example batch size into the graph: export it with a static batch of 1 (dynamic_axes={}).
        kwargs = {**onnx_kwargs, "dynamic_axes": {}} if name == "PatchCore" else onnx_kwargs
        exports[name] = engine.export(
            model, ExportType.OPENVINO, export_root=work / "export" / name, input_size=size, onnx_kwargs=kwargs
        )
        if name == "GaussFT":
            exports["GaussFT INT8"] = engine.export(
                model,
                ExportType.OPENVINO,
                export_root=work / "export" / "GaussFT_int8",
                input_size=size,
                compression_type=CompressionType.INT8_PTQ,
                datamodule=datamodule(),
                onnx_kwargs=onnx_kwargs,
            )
        log(f"exported {name}")
    exports["backbone"] = export_backbone(
        work / "export" / "backbone" / "model", args.image_size, args.backbone_weights
    )
    log("exported the bare backbone")
    memory_bank = int(models["PatchCore"].model.memory_bank.shape[0])

    def openvino_row(name: str, key: str, precision: str | None = "f32", size: bool = True) -> Row:
        run, fixed_batch = compile_openvino(exports[key], precision)
        return Row(name, run, _files_mb(exports[key]) if size else None, fixed_batch)

    rows = [
        Row("GaussFT torch", torch_runner(models["GaussFT"])),
        openvino_row(REFERENCE, "GaussFT"),
        openvino_row("GaussFT OpenVINO FP32, bf16 execution", "GaussFT", precision=None, size=False),
        openvino_row("GaussFT OpenVINO INT8", "GaussFT INT8"),
        openvino_row("PaDiM OpenVINO FP32", "PaDiM"),
        openvino_row("PatchCore OpenVINO FP32", "PatchCore"),
        openvino_row("Backbone only, OpenVINO FP32", "backbone"),
    ]
    for row in rows:
        if row.fixed_batch == 1:
            outputs = [row.run(images[i : i + 1]) for i in range(len(images))]
            scores = None if outputs[0] is None else np.concatenate(outputs)
        else:
            scores = row.run(images)
        if scores is not None:
            if not np.isfinite(scores).all():
                msg = f"{row.name} produced non-finite scores"
                raise FloatingPointError(msg)
            row.auroc = float(roc_auc_score(labels, scores))

    load_before = os.getloadavg()[0]
    log("timing")
    time_rows(rows, images, args)
    context = {
        "load_before": load_before,
        "load_after": os.getloadavg()[0],
        "memory_bank": memory_bank,
        "elapsed": time.perf_counter() - started,
        "hf_cache": hf_cache,
    }
    report = render(rows, args, context)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(report)
    print(report)
    log(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
