"""Fine-tuning killed with SIGKILL (mid-epoch or at an epoch boundary) and resumed from anomalib's checkpoint ends
exactly as an uninterrupted run: same per-epoch losses, same kept epoch, same scores, and the test step passes."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).with_name("interrupt_fit.py")


def _run(data: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    command = [sys.executable, str(SCRIPT), "--data", str(data), "--out", str(out), *extra]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=900, check=False)


def _record(out: Path) -> dict:
    return json.loads((out / "record.json").read_text())


def _checkpoint(out: Path) -> Path:
    checkpoints = sorted(out.rglob("weights/lightning/*.ckpt"))
    assert checkpoints, f"the interrupted run left no checkpoint under {out}"
    return checkpoints[-1]


@pytest.mark.slow
@pytest.mark.parametrize("kill", ["2:1", "2:-1"], ids=["mid-epoch", "epoch-boundary"])
def test_sigkilled_fine_tuning_resumes_exactly(texture_root: Path, tmp_path: Path, kill: str) -> None:
    whole = _run(texture_root, tmp_path / "whole")
    assert whole.returncode == 0, whole.stderr[-4000:]
    reference = _record(tmp_path / "whole")
    assert len({h["loss"] for h in reference["history"][1:]}) > 1, "epochs must differ for the check to mean much"

    killed = _run(texture_root, tmp_path / "killed", "--kill", kill)
    assert killed.returncode == -9, killed.stderr[-2000:]  # really killed, no clean-up ran
    resumed = _run(texture_root, tmp_path / "resumed", "--resume", str(_checkpoint(tmp_path / "killed")), "--seed", "7")
    assert resumed.returncode == 0, resumed.stderr[-4000:]  # including the test step after the resumed fit
    record = _record(tmp_path / "resumed")

    assert [h["epoch"] for h in record["history"]] == [h["epoch"] for h in reference["history"]]
    for mine, theirs in zip(record["history"], reference["history"], strict=True):
        for key in ("loss", "pseudo_auroc"):
            if not (math.isnan(mine[key]) and math.isnan(theirs[key])):
                assert mine[key] == pytest.approx(theirs[key], rel=1e-6, abs=1e-6), (mine["epoch"], key)
    assert record["best_epoch"] == reference["best_epoch"]
    assert record["scores"] == pytest.approx(reference["scores"], rel=1e-6, abs=1e-6)
    assert record["test"]["image_AUROC"] == pytest.approx(reference["test"]["image_AUROC"], abs=1e-6)
