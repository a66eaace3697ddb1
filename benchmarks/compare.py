"""Compare GaussFT with PaDiM, PatchCore and DFM on one backbone: accuracy, time, memory, size.

Every model uses the same backbone (timm ``tf_efficientnet_lite0``, real ImageNet weights), the same input
(224 x 224, resized, normalised with the backbone's own mean/std) and the same data loaders (``num_workers=0``).
Each (model, dataset, training-set size) job runs in a fresh Python subprocess, so that the peak memory it reports
(``ru_maxrss`` of that process, read right after ``engine.fit``) is the fit's own; results are appended to
``OUT/results.jsonl`` as each job finishes, and a re-run skips the jobs already there (resume after interruption).

Scores: every metric is computed from the raw outputs of the torch model, ``model.model(pre_processed_images)``
in eval mode (``pred_score`` and ``anomaly_map``), i.e. before anomalib's post-processing normalisation, with
sklearn's ``roc_auc_score`` (torchmetrics' AUROC would squash raw scores with a sigmoid). Pixel metrics are
computed at the anomaly map's resolution (224 px; masks are resized to it with nearest neighbour). AUPRO is
anomalib's (FPR limit 0.3) on the same raw maps.

Example (real weights from a local Hugging Face cache, no network)::

    HF_HUB_CACHE=/path/to/hf-cache/hub HF_HUB_OFFLINE=1 python benchmarks/compare.py \
        --datasets brick,grass,gravel,elpv_mono,elpv_poly --epochs 10 --out results/compare --docs docs/results.md

    # scaling study: fit memory and time as the training set grows 1x, 2x, 4x
    python benchmarks/compare.py --datasets brick --scale 1,2,4 --train-images 50 --out results/scaling

    # GaussFT variants
    python benchmarks/compare.py --datasets brick --models gaussft_frozen,padim \
        --variants '{"gaussft_pp": {"map_gaussian": "per_position", "fine_tune_epochs": 0}}'

Exit status: 0 if every job of this invocation has a result, 1 otherwise (the failed jobs are listed at the end;
their logs are in ``OUT/logs``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import platform
import resource
import shlex
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

BACKBONE = "tf_efficientnet_lite0"
IMAGE_SIZE = 224
TEXTURES = ("brick", "grass", "gravel")
ELPV = ("elpv_mono", "elpv_poly")
DEFAULT_TEXTURE_TRAIN = 60
MMAP_THRESHOLD = 1 << 20  # glibc: allocations >= 1 MiB are mmap-ed and returned to the OS on free
SCORE_SOURCE = "raw model.model(pre_processed) outputs (pred_score, anomaly_map), before post-processing"

# Layers of tf_efficientnet_lite0 for the baselines (timm features_only exposes blocks.0/1/2/4/6 at strides
# 2/4/8/16/32): the same strides as their ResNet defaults.
BASELINES: dict[str, dict[str, Any]] = {
    # PaDiM: layer1-3 of ResNet-18 (strides 4, 8, 16) -> blocks.1, blocks.2, blocks.4 (24+40+112 = 176 channels);
    # 100 random channels kept, as PaDiM's ResNet-18 default.
    "padim": {"layers": ["blocks.1", "blocks.2", "blocks.4"], "n_features": 100},
    # PatchCore: layer2-3 (strides 8, 16) -> blocks.2, blocks.4. coreset ratio: --coreset-ratio.
    "patchcore": {"layers": ["blocks.2", "blocks.4"], "num_neighbors": 9},
    # DFM: layer3 (stride 16) -> blocks.4.
    "dfm": {"layer": "blocks.4", "pooling_kernel_size": 4, "pca_level": 0.97, "score_type": "fre"},
}
MODEL_ORDER = ["gaussft_frozen", "gaussft_ft", "padim", "patchcore", "dfm"]


# ----------------------------------------------------------------------------------------------------------------
# Job list (parent process)
# ----------------------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--datasets",
        default="brick,grass,gravel,elpv_mono,elpv_poly",
        help="comma list of: elpv_mono, elpv_poly, brick, grass, gravel (default: all five)",
    )
    parser.add_argument(
        "--mvtec",
        action="append",
        default=[],
        metavar="ROOT:CATEGORY",
        help="an MVTec-layout category (repeatable), e.g. datasets/MVTecAD:bottle",
    )
    parser.add_argument(
        "--models",
        default=",".join(MODEL_ORDER),
        help=f"comma list of {', '.join(MODEL_ORDER)} and names from --variants (default: the five; variants are "
        "always added)",
    )
    parser.add_argument(
        "--variants",
        default=None,
        help='GaussFT variants as JSON: {"name": {GaussFT kwargs}, ...} or [{"name": ..., kwargs...}]; '
        "unspecified kwargs are GaussFT's defaults with fine_tune_epochs=--epochs",
    )
    parser.add_argument("--epochs", type=int, default=10, help="fine_tune_epochs of gaussft_ft and variants")
    parser.add_argument("--train-images", type=int, default=None, help="cap (base size) of the training set")
    parser.add_argument(
        "--scale",
        default="1",
        help="comma list of training-set multipliers, e.g. 1,2,4: n_train = base * k (base = --train-images, "
        f"textures default {DEFAULT_TEXTURE_TRAIN}, other datasets: available // max(k)); nested subsets",
    )
    parser.add_argument("--test-images", type=int, default=30, help="textures: good and defect test images each")
    parser.add_argument(
        "--max-test-images",
        type=int,
        default=None,
        help="ELPV/--mvtec: score at most N normal and N anomalous test images (seeded subsample; quick runs)",
    )
    parser.add_argument("--coreset-ratio", type=float, default=0.1, help="PatchCore coreset_sampling_ratio")
    parser.add_argument("--batch-size", type=int, default=16, help="train and eval batch size")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch.set_num_threads in every job (default 1; 0 = torch's default, all cores). On a machine shared "
        "with other work, >1 thread makes models with many small ops (PaDiM's per-position loop) up to 70x slower",
    )
    parser.add_argument("--throughput-seconds", type=float, default=3.0, help="min timing per batch size")
    parser.add_argument("--export", action="store_true", help="also export to OpenVINO and report its size")
    parser.add_argument(
        "--malloc",
        choices=("fixed", "default"),
        default="fixed",
        help="fixed (default): jobs run with MALLOC_MMAP_THRESHOLD_=1 MiB, so freed large temporaries go back to "
        "the OS and peak RSS measures what the algorithm holds; default: glibc's adaptive threshold, under which "
        "e.g. PatchCore's coreset loop keeps GBs of freed temporaries resident",
    )
    parser.add_argument("--data-root", default="datasets", help="where the datasets are generated")
    parser.add_argument("--out", default="results/compare", help="results folder")
    parser.add_argument("--docs", default=None, help="also write the markdown report (and its plots) here")
    parser.add_argument("--job-timeout", type=float, default=None, help="seconds per job (default: none)")
    parser.add_argument(
        "--hf-cache",
        default=None,
        help="sets HF_HUB_CACHE=DIR and HF_HUB_OFFLINE=1 for the jobs (else the environment's are used)",
    )
    parser.add_argument("--list", action="store_true", help="print the job list and exit")
    parser.add_argument("--report-only", action="store_true", help="only rebuild the report from results.jsonl")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.scales = sorted({int(s) for s in str(args.scale).split(",") if s.strip()})
    if not args.scales or min(args.scales) < 1:
        parser.error("--scale needs positive integers")
    return args


def model_specs(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The model configurations to run, in report order."""
    available: dict[str, dict[str, Any]] = {
        "gaussft_frozen": {"kind": "gaussft", "kwargs": {"fine_tune_epochs": 0}},
        "gaussft_ft": {"kind": "gaussft", "kwargs": {"fine_tune_epochs": args.epochs}},
        "padim": {"kind": "padim", "kwargs": dict(BASELINES["padim"])},
        "patchcore": {
            "kind": "patchcore",
            "kwargs": {**BASELINES["patchcore"], "coreset_sampling_ratio": args.coreset_ratio},
        },
        "dfm": {"kind": "dfm", "kwargs": dict(BASELINES["dfm"])},
    }
    variants: dict[str, dict[str, Any]] = {}
    if args.variants:
        raw = json.loads(args.variants)
        if isinstance(raw, list):
            raw = {item.pop("name"): item for item in raw}
        if not isinstance(raw, dict):
            msg = "--variants must be a JSON object {name: kwargs} or a list of objects with a 'name'"
            raise SystemExit(msg)
        for name, kwargs in raw.items():
            if name in available:
                msg = f"variant name {name!r} clashes with a built-in model"
                raise SystemExit(msg)
            variants[name] = {"kind": "gaussft", "kwargs": {"fine_tune_epochs": args.epochs, **kwargs}}
    requested = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in requested if m not in available and m not in variants]
    if unknown:
        msg = f"unknown model(s) {unknown}; choose from {list(available)} or define them with --variants"
        raise SystemExit(msg)
    names = [m for m in requested if m in available] + [m for m in requested if m in variants]
    names += [v for v in variants if v not in names]
    return [{"name": n, **(available.get(n) or variants[n])} for n in names]


def dataset_specs(args: argparse.Namespace) -> list[dict[str, Any]]:
    specs = []
    for name in [d.strip() for d in args.datasets.split(",") if d.strip()]:
        if name in TEXTURES:
            specs.append({"name": name, "kind": "texture", "masks": True})
        elif name in ELPV:
            specs.append({"name": name, "kind": "elpv", "masks": False})
        else:
            msg = f"unknown dataset {name!r}: use {', '.join((*ELPV, *TEXTURES))} or --mvtec ROOT:CATEGORY"
            raise SystemExit(msg)
    for item in args.mvtec:
        root, sep, category = item.rpartition(":")
        if not sep or not root or not category:
            msg = f"--mvtec expects ROOT:CATEGORY, got {item!r}"
            raise SystemExit(msg)
        if not (Path(root) / category / "train" / "good").is_dir():
            msg = f"--mvtec {item}: {Path(root) / category / 'train' / 'good'} does not exist"
            raise SystemExit(msg)
        specs.append(
            {
                "name": f"{Path(root).name}/{category}",
                "kind": "mvtec",
                "root": str(Path(root).resolve()),
                "category": category,
                "masks": True,
            }
        )
    return specs


def prepare_dataset(spec: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """Generate the dataset if needed; return the spec with its folder and the training-set sizes per scale."""
    from anomalib_gaussft.datasets import make_elpv_dataset, make_texture_dataset

    data_root = Path(args.data_root).resolve()
    max_scale = max(args.scales)
    spec = dict(spec)
    if spec["kind"] == "texture":
        base = args.train_images or DEFAULT_TEXTURE_TRAIN
        pool = base * max_scale
        root = data_root / f"textures_{IMAGE_SIZE}px_train{pool}_test{args.test_images}"
        make_texture_dataset(
            root,
            textures=(spec["name"],),
            image_size=IMAGE_SIZE,
            n_train=pool,
            n_test_good=args.test_images,
            n_test_defect=args.test_images,
        )
        spec.update(root=str(root), category=spec["name"])
        train_dir = root / spec["name"] / "train" / "good"
    elif spec["kind"] == "elpv":
        folder = make_elpv_dataset(data_root / "elpv", cell_type=spec["name"].removeprefix("elpv_"), image_size=224)
        spec.update(root=str(folder))
        train_dir = folder / "train" / "good"
    else:
        train_dir = Path(spec["root"]) / spec["category"] / "train" / "good"
    available = sum(1 for p in train_dir.iterdir() if p.is_file())
    base = args.train_images if args.train_images else max(1, available // max_scale)
    spec["available_train"] = available
    spec["n_train"] = {k: min(available, base * k) for k in args.scales}
    return spec


def job_id(job: dict[str, Any]) -> str:
    key = {k: job[k] for k in ("model", "dataset", "n_train", "settings")}
    digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:10]
    return f"{job['model']['name']}|{job['dataset']['name']}|n{job['n_train']}|{digest}"


def make_jobs(args: argparse.Namespace, datasets: list[dict[str, Any]], models: list[dict[str, Any]]) -> list[dict]:
    settings = {
        "backbone": BACKBONE,
        "image_size": IMAGE_SIZE,
        "batch_size": args.batch_size,
        "threads": args.threads,
        "export": bool(args.export),
        "test_images": args.test_images,
        "malloc": args.malloc,
    }
    if args.max_test_images:
        settings["max_test_images"] = args.max_test_images
    jobs = []
    for dataset in datasets:
        for scale in args.scales:
            for model in models:
                job = {
                    "model": model,
                    "dataset": {k: v for k, v in dataset.items() if k not in ("n_train", "available_train")},
                    "scale": scale,
                    "n_train": dataset["n_train"][scale],
                    "settings": settings,
                    "throughput_seconds": args.throughput_seconds,
                }
                job["id"] = job_id(job)
                jobs.append(job)
    return jobs


def load_results(path: Path) -> dict[str, dict[str, Any]]:
    results = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            if line.strip():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut off by an interruption
                results[record["id"]] = record
    return results


def run_job(job: dict[str, Any], args: argparse.Namespace, out: Path) -> tuple[dict[str, Any] | None, str]:
    """Run one job in a fresh interpreter; return (result or None, error text)."""
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    safe = job["id"].replace("|", "_").replace("/", "-")
    log_path = logs / f"{safe}.log"
    with tempfile.TemporaryDirectory(prefix="compare_job_", dir=out) as tmp:
        job_file = Path(tmp) / "job.json"
        result_file = Path(tmp) / "result.json"
        job_file.write_text(json.dumps({**job, "workdir": tmp, "result_file": str(result_file)}))
        env = dict(os.environ)
        if args.hf_cache:
            env.update(HF_HUB_CACHE=str(Path(args.hf_cache).resolve()), HF_HUB_OFFLINE="1")
        env.setdefault("PYTHONUNBUFFERED", "1")
        if args.malloc == "fixed":
            env["MALLOC_MMAP_THRESHOLD_"] = str(MMAP_THRESHOLD)
        command = [sys.executable, str(Path(__file__).resolve()), "--child", str(job_file)]
        try:
            with log_path.open("w") as log:
                proc = subprocess.run(
                    command, stdout=log, stderr=subprocess.STDOUT, env=env, timeout=args.job_timeout, check=False
                )
            returncode = proc.returncode
        except subprocess.TimeoutExpired:
            return None, f"timed out after {args.job_timeout} s (log: {log_path})"
        if returncode == 0 and result_file.is_file():
            return json.loads(result_file.read_text()), ""
        tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-25:])
        return None, f"exit status {returncode} (log: {log_path})\n{tail}"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        return child_main(Path(args.child))
    command_line = " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]) if argv is None else " ".join(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    models = model_specs(args)
    failures: list[tuple[str, str]] = []
    datasets = []
    for spec in dataset_specs(args):
        try:
            datasets.append(prepare_dataset(spec, args))
        except Exception as exc:  # noqa: BLE001 - reported at the end, exit status 1; other datasets still run
            failures.append((f"dataset {spec['name']}", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"))
            print(f"Dataset {spec['name']} FAILED: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
    jobs = make_jobs(args, datasets, models)
    if args.list:
        for index, job in enumerate(jobs, 1):
            print(f"[{index}/{len(jobs)}] {job['id']}  kwargs={json.dumps(job['model']['kwargs'])}")
        return 0
    results_path = out / "results.jsonl"
    done = load_results(results_path)
    start_all = time.perf_counter()
    if not args.report_only:
        for index, job in enumerate(jobs, 1):
            label = (
                f"[{index}/{len(jobs)}] {job['model']['name']} on {job['dataset']['name']} (n_train {job['n_train']})"
            )
            if job["id"] in done:
                print(f"{label} ... already in {results_path}, skipped", flush=True)
                continue
            print(f"{label} ...", end=" ", flush=True)
            start = time.perf_counter()
            result, error = run_job(job, args, out)
            seconds = time.perf_counter() - start
            if result is None:
                failures.append((job["id"], error))
                with (out / "failures.jsonl").open("a") as handle:
                    handle.write(json.dumps({"id": job["id"], "error": error, "time": _now()}) + "\n")
                print(f"FAILED ({seconds:.0f} s): {error.splitlines()[0]}", flush=True)
                continue
            result.update(id=job["id"], command=command_line, finished=_now(), job_wall_s=seconds)
            with results_path.open("a") as handle:
                handle.write(json.dumps(result) + "\n")
            done[job["id"]] = result
            print(f"{_summary(result)} ({seconds:.0f} s)", flush=True)
    rows = [done[job["id"]] for job in jobs if job["id"] in done]
    missing = [job["id"] for job in jobs if job["id"] not in done]
    missing += [name for name, _ in failures if name.startswith("dataset ")]
    if rows:
        markdown = write_report(rows, args, command_line, out)
        print(f"\nReport: {out / 'results.md'}" + (f" and {args.docs}" if args.docs else ""))
        print(markdown_table_for_console(markdown))
    print(f"Total {time.perf_counter() - start_all:.0f} s; {len(rows)}/{len(jobs)} jobs have results.")
    if failures or missing:
        print(f"\n{len(missing)} job(s) FAILED or have no result:", file=sys.stderr)
        errors = dict(failures)
        for job_key in missing:
            print(f"  - {job_key}", file=sys.stderr)
            if job_key in errors:
                print("      " + errors[job_key].replace("\n", "\n      "), file=sys.stderr)
        return 1
    return 0


def _now() -> str:
    return dt.datetime.now().isoformat(timespec="seconds")


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _summary(result: dict[str, Any]) -> str:
    parts = [f"image AUROC {_fmt(result['image_auroc'])}"]
    if result.get("pixel_auroc") is not None:
        parts.append(f"pixel AUROC {_fmt(result['pixel_auroc'])}")
    parts.append(f"fit {result['fit_s']:.1f} s, peak {result['fit_peak_rss_mb']:.0f} MB")
    return ", ".join(parts)


def markdown_table_for_console(markdown: str) -> str:
    lines = markdown.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith("## Results")), 0)
    return "\n".join(lines[start : start + 200])


# ----------------------------------------------------------------------------------------------------------------
# One job (child process)
# ----------------------------------------------------------------------------------------------------------------


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _current_rss_mb() -> float:
    try:
        import psutil

        return psutil.Process().memory_info().rss / 2**20
    except ImportError:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def build_datamodule(job: dict[str, Any]):
    from anomalib.data import Folder, MVTecAD

    dataset = job["dataset"]
    batch = job["settings"]["batch_size"]
    common = {"train_batch_size": batch, "eval_batch_size": batch, "num_workers": 0, "seed": 0}
    if dataset["kind"] == "elpv":
        return Folder(
            name=dataset["name"],
            root=dataset["root"],
            normal_dir="train/good",
            normal_test_dir="test/good",
            abnormal_dir="test/defect",
            val_split_mode="same_as_test",
            **common,
        )
    return MVTecAD(root=dataset["root"], category=dataset["category"], val_split_mode="same_as_test", **common)


def build_model(spec: dict[str, Any]):
    from anomalib.pre_processing import PreProcessor
    from torchvision.transforms.v2 import Compose, Normalize, Resize

    from anomalib_gaussft.gaussft.lightning_model import backbone_input_config

    flags = {"evaluator": False, "visualizer": False}
    kwargs = dict(spec["kwargs"])
    if spec["kind"] == "gaussft":
        from anomalib_gaussft import GaussFT

        return GaussFT(backbone=BACKBONE, pre_trained=True, image_size=IMAGE_SIZE, **{**flags, **kwargs})
    _, mean, std = backbone_input_config(BACKBONE)
    pre = PreProcessor(
        transform=Compose([Resize((IMAGE_SIZE, IMAGE_SIZE), antialias=True), Normalize(mean=mean, std=std)])
    )
    from anomalib.models import Dfm, Padim, Patchcore

    cls = {"padim": Padim, "patchcore": Patchcore, "dfm": Dfm}[spec["kind"]]
    return cls(backbone=BACKBONE, pre_trained=True, pre_processor=pre, **{**flags, **kwargs})


def _auroc(labels: Any, scores: Any) -> float | None:
    import numpy as np
    from sklearn.metrics import roc_auc_score

    labels = np.asarray(labels)
    if labels.min() == labels.max():
        return None
    return float(roc_auc_score(labels, np.asarray(scores, dtype=np.float64)))


def evaluate(model: Any, datamodule: Any, masks: bool) -> dict[str, Any]:
    import numpy as np
    import torch
    import torch.nn.functional as F  # noqa: N812

    model.eval()
    scores, labels, maps, gts = [], [], [], []
    with torch.inference_mode():
        for batch in datamodule.test_dataloader():
            images = model.pre_processor.transform(batch.image)
            output = model.model(images)
            scores.append(output.pred_score.reshape(-1).float().cpu())
            labels.append(batch.gt_label.reshape(-1).int().cpu())
            if masks:
                amap = output.anomaly_map.float()
                amap = amap.reshape(amap.shape[0], -1, *amap.shape[-2:])[:, :1]  # (B, 1, h, w)
                gt = batch.gt_mask
                if gt is None:
                    gt = torch.zeros(amap.shape[0], *amap.shape[-2:])
                gt = gt.reshape(gt.shape[0], 1, *gt.shape[-2:]).float()
                if gt.shape[-2:] != amap.shape[-2:]:
                    gt = F.interpolate(gt, size=amap.shape[-2:], mode="nearest")
                maps.append(amap[:, 0].cpu())
                gts.append((gt[:, 0] > 0.5).cpu())
    score = torch.cat(scores).numpy()
    label = torch.cat(labels).numpy()
    result: dict[str, Any] = {
        "n_test": len(label),
        "n_test_anomalous": int(label.sum()),
        "image_auroc": _auroc(label, score),
        "pixel_auroc": None,
        "aupro": None,
        "nonfinite_scores": int((~np.isfinite(score)).sum()),
    }
    if masks and maps:
        amap_all = torch.cat(maps)
        gt_all = torch.cat(gts)
        result["pixel_auroc"] = _auroc(gt_all.numpy().reshape(-1).astype(np.int8), amap_all.numpy().reshape(-1))
        try:
            from anomalib.metrics.aupro import _AUPRO  # raw torchmetrics metric (the public AUPRO takes batches)

            metric = _AUPRO(fpr_limit=0.3)
            metric.update(amap_all, gt_all.int())
            result["aupro"] = float(metric.compute())
        except Exception as exc:  # noqa: BLE001 - optional metric: record why it is missing
            result["aupro_error"] = f"{type(exc).__name__}: {exc}"
    return result


def throughput(model: Any, datamodule: Any, batch_size: int, min_seconds: float) -> float:
    import torch

    images = []
    for batch in datamodule.test_dataloader():
        images.append(model.pre_processor.transform(batch.image))
        if sum(len(i) for i in images) >= batch_size:
            break
    images = torch.cat(images)
    while len(images) < batch_size:
        images = torch.cat([images, images])
    images = images[:batch_size].contiguous()
    model.eval()
    with torch.inference_mode():
        for _ in range(2):
            model.model(images)
        count, start = 0, time.perf_counter()
        while count < 3 or time.perf_counter() - start < min_seconds:
            model.model(images)
            count += 1
        elapsed = time.perf_counter() - start
    return count * batch_size / elapsed


def state_dict_mb(module: Any) -> tuple[float, float]:
    """Size of ``module.state_dict()`` in MB, total and without the backbone (``feature_extractor.*``)."""
    total = stats = 0
    for key, tensor in module.state_dict().items():
        size = tensor.numel() * tensor.element_size()
        total += size
        if not key.startswith("feature_extractor."):
            stats += size
    return total / 2**20, stats / 2**20


def export_openvino(engine: Any, model: Any, workdir: Path) -> float:
    from anomalib.deploy import ExportType

    path = engine.export(model=model, export_type=ExportType.OPENVINO, export_root=workdir / "export")
    folder = Path(path).parent if path else workdir / "export"
    files = [p for p in folder.rglob("*") if p.is_file() and p.suffix in {".xml", ".bin"}]
    if not files:
        msg = f"no OpenVINO files under {folder}"
        raise RuntimeError(msg)
    return sum(p.stat().st_size for p in files) / 2**20


def child_main(job_file: Path) -> int:
    job = json.loads(job_file.read_text())
    workdir = Path(job["workdir"])
    try:
        result = run_child(job, workdir)
    except Exception:  # noqa: BLE001 - reported to the parent through the exit status and the log
        traceback.print_exc()
        return 1
    Path(job["result_file"]).write_text(json.dumps(result))
    return 0


def run_child(job: dict[str, Any], workdir: Path) -> dict[str, Any]:
    import warnings

    import anomalib
    import numpy as np
    import torch
    from anomalib.callbacks.checkpoint import ModelCheckpoint
    from anomalib.engine import Engine
    from lightning import seed_everything
    from lightning.pytorch.trainer.states import TrainerFn

    warnings.filterwarnings("ignore", category=UserWarning)
    load_start = os.getloadavg()[0]
    if job["settings"]["threads"]:
        torch.set_num_threads(job["settings"]["threads"])
    seed_everything(0, workers=True)
    spec, dataset = job["model"], job["dataset"]
    print(f"job {job['id']}: {json.dumps(spec)} on {json.dumps(dataset)}", flush=True)

    datamodule = build_datamodule(job)
    datamodule.setup(TrainerFn.FITTING)  # marks it set up, so the trainer keeps the subsample below
    available = len(datamodule.train_data)
    n_train = min(job["n_train"], available)
    order = np.random.default_rng(0).permutation(available)[:n_train]  # nested subsets across scales
    datamodule.train_data = datamodule.train_data.subsample(sorted(order.tolist()))

    cap = job["settings"].get("max_test_images")
    if cap and dataset["kind"] != "texture":
        labels = datamodule.test_data.samples["label_index"].to_numpy()
        rng = np.random.default_rng(0)
        keep = [i for value in (0, 1) for i in rng.permutation(np.flatnonzero(labels == value))[:cap].tolist()]
        datamodule.test_data = datamodule.test_data.subsample(sorted(keep))

    model = build_model(spec)
    rss_before_fit = _current_rss_mb()
    peak_before_fit = _peak_rss_mb()
    engine = Engine(
        default_root_dir=workdir / "engine",
        logger=False,
        accelerator="cpu",
        devices=1,
        limit_val_batches=0,  # validation only feeds the post-processor; metrics here use raw outputs
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[ModelCheckpoint(dirpath=workdir / "ckpt", save_top_k=0, save_last=False)],
    )
    start = time.perf_counter()
    engine.fit(model=model, datamodule=datamodule)
    fit_s = time.perf_counter() - start
    fit_peak = _peak_rss_mb()
    print(f"fit done in {fit_s:.1f} s, peak RSS {fit_peak:.0f} MB", flush=True)

    result: dict[str, Any] = {
        "model": spec["name"],
        "model_kind": spec["kind"],
        "model_kwargs": spec["kwargs"],
        "dataset": dataset["name"],
        "scale": job["scale"],
        "n_train": n_train,
        "backbone": BACKBONE,
        "image_size": IMAGE_SIZE,
        "score_source": SCORE_SOURCE,
        "fit_s": fit_s,
        "fit_peak_rss_mb": fit_peak,
        "rss_before_fit_mb": rss_before_fit,
        "peak_rss_before_fit_mb": peak_before_fit,
        "fit_delta_rss_mb": fit_peak - rss_before_fit,
        "torch_threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "anomalib_version": anomalib.__version__,
    }
    if spec["kind"] == "gaussft" and model.fine_tuning:
        result["fine_tune_best_epoch"] = model.monitor.best_epoch
        result["fine_tune_epochs_run"] = max(0, len(model.monitor.history) - 1)
    result.update(evaluate(model, datamodule, dataset["masks"]))
    result["throughput_b1"] = throughput(model, datamodule, 1, job["throughput_seconds"])
    result["throughput_b16"] = throughput(model, datamodule, 16, job["throughput_seconds"])
    result["state_dict_mb"], result["stats_mb"] = state_dict_mb(model.model)
    if job["settings"]["export"]:
        result["openvino_mb"] = export_openvino(engine, model, workdir)
    result["peak_rss_mb"] = _peak_rss_mb()
    result["malloc"] = "MALLOC_MMAP_THRESHOLD_=" + os.environ.get("MALLOC_MMAP_THRESHOLD_", "(glibc default)")
    result["load_avg"] = [load_start, os.getloadavg()[0]]
    print(json.dumps(result, indent=1), flush=True)
    return result


# ----------------------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------------------


def machine_description() -> dict[str, str]:
    info = {"python": platform.python_version(), "platform": platform.platform()}
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
        models = [line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name")]
        info["cpu"] = models[0] if models else platform.processor()
    except OSError:
        info["cpu"] = platform.processor() or "unknown"
    info["logical_cores"] = str(os.cpu_count())
    if hasattr(os, "sched_getaffinity"):
        info["affinity_cores"] = str(len(os.sched_getaffinity(0)))
    try:
        meminfo = Path("/proc/meminfo").read_text().splitlines()
        total_kb = int(next(line for line in meminfo if line.startswith("MemTotal")).split()[1])
        info["ram"] = f"{total_kb / 2**20:.1f} GiB"
    except (OSError, StopIteration, ValueError):
        pass
    for package in ("torch", "anomalib", "timm", "openvino"):
        try:
            from importlib.metadata import version

            info[package] = version(package)
        except Exception:  # noqa: BLE001
            info[package] = "not installed"
    return info


def _ratio(value: float | None, reference: float | None) -> str:
    if value is None or not reference:
        return "–"
    return f"×{value / reference:.2f}"


def write_report(rows: list[dict[str, Any]], args: argparse.Namespace, command_line: str, out: Path) -> str:
    targets = [out / "results.md"]
    if args.docs:
        targets.append(Path(args.docs))
    markdown = ""
    for target in targets:
        target.parent.mkdir(parents=True, exist_ok=True)
        plots = make_plots(rows, target.parent, prefix=target.stem)
        markdown = render_markdown(rows, args, command_line, plots)
        target.write_text(markdown)
    return markdown


def render_markdown(rows: list[dict[str, Any]], args: argparse.Namespace, command_line: str, plots: list[str]) -> str:
    machine = machine_description()
    threads = sorted({r.get("torch_threads") for r in rows if r.get("torch_threads")})
    models = list(dict.fromkeys(r["model"] for r in rows))
    datasets = list(dict.fromkeys(r["dataset"] for r in rows))
    base_scale = min(r["scale"] for r in rows)
    lines = [
        "# GaussFT vs PaDiM, PatchCore, DFM",
        "",
        f"Generated {_now()} by `benchmarks/compare.py`.",
        "",
        "```bash",
        command_line,
        "```",
        *_other_commands(rows, command_line),
        "",
        "## Machine",
        "",
        f"- CPU: {machine.get('cpu')} — {machine.get('logical_cores')} logical cores"
        + (f" ({machine['affinity_cores']} usable)" if "affinity_cores" in machine else "")
        + (f", {machine['ram']} RAM" if "ram" in machine else ""),
        f"- torch {machine['torch']} (threads per job: {', '.join(map(str, threads)) or '?'}), anomalib "
        f"{machine['anomalib']}, timm {machine['timm']}, openvino {machine['openvino']}, "
        f"Python {machine['python']}",
        f"- {machine['platform']}; no GPU used (accelerator cpu)",
        f"- 1-min load average seen at job start/end: {_load_range(rows)} (timings are noisy when it exceeds the "
        "cores: other work was running)",
        f"- Allocator: {', '.join(sorted({r.get('malloc', '?') for r in rows}))}",
        "",
        "## Method",
        "",
        f"- Backbone for every model: `{BACKBONE}` (ImageNet weights), input {IMAGE_SIZE}×{IMAGE_SIZE}, normalised "
        "with the backbone's mean/std. PaDiM: `blocks.1,2,4`, 100 random channels; PatchCore: `blocks.2,4`, "
        f"coreset ratio {args.coreset_ratio}; DFM: `blocks.4`; GaussFT: its defaults (9 pooled levels for the "
        "image score, levels 3-5 shared Gaussians for the map) unless the model's kwargs say otherwise.",
        f"- Scores: {SCORE_SOURCE}; AUROC by `sklearn.metrics.roc_auc_score`. Pixel AUROC and AUPRO (anomalib, "
        "FPR ≤ 0.3) at the map's 224 px resolution; only for datasets with masks.",
        "- Fit time: wall time of `engine.fit` (no validation, no checkpoint written). Fit peak RSS: the job's own "
        "`ru_maxrss` right after the fit (each job is a fresh process, `num_workers=0`); Δ = peak minus the RSS "
        "before the fit (weights, data module and imports already loaded). ×PaDiM: ratio to PaDiM on the same "
        "dataset and training-set size (memory ratio on the absolute peak).",
        "- Throughput: `model.model` on pre-processed 224 px tensors, `torch.inference_mode`, images/s.",
        "- Stored: `state_dict` of the torch model in MB (float32 unless the model stores otherwise); statistics = "
        "without the backbone's weights (what a frozen model adds on top of the public backbone). OpenVINO: size "
        "of the FP32 IR (`.xml` + `.bin`) written by `engine.export`.",
        "- GaussFT's fit memory does not depend on the number of training images once it exceeds one batch "
        f"(batch size {args.batch_size}): below that, smaller batches make its Δ smaller.",
        "",
        f"## Results (training-set scale ×{base_scale})",
        "",
    ]
    main_rows = [r for r in rows if r["scale"] == base_scale]
    padim = {(r["dataset"], r["scale"]): r for r in rows if r["model"] == "padim"}
    has_export = any(r.get("openvino_mb") is not None for r in rows)
    for dataset in datasets:
        subset = [r for r in main_rows if r["dataset"] == dataset]
        if not subset:
            continue
        sample = subset[0]
        lines += [
            f"### {dataset} ({sample['n_train']} train, {sample['n_test']} test of which "
            f"{sample['n_test_anomalous']} anomalous)",
            "",
        ]
        header = (
            "| model | image AUROC | pixel AUROC | AUPRO | fit s | fit ×PaDiM | fit peak MB | Δ MB | peak ×PaDiM "
            "| img/s b1 | img/s b16 | stored MB | statistics MB |"
        )
        sep = "|---|" + "---:|" * 12
        if has_export:
            header += " OpenVINO MB |"
            sep += "---:|"
        lines += [header, sep]
        for model in models:
            row = next((r for r in subset if r["model"] == model), None)
            if row is None:
                continue
            ref = padim.get((dataset, row["scale"]))
            name = model
            if row.get("fine_tune_epochs_run") is not None:
                name += f" (best epoch {row['fine_tune_best_epoch']}/{row['fine_tune_epochs_run']})"
            cells = [
                name,
                _fmt(row["image_auroc"]),
                _fmt(row.get("pixel_auroc")),
                _fmt(row.get("aupro")),
                _fmt(row["fit_s"], 1),
                _ratio(row["fit_s"], ref and ref["fit_s"]),
                _fmt(row["fit_peak_rss_mb"], 0),
                _fmt(row["fit_delta_rss_mb"], 0),
                _ratio(row["fit_peak_rss_mb"], ref and ref["fit_peak_rss_mb"]),
                _fmt(row["throughput_b1"], 1),
                _fmt(row["throughput_b16"], 1),
                _fmt(row["state_dict_mb"], 1),
                _fmt(row["stats_mb"], 1),
            ]
            if has_export:
                cells.append(_fmt(row.get("openvino_mb"), 1))
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    if len(datasets) > 1:
        lines += [
            "### Mean over datasets",
            "",
            "| model | datasets | mean image AUROC | mean pixel AUROC | mean fit ×PaDiM |",
        ]
        lines.append("|---|---:|---:|---:|---:|")
        for model in models:
            subset = [r for r in main_rows if r["model"] == model]
            image = [r["image_auroc"] for r in subset if r["image_auroc"] is not None]
            pixel = [r["pixel_auroc"] for r in subset if r.get("pixel_auroc") is not None]
            ratios = [
                r["fit_s"] / padim[(r["dataset"], r["scale"])]["fit_s"]
                for r in subset
                if (r["dataset"], r["scale"]) in padim
            ]
            lines.append(
                f"| {model} | {len(subset)} | {_fmt(sum(image) / len(image) if image else None)} | "
                f"{_fmt(sum(pixel) / len(pixel) if pixel else None)} | "
                f"{'×' + format(sum(ratios) / len(ratios), '.2f') if ratios else '–'} |"
            )
        lines.append("")
    if len({r["scale"] for r in rows}) > 1:
        lines += [
            "## Scaling with the training-set size",
            "",
            "Nested training subsets (the ×1 images are part of ×2, …); the test set is the same for every size.",
            "",
        ]
        for dataset in datasets:
            subset = [r for r in rows if r["dataset"] == dataset]
            scales = sorted({r["scale"] for r in subset})
            lines += [f"### {dataset}", ""]
            lines.append(
                "| model | "
                + " | ".join(f"×{s} (n={_n_for(subset, s)}): fit s / peak MB / Δ MB" for s in scales)
                + " |"
            )
            lines.append("|---|" + "---:|" * len(scales))
            for model in models:
                cells = []
                for scale in scales:
                    row = next((r for r in subset if r["model"] == model and r["scale"] == scale), None)
                    cells.append(
                        "–"
                        if row is None
                        else f"{row['fit_s']:.1f} / {row['fit_peak_rss_mb']:.0f} / {row['fit_delta_rss_mb']:.0f}"
                    )
                lines.append(f"| {model} | " + " | ".join(cells) + " |")
            lines.append("")
    if plots:
        lines += ["## Plots", ""] + [f"![{Path(p).stem}]({p})" for p in plots] + [""]
    lines += [
        "## Model configurations",
        "",
        "| model | kwargs |",
        "|---|---|",
    ]
    for model in models:
        row = next(r for r in rows if r["model"] == model)
        lines.append(f"| {model} | `{json.dumps(row['model_kwargs'])}` |")
    lines.append("")
    return "\n".join(lines)


def _other_commands(rows: list[dict[str, Any]], command_line: str) -> list[str]:
    others = sorted({r.get("command", "") for r in rows} - {command_line, ""})
    if not others:
        return []
    intro = "Some rows were measured by earlier invocations (resumed), with the same job settings:"
    return ["", intro, "", "```bash", *others, "```"]


def _load_range(rows: list[dict[str, Any]]) -> str:
    loads = [x for r in rows for x in r.get("load_avg", [])]
    return f"{min(loads):.1f}–{max(loads):.1f}" if loads else "?"


def _n_for(rows: list[dict[str, Any]], scale: int) -> str:
    sizes = sorted({r["n_train"] for r in rows if r["scale"] == scale})
    return ",".join(map(str, sizes))


def make_plots(rows: list[dict[str, Any]], folder: Path, prefix: str) -> list[str]:
    """Write PNG plots next to the markdown; return their names (relative links)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    names = []
    models = list(dict.fromkeys(r["model"] for r in rows))
    datasets = list(dict.fromkeys(r["dataset"] for r in rows))
    base_scale = min(r["scale"] for r in rows)
    main_rows = [r for r in rows if r["scale"] == base_scale]

    fig, ax = plt.subplots(figsize=(max(5, 1.6 * len(datasets) + 2), 3.8))
    width = 0.8 / max(1, len(models))
    for i, model in enumerate(models):
        values = [
            next((r["image_auroc"] or 0 for r in main_rows if r["model"] == model and r["dataset"] == d), 0)
            for d in datasets
        ]
        ax.bar([j + i * width for j in range(len(datasets))], values, width, label=model)
    ax.set_xticks([j + width * (len(models) - 1) / 2 for j in range(len(datasets))], datasets)
    ax.set_ylabel("image AUROC")
    lowest = min((r["image_auroc"] for r in main_rows if r["image_auroc"] is not None), default=0.5)
    ax.set_ylim(min(0.4, lowest - 0.05), 1.0)
    ax.axhline(0.5, color="grey", lw=0.5)
    ax.legend(fontsize=7, ncol=2)
    ax.set_title(f"Image AUROC ({BACKBONE}, {IMAGE_SIZE} px)")
    fig.tight_layout()
    name = f"{prefix}_image_auroc.png"
    fig.savefig(folder / name, dpi=120)
    plt.close(fig)
    names.append(name)

    if len({r["scale"] for r in rows}) > 1:
        fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
        for model in models:
            for dataset in datasets:
                subset = sorted(
                    (r for r in rows if r["model"] == model and r["dataset"] == dataset), key=lambda r: r["n_train"]
                )
                if len(subset) < 2:
                    continue
                label = model if len(datasets) == 1 else f"{model} / {dataset}"
                x = [r["n_train"] for r in subset]
                axes[0].plot(x, [r["fit_peak_rss_mb"] for r in subset], marker="o", label=label)
                axes[1].plot(x, [r["fit_delta_rss_mb"] for r in subset], marker="o", label=label)
                axes[2].plot(x, [r["fit_s"] for r in subset], marker="o", label=label)
        axes[0].set_ylabel("fit peak RSS (MB)")
        axes[1].set_ylabel("fit Δ RSS over pre-fit (MB)")
        axes[2].set_ylabel("fit time (s)")
        for ax in axes:
            ax.set_xlabel("training images")
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize=7)
        fig.suptitle("Fit cost vs training-set size")
        fig.tight_layout()
        name = f"{prefix}_scaling.png"
        fig.savefig(folder / name, dpi=120)
        plt.close(fig)
        names.append(name)
    return names


if __name__ == "__main__":
    sys.exit(main())
