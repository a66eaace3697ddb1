"""Lightning DDP on 2 CPU processes (gloo): same statistics as 1 process; ranks agree; rank 0 writes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).with_name("ddp_fit.py")


@pytest.fixture(scope="module")
def odd_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """15 training images: uneven rank shares, so DistributedSampler pads one rank."""
    from data_generators import make_texture_dataset

    root = tmp_path_factory.mktemp("ddp_textures")
    make_texture_dataset(root, textures=("brick",), image_size=64, n_train=15, n_test_good=2, n_test_defect=2)
    return root


def _fit(data: Path, out: Path, devices: int, epochs: int = 0) -> list[dict]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    command = [sys.executable, str(SCRIPT), "--data", str(data), "--out", str(out), "--devices", str(devices)]
    result = subprocess.run(
        [*command, "--epochs", str(epochs)], env=env, capture_output=True, text=True, timeout=600, check=False
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return [json.loads((out / f"rank{rank}.json").read_text()) for rank in range(devices)]


@pytest.mark.slow
def test_two_processes_fit_the_same_gaussians_as_one(odd_dataset: Path, tmp_path: Path) -> None:
    single = _fit(odd_dataset, tmp_path / "one", devices=1)
    ranks = _fit(odd_dataset, tmp_path / "two", devices=2)
    assert ranks[0]["world_size"] == 2
    # Every training image counted once: DistributedSampler's padding copy is not accumulated.
    assert single[0]["num_samples"] == ranks[0]["num_samples"] == ranks[1]["num_samples"] == 15
    one = torch.load(tmp_path / "one" / "statistics.pt", weights_only=True)
    two = torch.load(tmp_path / "two" / "statistics.pt", weights_only=True)
    statistics = [k for k in one if k.endswith((".mean", ".whitening"))]
    assert len(statistics) >= 2 * 9
    for key in statistics:  # equal to 1e-6 of each tensor's scale (float32 features of other batch compositions)
        scale = float(one[key].abs().max())
        torch.testing.assert_close(two[key], one[key], rtol=1e-6, atol=1e-6 * scale, msg=key)


@pytest.mark.slow
def test_ranks_agree_on_split_and_stopping_and_only_rank0_writes(odd_dataset: Path, tmp_path: Path) -> None:
    rank0, rank1 = _fit(odd_dataset, tmp_path, devices=2, epochs=2)
    assert rank0["held_out"]
    assert rank0["held_out"] == rank1["held_out"]
    assert len(rank0["history"]) == 3  # epoch 0 (pretrained) + 2 fine-tuning epochs
    assert rank0["history"] == rank1["history"]  # identical weights → identical pseudo-anomaly AUROCs
    assert rank0["best_epoch"] == rank1["best_epoch"]
    assert rank0["wrote_curve"]
    assert not rank1["wrote_curve"]
    # anomalib's Engine makes a versioned folder per process; one is left, and `latest` points at rank 0's.
    workspace = tmp_path / "run" / "RecordingGaussFT" / "MVTecAD" / "brick"
    assert sorted(p.name for p in workspace.iterdir()) == ["latest", "v0"]
    assert (workspace / "latest" / "fine_tuning_curve.png").is_file()


def test_gaussft_leaves_the_device_count_to_the_user() -> None:
    from anomalib_gaussft import GaussFT

    for epochs in (0, 3):
        arguments = GaussFT(backbone="test_efficientnet", pre_trained=False, fine_tune_epochs=epochs).trainer_arguments
        assert not {"devices", "strategy", "accelerator"} & set(arguments)
