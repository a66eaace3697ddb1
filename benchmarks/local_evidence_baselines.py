"""Baselines for issue #14: PaDiM, PatchCore, DFM and default frozen GaussFT on the six real sets, one run.

Every job is ``benchmarks/compare.py``'s own child (same backbone for every model, ``tf_efficientnet_lite0`` or
``--backbone``'s, ImageNet weights, 224 x 224 resize, the backbone's mean/std, batch 16, 1 thread,
``MALLOC_MMAP_THRESHOLD_=1 MiB``, raw ``model.model`` outputs scored with sklearn), run in a fresh process; the
only differences from ``compare.py``'s command line are the data folders (the shared ones under ``/work/data``,
used as they are: compare.py would generate its own texture copies and re-export ELPV) and that each job also
saves its per-image scores (``OUT/scores/<model>__<dataset>.npz``) for paired comparisons.

Training sets: at most ``--train-images`` (200) normal images, the seeded subset compare.py draws
(``np.random.default_rng(0).permutation(n)[:200]`` over the datamodule's training list), the same for every
model; the textures have 100. Test sets: complete.

Command used for docs/local_evidence/baselines.jsonl::

    PYTHONPATH=src HF_HUB_CACHE=/work/shared/hf-cache/hub HF_HUB_OFFLINE=1 nice -n 10 \
        python benchmarks/local_evidence_baselines.py --out docs/local_evidence --coreset-ratio 0.02
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common
import compare
import compare_job
from compare_report import summary

DATASETS = {
    "elpv_mono": {"kind": "elpv", "root": "/work/data/elpv/elpv_mono", "masks": False},
    "elpv_poly": {"kind": "elpv", "root": "/work/data/elpv/elpv_poly", "masks": False},
    "bsdata": {"kind": "mvtec", "root": "/work/data/bsdata", "category": "bsdata", "masks": True},
    "brick": {"kind": "mvtec", "root": "/work/data/textures", "category": "brick", "masks": True},
    "grass": {"kind": "mvtec", "root": "/work/data/textures", "category": "grass", "masks": True},
    "gravel": {"kind": "mvtec", "root": "/work/data/textures", "category": "gravel", "masks": True},
    # not used to choose any default: the check that they generalise (benchmarks/make_magnetic_tile.py)
    "magnetic_tile": {"kind": "mvtec", "root": "/work/data/magnetic_tile", "category": "magnetic_tile", "masks": True},
    # added after every default was chosen, never used to choose one (benchmarks/make_kolektorsdd.py, make_deeppcb.py)
    "kolektorsdd": {"kind": "mvtec", "root": "/work/data/kolektorsdd", "category": "kolektorsdd", "masks": True},
    "deeppcb": {"kind": "mvtec", "root": "/work/data/deeppcb", "category": "deeppcb", "masks": True},
}


def count_train(spec: dict) -> int:
    folder = Path(spec["root"]) / spec.get("category", "") / "train" / "good"
    return sum(1 for p in folder.iterdir() if p.is_file())


def child(job_file: Path) -> int:
    """compare.py's child job (``compare_job.main``), with ``evaluate`` wrapped to save per-image scores."""
    import numpy as np

    job = json.loads(job_file.read_text())
    original = compare_job.evaluate

    def evaluate(model, loader, masks):
        import torch

        result = original(model, loader, masks)
        scores, labels, paths = [], [], []
        with torch.inference_mode():
            for batch in loader:
                out = model.model(model.pre_processor.transform(batch.image))
                scores.append(out.pred_score.reshape(-1).float().cpu())
                labels.append(batch.gt_label.reshape(-1).int().cpu())
                paths += [str(p) for p in batch.image_path]
        Path(job["scores_file"]).parent.mkdir(parents=True, exist_ok=True)
        np.savez(
            job["scores_file"],
            score=torch.cat(scores).numpy(),
            label=torch.cat(labels).numpy(),
            path=np.array(paths),
        )
        return result

    compare_job.evaluate = evaluate
    return compare_job.main(job_file)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", default=",".join(DATASETS))
    parser.add_argument("--models", default="gaussft_frozen,dfm,padim,patchcore")
    parser.add_argument("--train-images", type=int, default=200)
    parser.add_argument("--coreset-ratio", type=float, default=0.02)
    parser.add_argument("--throughput-seconds", type=float, default=1.0)
    parser.add_argument("--out", default="docs/local_evidence")
    parser.add_argument("--results-file", default="baselines.jsonl", help="name of the results file in --out")
    parser.add_argument("--epochs", type=int, default=6, help="fine_tune_epochs of gaussft_ft and variants")
    parser.add_argument("--variants", default=None, help="GaussFT variants, as compare.py's --variants")
    parser.add_argument(
        "--backbone",
        default=None,
        help="timm backbone of every model (default tf_efficientnet_lite0; ImageNet weights from HF_HUB_CACHE)",
    )
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child(Path(args.child))

    if args.backbone:  # the child jobs read it through common.BACKBONE
        os.environ["GAUSSFT_BENCH_BACKBONE"] = common.BACKBONE = args.backbone
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cargs = compare.parse_args(
        ["--coreset-ratio", str(args.coreset_ratio), "--models", args.models, "--epochs", str(args.epochs)]
        + (["--variants", args.variants] if args.variants else [])
    )
    models = compare.model_specs(cargs)
    settings = {
        "backbone": common.BACKBONE,
        "image_size": common.IMAGE_SIZE,
        "batch_size": 16,
        "threads": 1,
        "export": False,
        "test_images": None,
        "malloc": "fixed",
    }
    jobs = []
    for model in models:  # model-major: the slow PatchCore jobs come last
        for name in [d for d in args.datasets.split(",") if d]:
            dataset = {"name": name, **DATASETS[name]}
            job = {
                "model": model,
                "dataset": dataset,
                "scale": 1,
                "n_train": min(args.train_images, count_train(dataset)),
                "settings": settings,
                "throughput_seconds": args.throughput_seconds,
            }
            job["id"] = compare.job_id(job)
            jobs.append(job)
    results_path = out / args.results_file
    done = compare.load_results(results_path)
    command_line = " ".join([sys.executable, *sys.argv])
    for index, job in enumerate(jobs, 1):
        label = f"[{index}/{len(jobs)}] {job['model']['name']} on {job['dataset']['name']} (n_train {job['n_train']})"
        if job["id"] in done:
            print(f"{label}: done already", flush=True)
            continue
        print(f"{label} ...", end=" ", flush=True)
        logs = out / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        log_path = logs / f"{job['model']['name']}__{job['dataset']['name']}.log"
        with tempfile.TemporaryDirectory(prefix="baseline_job_") as tmp:
            job_file = Path(tmp) / "job.json"
            result_file = Path(tmp) / "result.json"
            scores_file = out / "scores" / f"{job['model']['name']}__{job['dataset']['name']}.npz"
            job_file.write_text(
                json.dumps({**job, "workdir": tmp, "result_file": str(result_file), "scores_file": str(scores_file)})
            )
            env = dict(os.environ, PYTHONUNBUFFERED="1", MALLOC_MMAP_THRESHOLD_=str(compare.MMAP_THRESHOLD))
            start = time.perf_counter()
            with log_path.open("w") as log:
                proc = subprocess.run(
                    [sys.executable, str(Path(__file__).resolve()), "--child", str(job_file)],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=env,
                    check=False,
                )
            seconds = time.perf_counter() - start
            if proc.returncode != 0 or not result_file.is_file():
                print(f"FAILED ({seconds:.0f} s), see {log_path}", flush=True)
                continue
            result = json.loads(result_file.read_text())
        result.update(id=job["id"], command=command_line, finished=common.now(), job_wall_s=seconds)
        with results_path.open("a") as handle:
            handle.write(json.dumps(result) + "\n")
        print(f"{summary(result)} ({seconds:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
