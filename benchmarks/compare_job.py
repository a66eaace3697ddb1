"""One job of ``compare.py``: fit and evaluate one model on one dataset, in a process of its own.

``compare.py`` runs ``python benchmarks/compare_job.py JOB.json`` once per job, so that the peak memory the job
reports (``ru_maxrss`` of this process, read right after ``engine.fit``) is the fit's own. ``JOB.json`` holds the
job (model spec, dataset spec, training-set size, settings), its ``workdir`` and the ``result_file`` the result
is written to as JSON. Exit status 0 with a result file, 1 (traceback on stderr) otherwise.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from common import (
    BACKBONE,
    IMAGE_SIZE,
    SCORE_SOURCE,
    build_model,
    current_rss_mb,
    evaluate,
    folder_datamodule,
    mvtec_datamodule,
    peak_rss_mb,
    state_dict_mb,
    throughput,
)


def build_datamodule(job: dict[str, Any]) -> Any:
    """The job's datamodule: ELPV as a ``Folder``, textures and ``--mvtec`` as ``MVTecAD``."""
    dataset, batch = job["dataset"], job["settings"]["batch_size"]
    if dataset["kind"] == "elpv":
        return folder_datamodule(dataset["name"], dataset["root"], batch, batch)
    return mvtec_datamodule(dataset["root"], dataset["category"], batch, batch)


def export_openvino(engine: Any, model: Any, workdir: Path) -> float:
    """Export with ``engine.export`` (OpenVINO FP32); size of the ``.xml`` + ``.bin`` in MB."""
    from anomalib.deploy import ExportType

    path = engine.export(model=model, export_type=ExportType.OPENVINO, export_root=workdir / "export")
    folder = Path(path).parent if path else workdir / "export"
    files = [p for p in folder.rglob("*") if p.is_file() and p.suffix in {".xml", ".bin"}]
    if not files:
        msg = f"no OpenVINO files under {folder}"
        raise RuntimeError(msg)
    return sum(p.stat().st_size for p in files) / 2**20


def subsample(datamodule: Any, job: dict[str, Any]) -> int:
    """Keep the job's nested training subset (and at most ``max_test_images`` per test class); return n_train."""
    import numpy as np

    available = len(datamodule.train_data)
    n_train = min(job["n_train"], available)
    order = np.random.default_rng(0).permutation(available)[:n_train]  # nested subsets across scales
    datamodule.train_data = datamodule.train_data.subsample(sorted(order.tolist()))
    cap = job["settings"].get("max_test_images")
    if cap and job["dataset"]["kind"] != "texture":
        labels = datamodule.test_data.samples["label_index"].to_numpy()
        rng = np.random.default_rng(0)
        keep = [i for value in (0, 1) for i in rng.permutation(np.flatnonzero(labels == value))[:cap].tolist()]
        datamodule.test_data = datamodule.test_data.subsample(sorted(keep))
    return n_train


def fitting_engine(workdir: Path) -> Any:
    """The jobs' ``Engine``: one CPU device, no logger, progress bar or checkpoint files, no validation pass."""
    from anomalib.callbacks.checkpoint import ModelCheckpoint
    from anomalib.engine import Engine

    return Engine(
        default_root_dir=workdir / "engine",
        logger=False,
        accelerator="cpu",
        devices=1,
        limit_val_batches=0,  # validation only feeds the post-processor; metrics here use raw outputs
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[ModelCheckpoint(dirpath=workdir / "ckpt", save_top_k=0, save_last=False)],
    )


def run_job(job: dict[str, Any], workdir: Path) -> dict[str, Any]:
    """Fit, evaluate, time and measure one model on one dataset; the result row of ``results.jsonl``."""
    import warnings

    import anomalib
    import torch
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
    n_train = subsample(datamodule, job)

    model = build_model(spec["kind"], {"evaluator": False, "visualizer": False, **spec["kwargs"]})
    rss_before_fit = current_rss_mb()
    peak_before_fit = peak_rss_mb()
    engine = fitting_engine(workdir)
    start = time.perf_counter()
    engine.fit(model=model, datamodule=datamodule)
    fit_s = time.perf_counter() - start
    fit_peak = peak_rss_mb()
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
    if spec["kind"] == "gaussft" and model.forgetting is not None:
        result["fine_tune_best_epoch"] = model.forgetting.best_epoch
        result["fine_tune_epochs_run"] = max(0, len(model.forgetting.history) - 1)
        result["fine_tune_kept_alpha"] = model.forgetting.kept_alpha  # WiSE-FT weight kept (None: best epoch)
        result["fine_tune_history"] = model.forgetting.history  # per epoch: loss, pseudo-anomaly AUROCs
        result["fine_tune_interpolation"] = model.forgetting.interpolation  # per WiSE-FT α: pseudo-anomaly AUROC
    result.update(evaluate(model, datamodule.test_dataloader(), dataset["masks"]))
    result["throughput_b1"] = throughput(model, datamodule.test_dataloader(), 1, job["throughput_seconds"])
    result["throughput_b16"] = throughput(model, datamodule.test_dataloader(), 16, job["throughput_seconds"])
    result["state_dict_mb"], result["stats_mb"] = state_dict_mb(model.model)
    if job["settings"]["export"]:
        result["openvino_mb"] = export_openvino(engine, model, workdir)
    result["peak_rss_mb"] = peak_rss_mb()
    result["malloc"] = "MALLOC_MMAP_THRESHOLD_=" + os.environ.get("MALLOC_MMAP_THRESHOLD_", "(glibc default)")
    result["load_avg"] = [load_start, os.getloadavg()[0]]
    print(json.dumps(result, indent=1), flush=True)
    return result


def main(job_file: Path) -> int:
    """Run the job described in ``job_file``; write its result to the file the job names."""
    job = json.loads(job_file.read_text())
    try:
        result = run_job(job, Path(job["workdir"]))
    except Exception:  # noqa: BLE001 - reported to the scheduler through the exit status and the log
        traceback.print_exc()
        return 1
    Path(job["result_file"]).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(f"usage: {sys.argv[0]} JOB.json (written by compare.py)")
    sys.exit(main(Path(sys.argv[1])))
