"""The stock ``anomalib`` console script and API find GaussFT and ``MVTec`` after installation."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import TINY_BACKBONE


def _run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600, check=False)


def _python(code: str, cwd: Path) -> subprocess.CompletedProcess:
    return _run(sys.executable, "-c", code, cwd=cwd)


def test_fresh_interpreter_resolves_short_names(tmp_path: Path) -> None:
    result = _python(
        "from anomalib.models import get_model, GaussFT\n"
        "from anomalib.data import MVTec, MVTecAD, get_datamodule\n"
        f"m = get_model('GaussFT', backbone='{TINY_BACKBONE}', pre_trained=False, image_size=32)\n"
        "m2 = get_model({'class_path': 'GaussFT',"
        f" 'init_args': {{'backbone': '{TINY_BACKBONE}', 'pre_trained': False}}}})\n"
        "d = get_datamodule({'class_path': 'MVTec', 'init_args': {'root': '.', 'category': 'x'}})\n"
        "assert type(m).__name__ == type(m2).__name__ == 'GaussFT' and isinstance(d, MVTecAD)\n"
        "print('OK')",
        tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "OK" in result.stdout


def test_hook_does_not_import_anything_in_other_processes(tmp_path: Path) -> None:
    result = _python("import sys; print(sorted(m for m in sys.modules if 'anomalib' in m or m == 'torch'))", tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "['_anomalib_gaussft_hook']"


@pytest.mark.slow
def test_anomalib_train_then_export_on_the_console_script(texture_root: Path, tmp_path: Path) -> None:
    common = ["--data.root", str(texture_root), "--data.category", "brick", "--data.num_workers", "0"]
    model_args = ["--model.backbone", TINY_BACKBONE, "--model.pre_trained", "false", "--model.image_size", "64"]
    train = _run(
        "anomalib",
        "train",
        "--model",
        "GaussFT",
        "--data",
        "MVTec",
        *model_args,
        *common,
        "--data.train_batch_size",
        "8",
        "--data.eval_batch_size",
        "8",
        "--default_root_dir",
        str(tmp_path / "results"),
        "--logging.log_graph",
        "false",
        cwd=tmp_path,
    )
    assert train.returncode == 0, (train.stdout + train.stderr)[-4000:]
    assert "image_AUROC" in train.stdout + train.stderr
    checkpoints = sorted((tmp_path / "results").rglob("*.ckpt"))
    assert checkpoints, "training wrote no checkpoint"

    # A checkpoint is enough: no backbone flags, no network, no ONNX options; a clean, short export.
    checkpoint = str(checkpoints[-1])
    tested = _run("anomalib", "test", "--model", "GaussFT", "--data", "MVTec", *common, "--ckpt_path", checkpoint,
                  "--default_root_dir", str(tmp_path / "test"), cwd=tmp_path)  # fmt: skip
    assert tested.returncode == 0, (tested.stdout + tested.stderr)[-4000:]
    assert "image_AUROC" in tested.stdout + tested.stderr
    export = _run("anomalib", "export", "--model", "GaussFT", "--export_type", "openvino", "--ckpt_path", checkpoint,
                  "--default_root_dir", str(tmp_path / "export"), cwd=tmp_path)  # fmt: skip
    output = export.stdout + export.stderr
    assert export.returncode == 0, output[-4000:]
    assert "Traceback" not in output
    assert len(output.splitlines()) < 50, output
    assert list((tmp_path / "export").rglob("model.xml"))
    folder = str(texture_root / "brick" / "test" / "good")
    predicted = _run("anomalib", "predict", "--model", "GaussFT", "--data", folder, "--ckpt_path", checkpoint,
                     "--default_root_dir", str(tmp_path / "predict"), cwd=tmp_path)  # fmt: skip
    assert predicted.returncode == 0, (predicted.stdout + predicted.stderr)[-4000:]


def test_bad_option_is_refused_in_a_few_lines(tmp_path: Path) -> None:
    result = _run("anomalib", "train", "--model", "GaussFT", "--data", "MVTec", "--model.fine_tune_epochs", "-1",
                  "--model.pre_trained", "false", cwd=tmp_path)  # fmt: skip
    assert result.returncode == 2  # a usage error, before any model, data or training
    output = result.stdout + result.stderr
    assert 'Parser key "fine_tune_epochs"' in output
    assert "-1 does not conform to restriction v>=0" in output
    assert len(output.splitlines()) < 25, output


@pytest.mark.slow
def test_missing_weights_are_one_short_error_on_the_cli(texture_root: Path, tmp_path: Path) -> None:
    result = _run("anomalib", "train", "--model", "GaussFT", "--data", "MVTec", "--data.root", str(texture_root),
                  "--data.category", "brick", "--data.num_workers", "0", "--model.backbone", "tf_efficientnet_b0",
                  "--model.image_size", "64", "--default_root_dir", str(tmp_path), cwd=tmp_path)  # fmt: skip
    output = result.stdout + result.stderr
    assert result.returncode == 1
    assert "error: ImageNet weights for backbone 'tf_efficientnet_b0' are unavailable" in output
    assert "--model.backbone_weights" in output
    assert "Traceback" not in output
    assert len(output.splitlines()) < 40, output
