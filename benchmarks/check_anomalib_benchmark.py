"""Run ``anomalib benchmark --config CONFIG`` and check that every job of its grid wrote a row to results.csv.

anomalib 2.7's benchmark pipeline exits 0 even when jobs fail: a failed job simply has no row in
``runs/benchmark/<date>/results.csv`` (its traceback is in ``runs/pipeline.log``), and when the table cannot be
built at all (every job failed, or the jobs' config keys differ) no CSV is written. This script

1. runs ``anomalib benchmark --config CONFIG`` in ``--workdir`` (the pipeline writes ``runs/`` relative to the
   working directory; relative paths in the config, e.g. the dataset ``root``, are resolved there too), streaming
   its output;
2. expands the config's ``grid`` lists the way anomalib does (every key containing ``grid`` is a list of
   alternatives; one job per combination, once per entry of the top-level ``accelerator`` list);
3. reads every ``runs/benchmark/*/results.csv`` written during the run (anomalib writes one CSV per accelerator)
   and counts the rows of each (accelerator, grid values) combination; a ``grid`` entry that is a
   ``class_path``/``init_args`` dict (the model grid) is identified by its ``class_path``;
4. prints expected vs found rows, lists the missing jobs with the error lines logged to ``runs/pipeline.log``
   during the run, and exits 1 if a job is missing, no CSV was written or ``anomalib`` itself failed.

``--smoke`` derives a tiny config from CONFIG instead: a generated MVTec-layout texture dataset (brick, 64 px,
12 train / 4 good / 4 defective test images) as the only category, ``pre_trained: false`` for every model (no
weight download), ``accelerator: [cpu]``, ``num_workers: 0`` and batch size 4. Everything else (models, their
other arguments, seed) comes from CONFIG.

Example::

    # full grid (writes runs/ and reads ./datasets/MVTecAD relative to --workdir)
    python benchmarks/check_anomalib_benchmark.py --config configs/benchmark.yaml --workdir .

    # check the newest results.csv of an earlier `anomalib benchmark` run without running it again
    python benchmarks/check_anomalib_benchmark.py --config configs/benchmark.yaml --workdir . --no-run

    # smoke test of the pipeline with the models of configs/benchmark.yaml, random weights
    python benchmarks/check_anomalib_benchmark.py --config configs/benchmark.yaml --workdir /tmp/bench_smoke --smoke
"""

from __future__ import annotations

import argparse
import copy
import csv
import re
import shutil
import subprocess
import sys
import time
from collections import Counter
from itertools import product
from pathlib import Path
from typing import Any

import yaml

JOB_SECTION = "benchmark"  # BenchmarkJob.name: the config section the benchmark runner reads
RESULTS_GLOB = "runs/benchmark/*/results.csv"
PIPELINE_LOG = Path("runs") / "pipeline.log"
SMOKE_TEXTURE = "brick"
SMOKE_BATCH_SIZE = 4

Key = tuple[tuple[str, str], ...]  # ((column, value), ...) identifying one job in results.csv


# --------------------------------------------------------------------------------------------------------------
# Grid expansion (mirrors anomalib.pipelines.components.utils.get_iterator_from_grid_dict)
# --------------------------------------------------------------------------------------------------------------


def flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Flatten nested dicts with dotted keys, lists kept as values (as ``anomalib.utils.config.flatten_dict``)."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def as_list(value: Any) -> list[Any]:
    """Alternatives of a grid value: strings and scalars are one alternative, other iterables several."""
    if isinstance(value, str | dict) or not hasattr(value, "__iter__"):
        return [value]
    return list(value)


def accelerators(config: dict[str, Any]) -> list[str]:
    """The top-level ``accelerator`` entry as a list (anomalib runs one runner per accelerator)."""
    return [str(a) for a in as_list(config.get("accelerator", "cpu"))]


def cell(value: Any) -> str:
    """A value as pandas writes it to the CSV (``str``; ``None`` as an empty cell)."""
    return "" if value is None else str(value)


def job_key(column: str, value: Any) -> list[tuple[str, str]]:
    """Identify one grid choice by CSV columns: a ``class_path`` dict by its class path, other dicts by all fields."""
    if isinstance(value, dict):
        if "class_path" in value:
            return [(f"{column}.class_path", cell(value["class_path"]))]
        return [(k, cell(v)) for k, v in flatten(value, f"{column}.").items()]
    return [(column, cell(value))]


def expected_jobs(config: dict[str, Any]) -> Counter[Key]:
    """Count the jobs anomalib runs for ``config``: product of the grid lists, times the accelerators."""
    flat = flatten(config.get(JOB_SECTION) or {})
    grid = {key: as_list(value) for key, value in flat.items() if "grid" in key}  # anomalib: substring match
    jobs: Counter[Key] = Counter()
    for accelerator in accelerators(config):
        for combination in product(*grid.values()):
            key = [("accelerator", accelerator)]
            for grid_key, value in zip(grid, combination, strict=True):
                key += job_key(grid_key.removesuffix(".grid"), value)
            jobs[tuple(key)] += 1
    return jobs


# --------------------------------------------------------------------------------------------------------------
# Smoke config
# --------------------------------------------------------------------------------------------------------------


def smoke_config(config: dict[str, Any], workdir: Path) -> dict[str, Any]:
    """Derive the smoke-test config: tiny generated dataset, random weights, CPU, no loader workers."""
    from data_generators import make_texture_dataset

    root = workdir / "datasets" / "smoke_textures"
    make_texture_dataset(root, textures=(SMOKE_TEXTURE,), image_size=64, n_train=12, n_test_good=4, n_test_defect=4)

    smoke = copy.deepcopy(config)
    smoke["accelerator"] = ["cpu"]
    section = smoke[JOB_SECTION]
    models = section["model"]["grid"] if "grid" in section["model"] else [section["model"]]
    for model in models:  # the same key for every model: BenchmarkJob.collect needs identical keys
        model.setdefault("init_args", {})["pre_trained"] = False
    data_args = section["data"].setdefault("init_args", {})
    data_args.update(
        root=str(root.resolve()),
        category={"grid": [SMOKE_TEXTURE]},
        num_workers=0,
        train_batch_size=SMOKE_BATCH_SIZE,
        eval_batch_size=SMOKE_BATCH_SIZE,
    )
    return smoke


# --------------------------------------------------------------------------------------------------------------
# Running and checking
# --------------------------------------------------------------------------------------------------------------


def anomalib_command() -> list[str]:
    """The ``anomalib`` console script of this interpreter's environment (else the one on PATH)."""
    local = Path(sys.executable).parent / "anomalib"
    if local.is_file():
        return [str(local)]
    found = shutil.which("anomalib")
    if found is None:
        sys.exit("error: no `anomalib` executable next to this Python or on PATH")
    return [found]


def run_benchmark(config_path: Path, workdir: Path) -> int:
    """Run ``anomalib benchmark --config CONFIG`` in ``workdir``, streaming its output; return its exit status."""
    command = [*anomalib_command(), "benchmark", "--config", str(config_path)]
    print(f"$ cd {workdir} && {' '.join(command)}", flush=True)
    with subprocess.Popen(command, cwd=workdir, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            print(line, end="", flush=True)
        return proc.wait()


def result_files(workdir: Path, since: float | None) -> list[Path]:
    """CSV files written at or after ``since`` (all of them, oldest first); ``None``: only the newest one."""
    files = sorted(workdir.glob(RESULTS_GLOB), key=lambda path: path.stat().st_mtime)
    if since is None:
        return files[-1:]
    return [path for path in files if path.stat().st_mtime >= since]


def found_jobs(files: list[Path], columns: list[str]) -> tuple[Counter[Key], list[dict[str, str]]]:
    """Count the rows of ``files`` by the values of ``columns``; also return the rows."""
    rows: list[dict[str, str]] = []
    for path in files:
        with path.open(newline="", encoding="utf-8") as handle:
            rows += list(csv.DictReader(handle))
    jobs = Counter(tuple((column, row.get(column, "<no column>")) for column in columns) for row in rows)
    return jobs, rows


def log_summary(log: Path, offset: int) -> tuple[int, list[str], bool]:
    """What ``log`` says after byte ``offset``: finished jobs, distinct exception lines, whether collect failed.

    anomalib attaches its file handler to every logger, so one record can appear several times: finished jobs are
    counted as distinct "Completed with result" lines.
    """
    if not log.is_file():
        return 0, [], False
    with log.open(encoding="utf-8", errors="replace") as handle:
        handle.seek(offset)
        text = handle.read()
    completed = len({line for line in text.splitlines() if "Completed with result" in line})
    # Exception lines of the tracebacks ("pkg.SomeError: message"), without the LoggerRedirectError wrapper that
    # anomalib's hide_output raises around every job.
    pattern = re.compile(r"^([A-Za-z_][\w.]*(?:Error|Exception)\b.*)$", re.MULTILINE)
    lines = [m.group(1)[:300] for m in pattern.finditer(text) if "LoggerRedirectError" not in m.group(1)]
    collect_failed = "An error occurred when running the runner" in text and "in collect" in text
    return completed, list(dict.fromkeys(lines)), collect_failed


def short(column: str) -> str:
    """Short name of a CSV column: ``model.class_path`` -> ``model``, ``data.init_args.category`` -> ``category``."""
    parts = column.split(".")
    return parts[-2] if column.endswith(".class_path") else parts[-1]


def label(key: Key) -> str:
    """``column=value`` pairs of a job key, with short column names."""
    return ", ".join(f"{short(column)}={value}" for column, value in key)


def report(expected: Counter[Key], found: Counter[Key], rows: list[dict[str, str]], files: list[Path]) -> int:
    """Print expected vs found rows and the metrics; return the number of missing rows."""
    metric_columns = [c for c in (rows[0] if rows else {}) if re.match(r"^(image|pixel)_", c) or c.endswith("duration")]
    if rows:
        print("\nresults.csv rows:")
        id_columns = [column for column, _ in next(iter(expected))]
        print(" | ".join([short(c) for c in id_columns] + metric_columns))
        for row in rows:
            values = [row.get(c, "") for c in id_columns]
            values += [f"{float(row[c]):.4f}" if row.get(c) else "" for c in metric_columns]
            print(" | ".join(values))

    print(f"\n{'job':<60} {'expected':>8} {'found':>6}")
    missing = 0
    for key in sorted(set(expected) | set(found)):
        n_expected, n_found = expected.get(key, 0), found.get(key, 0)
        flag = "" if n_found == n_expected else ("  MISSING" if n_found < n_expected else "  UNEXPECTED")
        print(f"{label(key):<60} {n_expected:>8} {n_found:>6}{flag}")
        missing += max(n_expected - n_found, 0)
    print(f"{'total':<60} {sum(expected.values()):>8} {sum(found.values()):>6}")
    print("CSV: " + (", ".join(str(path) for path in files) if files else "none"))
    return missing


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=Path("configs/benchmark.yaml"), help="benchmark config")
    parser.add_argument("--workdir", type=Path, default=Path(), help="working directory of the run (runs/ goes here)")
    parser.add_argument("--smoke", action="store_true", help="run a tiny derived config (see the module docstring)")
    parser.add_argument("--no-run", action="store_true", help="only check the newest results.csv in --workdir")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark (unless ``--no-run``), check its CSV, return the exit status."""
    args = parse_args(argv)
    workdir = args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    config_path = args.config.resolve()
    config = yaml.safe_load(config_path.read_text(encoding="utf-8"))
    if args.smoke:
        config = smoke_config(config, workdir)
        config_path = workdir / "benchmark_smoke.yaml"
        config_path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
        print(f"smoke config: {config_path}")

    expected = expected_jobs(config)
    log = workdir / PIPELINE_LOG
    log_offset = log.stat().st_size if log.is_file() else 0
    status, wall, since = 0, 0.0, None
    if not args.no_run:
        since = time.time() - 1.0  # the CSV directory name has one-second resolution; mtime is finer
        start = time.perf_counter()
        status = run_benchmark(config_path, workdir)
        wall = time.perf_counter() - start
        print(f"\n`anomalib benchmark` exited with status {status} after {wall:.0f} s")
    elif len(accelerators(config)) > 1:
        print("note: --no-run checks only the newest results.csv; anomalib writes one per accelerator")

    files = result_files(workdir, since)
    columns = list(dict.fromkeys(column for key in expected for column, _ in key))
    found, rows = found_jobs(files, columns)
    missing = report(expected, found, rows, files)

    completed, error_lines, collect_failed = log_summary(log, log_offset if since is not None else 0)
    if missing or not files:
        what = f"{missing} of {sum(expected.values())} jobs have no row" if files else "no results.csv was written"
        print(f"\nFAILED: {what}. Tracebacks: {log}")
        if since is not None:
            print(f"{completed} job(s) logged 'Completed with result' during this run; exception lines:")
        for line in error_lines[:20]:
            print(f"  {line}")
        if collect_failed:
            print(
                "BenchmarkJob.collect failed: anomalib builds the table from the first job's result keys, so every "
                "job needs the same config keys and the same test metrics. The finished jobs' results are in the "
                "'Completed with result' lines of the log."
            )
        return 1
    if status != 0:
        print(f"\nFAILED: `anomalib benchmark` exited with status {status}")
        return 1
    print(f"\nOK: all {sum(expected.values())} jobs have a row" + (f" ({wall:.0f} s)" if since is not None else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
