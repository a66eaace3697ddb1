"""Compare GaussFT with PaDiM, PatchCore and DFM on one backbone: accuracy, time, memory, size.

Every model uses the same backbone (timm ``tf_efficientnet_lite0``, real ImageNet weights), the same input
(224 x 224, resized, normalised with the backbone's own mean/std) and the same data loaders (``num_workers=0``).
Each (model, dataset, training-set size) job runs in a fresh Python subprocess (``compare_job.py``), so that the
peak memory it reports (``ru_maxrss`` of that process, read right after ``engine.fit``) is the fit's own; results
are appended to ``OUT/results.jsonl`` as each job finishes, and a re-run skips the jobs already there (resume after
interruption). The report (``compare_report.py``) is rebuilt from all rows at the end.

This file is the command line and the scheduler; ``common.py`` holds what the benchmark scripts share.

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
import hashlib
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

from common import BACKBONE, BASELINES, ELPV, IMAGE_SIZE, TEXTURES, now
from compare_report import markdown_table_for_console, summary, write_report

DEFAULT_TEXTURE_TRAIN = 60
MMAP_THRESHOLD = 1 << 20  # glibc: allocations >= 1 MiB are mmap-ed and returned to the OS on free
MODEL_ORDER = ["gaussft_frozen", "gaussft_ft", "padim", "patchcore", "dfm"]
JOB_SCRIPT = Path(__file__).resolve().with_name("compare_job.py")


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
    from data_generators import make_elpv_dataset, make_texture_dataset

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
        command = [sys.executable, str(JOB_SCRIPT), str(job_file)]
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
    if args.child:  # the job runner of earlier versions of this script
        from compare_job import main as job_main

        return job_main(Path(args.child))
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
                    handle.write(json.dumps({"id": job["id"], "error": error, "time": now()}) + "\n")
                print(f"FAILED ({seconds:.0f} s): {error.splitlines()[0]}", flush=True)
                continue
            result.update(id=job["id"], command=command_line, finished=now(), job_wall_s=seconds)
            with results_path.open("a") as handle:
                handle.write(json.dumps(result) + "\n")
            done[job["id"]] = result
            print(f"{summary(result)} ({seconds:.0f} s)", flush=True)
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


if __name__ == "__main__":
    sys.exit(main())
