"""What every benchmark script shares: backbone, baselines, datamodules, models, raw-output metrics, machine.

Scripts in ``benchmarks/`` import it as ``common`` (Python puts a script's own folder on ``sys.path``).
Heavy libraries are imported inside the functions, so that ``compare.py`` can schedule jobs without loading
torch.

Raw outputs: :func:`iter_raw_outputs` is the one road from a loader of raw images to the torch model's outputs
(``pred_score``, ``anomaly_map``) before anomalib's post-processing: GaussFT through
``GaussFTModel.iter_features``, other anomalib models through their pre-processor and ``model.model``.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import resource
import shutil
import subprocess
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

# ``GAUSSFT_BENCH_BACKBONE`` (set by ``local_evidence_baselines.py --backbone`` for its child jobs) measures every
# model on another timm EfficientNet; lite0 unless set.
BACKBONE = os.environ.get("GAUSSFT_BENCH_BACKBONE", "tf_efficientnet_lite0")
IMAGE_SIZE = 224
TEXTURES = ("brick", "grass", "gravel")
ELPV = ("elpv_mono", "elpv_poly")

# Layers of tf_efficientnet_lite0 for the baselines (timm features_only exposes blocks.0/1/2/4/6 at strides
# 2/4/8/16/32): the same strides as their ResNet defaults.
BASELINES: dict[str, dict[str, Any]] = {
    # PaDiM: layer1-3 of ResNet-18 (strides 4, 8, 16) -> blocks.1, blocks.2, blocks.4 (24+40+112 = 176 channels);
    # 100 random channels kept, as PaDiM's ResNet-18 default.
    "padim": {"layers": ["blocks.1", "blocks.2", "blocks.4"], "n_features": 100},
    # PatchCore: layer2-3 (strides 8, 16) -> blocks.2, blocks.4. coreset ratio: set by each script.
    "patchcore": {"layers": ["blocks.2", "blocks.4"], "num_neighbors": 9},
    # DFM: layer3 (stride 16) -> blocks.4.
    "dfm": {"layer": "blocks.4", "pooling_kernel_size": 4, "pca_level": 0.97, "score_type": "fre"},
}


# ---- data ------------------------------------------------------------------------------------------------------


def partial_output(out: Path, force: bool) -> Path:
    """Clear ``out`` (only with ``force`` when it holds files) and return an empty ``<out>.partial`` to write into.

    A dataset converter writes everything into the partial folder and renames it to ``out`` when done, so an
    interrupted conversion never leaves a half-written set where the benchmarks look for one.
    """
    if out.exists():
        if not force and any(out.iterdir()):
            msg = f"{out} exists and is not empty (use --force)"
            raise FileExistsError(msg)
        shutil.rmtree(out)
    tmp = out.with_name(out.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    return tmp


def finish_output(tmp: Path, out: Path, meta: dict) -> None:
    """Write ``meta`` as ``<name>_meta.json`` into the partial folder, rename it to ``out`` and print ``meta``."""
    (tmp / f"{out.name}_meta.json").write_text(json.dumps(meta, indent=1))
    tmp.rename(out)
    print(json.dumps(meta, indent=1))


def mvtec_datamodule(root: str | Path, category: str, train_batch_size: int = 16, eval_batch_size: int = 32) -> Any:
    """``MVTecAD`` over an MVTec-layout folder (generated textures, ``--mvtec``); validation = test split."""
    from anomalib.data import MVTecAD

    return MVTecAD(
        root=root,
        category=category,
        train_batch_size=train_batch_size,
        eval_batch_size=eval_batch_size,
        num_workers=0,
        val_split_mode="same_as_test",
        seed=0,
    )


def folder_datamodule(name: str, root: str | Path, train_batch_size: int = 16, eval_batch_size: int = 32) -> Any:
    """``Folder`` over a ``train/good``, ``test/good``, ``test/defect`` tree (ELPV); validation = test split."""
    from anomalib.data import Folder

    return Folder(
        name=name,
        root=root,
        normal_dir="train/good",
        normal_test_dir="test/good",
        abnormal_dir="test/defect",
        train_batch_size=train_batch_size,
        eval_batch_size=eval_batch_size,
        num_workers=0,
        val_split_mode="same_as_test",
        seed=0,
    )


def elpv_datamodule(
    data_root: str | Path,
    cell_type: str = "mono",
    image_size: int = 224,
    train_batch_size: int = 16,
    eval_batch_size: int = 32,
) -> Any:
    """ELPV cells of one type (``data_root/elpv_<cell_type>``, written by ``data_generators`` if missing)."""
    from data_generators import make_elpv_dataset

    folder = make_elpv_dataset(Path(data_root), cell_type=cell_type, image_size=image_size)
    return folder_datamodule(f"elpv_{cell_type}", folder, train_batch_size, eval_batch_size)


# ---- models ----------------------------------------------------------------------------------------------------


def backbone_pre_processor(image_size: int = IMAGE_SIZE) -> Any:
    """Resize to ``image_size`` and normalise with the backbone's own mean/std (GaussFT's default, for baselines)."""
    from anomalib.pre_processing import PreProcessor
    from torchvision.transforms.v2 import Compose, Normalize, Resize

    from anomalib_gaussft.gaussft.hyperparameters import backbone_input_config

    _, mean, std = backbone_input_config(BACKBONE)
    return PreProcessor(transform=Compose([Resize((image_size, image_size), antialias=True), Normalize(mean, std)]))


def build_model(
    kind: str, kwargs: dict[str, Any], image_size: int = IMAGE_SIZE, backbone_weights: Path | None = None
) -> Any:
    """GaussFT or a baseline (``padim``, ``patchcore``, ``dfm``) on :data:`BACKBONE` at ``image_size``.

    ``backbone_weights``: a local weights file instead of the hub's ImageNet weights.
    """
    if kind == "gaussft":
        from anomalib_gaussft import GaussFT

        weights = str(backbone_weights) if backbone_weights else None
        return GaussFT(backbone=BACKBONE, pre_trained=True, backbone_weights=weights, image_size=image_size, **kwargs)
    from anomalib.models import Dfm, Padim, Patchcore

    cls = {"padim": Padim, "patchcore": Patchcore, "dfm": Dfm}[kind]
    pre_processor = backbone_pre_processor(image_size)
    model = cls(backbone=BACKBONE, pre_trained=backbone_weights is None, pre_processor=pre_processor, **kwargs)
    if backbone_weights is not None:
        load_feature_extractor_weights(model.model.feature_extractor.feature_extractor, backbone_weights)
    return model


def load_feature_extractor_weights(feature_net: Any, weights: Path) -> None:
    """Copy local backbone weights into a timm ``features_only`` net (the baselines' extractor)."""
    from anomalib_gaussft.gaussft.feature_extractor import create_backbone

    full = create_backbone(BACKBONE, pre_trained=False, weights_path=weights).state_dict()
    wanted = feature_net.state_dict()
    missing = [k for k in wanted if k not in full]
    if missing:
        msg = f"backbone weights lack {len(missing)} tensors of the feature extractor, e.g. {missing[:3]}"
        raise ValueError(msg)
    feature_net.load_state_dict({k: full[k] for k in wanted})


# ---- raw outputs and metrics -----------------------------------------------------------------------------------

SCORE_SOURCE = "raw model.model(pre_processed) outputs (pred_score, anomaly_map), before post-processing"


def iter_raw_outputs(model: Any, loader: Iterable[Any]) -> Iterator[tuple[Any, Any]]:
    """``(batch, InferenceBatch)`` of the torch model's raw outputs (eval mode, no gradient) for every batch.

    GaussFT: ``GaussFTModel.iter_features`` (pre-processing + features) and ``predict_from_features``, i.e.
    ``model.model(model.preprocess(images))``. Other anomalib models: ``model.model`` on their pre-processor's
    transform of the batch.
    """
    import torch

    from anomalib_gaussft import GaussFT

    model.eval()
    if isinstance(model, GaussFT):
        for item in model.model.iter_features(loader, model.preprocess):
            with torch.no_grad():
                output = model.model.predict_from_features(item.features, item.images.shape[-2:])
            yield item.batch, output
        return
    for batch in loader:
        with torch.inference_mode():
            output = model.model(model.pre_processor.transform(batch.image))
        yield batch, output


def auroc(labels: Any, scores: Any) -> float | None:
    """sklearn's ROC AUC of raw scores (no sigmoid); ``None`` when only one class is present."""
    import numpy as np
    from sklearn.metrics import roc_auc_score

    labels = np.asarray(labels)
    if labels.min() == labels.max():
        return None
    return float(roc_auc_score(labels, np.asarray(scores, dtype=np.float64)))


def evaluate(model: Any, loader: Iterable[Any], masks: bool) -> dict[str, Any]:
    """Image AUROC, and with ``masks`` pixel AUROC and AUPRO (FPR ≤ 0.3), from the raw outputs on ``loader``."""
    import numpy as np
    import torch
    import torch.nn.functional as F  # noqa: N812

    scores, labels, maps, gts = [], [], [], []
    for batch, output in iter_raw_outputs(model, loader):
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
        "image_auroc": auroc(label, score),
        "pixel_auroc": None,
        "aupro": None,
        "nonfinite_scores": int((~np.isfinite(score)).sum()),
    }
    if masks and maps:
        amap_all = torch.cat(maps)
        gt_all = torch.cat(gts)
        result["pixel_auroc"] = auroc(gt_all.numpy().reshape(-1).astype(np.int8), amap_all.numpy().reshape(-1))
        try:
            from anomalib.metrics.aupro import _AUPRO  # raw torchmetrics metric (the public AUPRO takes batches)

            metric = _AUPRO(fpr_limit=0.3)
            metric.update(amap_all, gt_all.int())
            result["aupro"] = float(metric.compute())
        except Exception as exc:  # noqa: BLE001 - optional metric: record why it is missing
            result["aupro_error"] = f"{type(exc).__name__}: {exc}"
    return result


def throughput(model: Any, loader: Iterable[Any], batch_size: int, min_seconds: float) -> float:
    """Images/s of ``model.model`` on pre-processed images of ``loader``, ``torch.inference_mode``."""
    import torch

    images = []
    for batch in loader:
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


# ---- process and machine ---------------------------------------------------------------------------------------


def peak_rss_mb() -> float:
    """This process's peak resident memory (``ru_maxrss``) in MB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def current_rss_mb() -> float:
    """This process's resident memory now, in MB."""
    try:
        import psutil

        return psutil.Process().memory_info().rss / 2**20
    except ImportError:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def now() -> str:
    """Local time, ISO format to the second."""
    return dt.datetime.now().isoformat(timespec="seconds")


ISA_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8")


def machine_description() -> dict[str, Any]:
    """CPU model, cores, RAM, vector ISA flags, OS and package versions (strings; ``isa`` is a list)."""
    from importlib.metadata import version

    info: dict[str, Any] = {"python": platform.python_version(), "platform": platform.platform()}
    info["os"] = f"{platform.system()} {platform.release()}"
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
        models = [line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name")]
        info["cpu"] = models[0] if models else platform.processor()
    except OSError:
        info["cpu"] = platform.processor() or "unknown"
    info["isa"] = [flag for flag in ISA_FLAGS if flag in _cpu_flags()]
    info["logical_cores"] = str(os.cpu_count())
    if hasattr(os, "sched_getaffinity"):
        info["affinity_cores"] = str(len(os.sched_getaffinity(0)))
    try:
        meminfo = Path("/proc/meminfo").read_text().splitlines()
        total_kb = int(next(line for line in meminfo if line.startswith("MemTotal")).split()[1])
        info["ram_gib"] = total_kb / 2**20
        info["ram"] = f"{total_kb / 2**20:.1f} GiB"
    except (OSError, StopIteration, ValueError):
        pass
    for package in ("torch", "anomalib", "timm", "openvino", "numpy"):
        try:
            info[package] = version(package)
        except Exception:  # noqa: BLE001
            info[package] = "not installed"
    return info


def _cpu_flags() -> set[str]:
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    except OSError:
        return set()
    line = next((line for line in lscpu.splitlines() if line.startswith("Flags:")), "")
    return set(line.split(":", 1)[1].split()) if line else set()
