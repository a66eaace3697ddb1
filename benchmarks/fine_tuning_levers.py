"""Fine-tuning levers study (issue #13): why GaussFT's fine-tuning diverges and what keeps it stable.

A plain PyTorch loop (no Lightning) that reuses the package's components (9-level EfficientNet
extractor, streaming Ledoit-Wolf Gaussians, held-out split, pseudo-anomalies, trainable-level and
BatchNorm helpers) and reproduces the current default recipe as ``--config base``:
cross-fitted Mahalanobis loss (each fit image scored against the Gaussians of the other fold),
AdamW lr 3e-4 wd 1e-4 at a constant rate, frozen BatchNorm statistics, Gaussians re-fitted once per
epoch, every layer up to the deepest level trained, the epoch kept by the pseudo-anomaly AUROC.

Every run records, per epoch: the training loss (mean over the epoch's steps, and every step), the
held-out pseudo-anomaly AUROC (what the selection rules see), the real test image AUROC (analysis
only: it never drives a choice), and per-level diagnostics of the re-fitted Gaussians (covariance
eigen-spectrum, effective rank, feature norms, in-sample / out-of-fold / held-out distances, drift of
the mean). After the last epoch it evaluates WiSE-FT, ``θ(α) = (1-α)·θ_pretrained + α·θ_last``, on an
α grid; α is chosen by the pseudo-anomaly AUROC only.

Levers (``--set key=value`` overrides any field of :class:`Config`):

* ``schedule``: ``constant`` or ``warmup_cosine`` (linear warm-up over ``warmup_epochs``, cosine to 0).
* ``l2sp``: decoupled L2-SP, after each step ``θ ← θ - lr_t·l2sp·(θ - θ_pretrained)`` (AdamW's decay,
  centred on the pretrained weights instead of 0; weight decay toward 0 is then off).
* ``distill``: ``λ · Σ_levels ‖f̄ - f̄₀‖²_{Σ₀⁻¹} / C``, the pooled features' squared Mahalanobis distance to
  the frozen network's own pooled features, under the pretrained Gaussian (same metric as the loss).
* ``target``: ``refit`` (re-fitted each epoch, current), ``ema`` (mean/covariance EMA over epochs with
  momentum ``ema_momentum``), ``fixed`` (the pretrained network's Gaussians, never updated).
* ``min_trainable_level``: train levels ≥ k only (``0`` = all). Lower levels are computed once and cached.
* ``distance``: ``mahalanobis`` (paper) or ``euclidean`` (center loss scaled by the mean variance).

Example (one set, one seed, one configuration; ~3 min for `late` runs, ~8 min for full-network runs on one
CPU thread of a shared machine):

    export PYTHONPATH=src HF_HUB_CACHE=/work/shared/hf-cache/hub HF_HUB_OFFLINE=1
    nice -n 10 python3 benchmarks/fine_tuning_levers.py --dataset elpv_poly --seed 0 --config base \\
        --out docs/fine_tuning/levers
    # the recommended recipe (docs/fine_tuning.md):
    nice -n 10 python3 benchmarks/fine_tuning_levers.py --dataset elpv_poly --seed 0 --config late \\
        --set schedule=warmup_cosine
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from sklearn.metrics import roc_auc_score

from anomalib_gaussft.gaussft.feature_extractor import MultiLevelFeatureExtractor
from anomalib_gaussft.gaussft.gaussian import StreamingGaussian, robust_cholesky
from anomalib_gaussft.gaussft.held_out import held_out_split
from anomalib_gaussft.gaussft.pseudo_anomalies import PSEUDO_ANOMALIES, PseudoAnomalyGenerator
from anomalib_gaussft.gaussft.trainable_layers import freeze_batchnorm, set_trainable

BACKBONE = "tf_efficientnet_lite0"
IMAGE_SIZE = 224
MEAN, STD = 0.5, 0.5  # timm's config for tf_efficientnet_lite0
LEVELS = list(range(9))
DATASETS = {
    "elpv_mono": "/work/data/elpv/elpv_mono",
    "elpv_poly": "/work/data/elpv/elpv_poly",
    "brick": "/work/data/textures/brick",
    "grass": "/work/data/textures/grass",
    "gravel": "/work/data/textures/gravel",
    "bsdata": "/work/data/bsdata/bsdata",
}


@dataclass
class Config:
    """One fine-tuning recipe."""

    epochs: int = 6
    batch_size: int = 16
    lr: float = 3e-4
    weight_decay: float = 1e-4
    schedule: str = "constant"  # constant | warmup_cosine
    warmup_epochs: float = 1.0
    loss_gaussian: str = "cross_fit"  # cross_fit | in_sample
    distance: str = "mahalanobis"  # mahalanobis | euclidean
    target: str = "refit"  # refit | ema | fixed
    ema_momentum: float = 0.7
    l2sp: float = 0.0
    distill: float = 0.0
    min_trainable_level: int = 0
    wise_alphas: tuple[float, ...] = (0.25, 0.5, 0.75)
    patience: int = 3


CONFIGS: dict[str, dict] = {
    "base": {},
    "sched": {"schedule": "warmup_cosine"},
    "l2sp": {"l2sp": 100.0},
    "distill": {"distill": 1.0},
    "ema": {"target": "ema"},
    "fixed": {"target": "fixed"},
    "late": {"min_trainable_level": 5},
    "euclid": {"distance": "euclidean"},
}


# ------------------------------------------------------------------------------------------------ data
def _load_folder(folder: Path, limit: int | None, seed: int = 0) -> tuple[list[str], torch.Tensor]:
    paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in {".png", ".jpg", ".jpeg", ".bmp"})
    if limit is not None and len(paths) > limit:
        order = torch.randperm(len(paths), generator=torch.Generator().manual_seed(seed)).tolist()
        paths = sorted(paths[i] for i in order[:limit])
    images = []
    for path in paths:
        image = Image.open(path).convert("RGB").resize((IMAGE_SIZE, IMAGE_SIZE), Image.BILINEAR)
        images.append(torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1))
    return [str(p) for p in paths], torch.stack(images)


def load_dataset(name: str, max_train: int, max_test: int) -> dict:
    """uint8 tensors at 224 px: capped train normals, capped test normals / anomalies (fixed subsets)."""
    cache = Path(f"/tmp/ft_levers_cache/{name}_{max_train}_{max_test}.pt")
    if cache.is_file():
        return torch.load(cache, weights_only=False)
    root = Path(DATASETS[name])
    train_paths, train = _load_folder(root / "train" / "good", max_train)
    _, test_good = _load_folder(root / "test" / "good", max_test)
    defects = [d for d in sorted((root / "test").iterdir()) if d.is_dir() and d.name != "good"]
    bad = [_load_folder(d, None) for d in defects]
    test_bad = torch.cat([b[1] for b in bad])
    if len(test_bad) > max_test:
        keep = torch.randperm(len(test_bad), generator=torch.Generator().manual_seed(0))[:max_test].sort().values
        test_bad = test_bad[keep]
    data = {
        "train_paths": train_paths,
        "train": train,
        "test": torch.cat([test_good, test_bad]),
        "test_labels": torch.cat([torch.zeros(len(test_good)), torch.ones(len(test_bad))]).long(),
    }
    cache.parent.mkdir(parents=True, exist_ok=True)
    torch.save(data, cache)
    return data


def normalise(images_uint8_or_unit: torch.Tensor) -> torch.Tensor:
    x = images_uint8_or_unit
    if x.dtype == torch.uint8:
        x = x.float() / 255
    return ((x - MEAN) / STD).contiguous(memory_format=torch.channels_last)  # 2-3x faster on CPU


# ------------------------------------------------------------------------------------------------ model
class Net:
    """The 9-level extractor with an optional cache of the frozen lower levels (levels < k)."""

    def __init__(self, extractor: MultiLevelFeatureExtractor, start_level: int) -> None:
        self.extractor = extractor
        self.start = start_level

    def forward_from(self, x: torch.Tensor, start: int) -> dict[int, torch.Tensor]:
        """Pooled features of levels ``start..8`` given the input of level ``start`` (the image for 0)."""
        model = self.extractor.model
        out = {}
        if start == 0:
            x = model.bn1(model.conv_stem(x))
            out[0] = x.mean((2, 3))
            start = 1
        for index in range(start, 8):
            x = model.blocks[index - 1](x)
            out[index] = x.mean((2, 3))
        out[8] = model.bn2(model.conv_head(x)).mean((2, 3))
        return out

    @torch.no_grad()
    def prefix(self, images_uint8: torch.Tensor, batch_size: int = 32) -> dict:
        """Cache for the frozen lower levels: their pooled features and the input of level ``start``."""
        if self.start == 0:
            return {"input": images_uint8, "pooled": {}}
        model = self.extractor.model
        inputs, pooled = [], {lvl: [] for lvl in range(self.start)}
        for i in range(0, len(images_uint8), batch_size):
            x = model.bn1(model.conv_stem(normalise(images_uint8[i : i + batch_size])))
            pooled[0].append(x.mean((2, 3)))
            for index in range(1, self.start):
                x = model.blocks[index - 1](x)
                pooled[index].append(x.mean((2, 3)))
            inputs.append(x)
        return {
            "input": torch.cat(inputs).contiguous(memory_format=torch.channels_last),
            "pooled": {k: torch.cat(v) for k, v in pooled.items()},
        }

    def features(self, cache: dict, index: torch.Tensor | slice) -> dict[int, torch.Tensor]:
        x = cache["input"][index]
        if self.start == 0:
            x = normalise(x)
        out = {k: v[index] for k, v in cache["pooled"].items()}
        out.update(self.forward_from(x, self.start))
        return out

    @torch.no_grad()
    def all_features(self, cache: dict, batch_size: int = 32) -> dict[int, torch.Tensor]:
        n = len(cache["input"])
        parts = [self.features(cache, slice(i, i + batch_size)) for i in range(0, n, batch_size)]
        return {lvl: torch.cat([p[lvl] for p in parts]) for lvl in LEVELS}


class Target:
    """A Gaussian target (mean, whitening) per level, built from a covariance (for fixed/EMA targets)."""

    def __init__(self, mean: dict[int, torch.Tensor], cov: dict[int, torch.Tensor]) -> None:
        self.mean, self.cov = mean, cov
        self.whitening, self.mean_variance = {}, {}
        for lvl, c in cov.items():
            factor, _ = robust_cholesky(c[None])
            eye = torch.eye(c.shape[0], dtype=torch.float64)
            self.whitening[lvl] = torch.linalg.solve_triangular(factor[0], eye, upper=False).float()
            self.mean_variance[lvl] = float(torch.diagonal(c).mean())

    def squared(self, lvl: int, pooled: torch.Tensor, distance: str) -> torch.Tensor:
        centred = pooled - self.mean[lvl].float()
        if distance == "euclidean":
            return (centred * centred).sum(-1) / self.mean_variance[lvl]
        whitened = centred @ self.whitening[lvl].T
        return (whitened * whitened).sum(-1)

    def ema(self, other: Target, momentum: float) -> Target:
        mean = {k: momentum * self.mean[k] + (1 - momentum) * other.mean[k] for k in self.mean}
        cov = {k: momentum * self.cov[k] + (1 - momentum) * other.cov[k] for k in self.cov}
        return Target(mean, cov)


def fit_target(features: dict[int, torch.Tensor], diagnostics: bool = True) -> tuple[Target, dict]:
    """Ledoit-Wolf Gaussians (the package's estimator) of pooled features ``{lvl: (N, C)}``, + diagnostics."""
    mean, cov, diag = {}, {}, {}
    for lvl, f in features.items():
        g = StreamingGaussian(1, f.shape[1])
        g.update(f[:, None, :])
        est = g.fit()
        mean[lvl], cov[lvl] = est["mean"][0], est["covariance"][0]
        if not diagnostics:
            continue
        eig = torch.linalg.eigvalsh(est["empirical"][0]).clamp_min(0).flip(0)
        rank_cap = min(len(f) - 1, f.shape[1])
        p = eig / eig.sum()
        diag[lvl] = {
            "eig_top": float(eig[0]),
            "eig_min_nonzero": float(eig[rank_cap - 1]),
            "eig_q": [float(eig[min(rank_cap - 1, int(q * (rank_cap - 1)))]) for q in (0.1, 0.5, 0.9)],
            "trace": float(eig.sum()),
            "participation_ratio": float(eig.sum() ** 2 / (eig**2).sum()),
            "entropy_rank": float(torch.exp(-(p[p > 0] * p[p > 0].log()).sum())),
            "shrinkage": float(est["shrinkage"][0]),
            "feature_norm": float(f.norm(dim=1).mean()),
            "mean_norm": float(mean[lvl].norm()),
        }
    return Target(mean, cov), diag


def image_scores(target: Target, feats: dict[int, torch.Tensor]) -> torch.Tensor:
    """The paper's score: Σ over levels of the pooled Mahalanobis distance."""
    return sum(torch.sqrt(target.squared(lvl, feats[lvl], "mahalanobis").clamp_min(0)) for lvl in LEVELS)


def auroc(normal: torch.Tensor, anomalous: torch.Tensor) -> float:
    labels = np.r_[np.zeros(len(normal)), np.ones(len(anomalous))]
    return float(roc_auc_score(labels, torch.cat([normal, anomalous]).numpy()))


# ------------------------------------------------------------------------------------------------ run
def run(dataset: str, seed: int, config: Config, max_train: int, max_test: int, log, analysis: bool = True) -> dict:
    t_start = time.perf_counter()
    data = load_dataset(dataset, max_train, max_test)
    fit_idx, held_idx = held_out_split(data["train_paths"], 0.2, seed)
    fit_paths = sorted(data["train_paths"][i] for i in fit_idx)
    fit_imgs = data["train"][[data["train_paths"].index(p) for p in fit_paths]]
    held_imgs = data["train"][held_idx]
    folds = torch.arange(len(fit_imgs)) % 2  # alternate over fit images in path order (as the package)

    # Pseudo-anomalies of the held-out normals (seeded per batch as in the package; generated once).
    generator = PseudoAnomalyGenerator(PSEUDO_ANOMALIES, seed=seed)
    pseudo = {k: [] for k in PSEUDO_ANOMALIES}
    for b, i in enumerate(range(0, len(held_imgs), 16)):
        for k, v in generator(held_imgs[i : i + 16].float() / 255, b).items():
            pseudo[k].append(v)
    pseudo = {k: torch.cat(v) for k, v in pseudo.items()}
    pseudo_all = torch.cat([pseudo[k] for k in PSEUDO_ANOMALIES])

    torch.manual_seed(seed)
    extractor = MultiLevelFeatureExtractor(BACKBONE, pre_trained=True)
    extractor.ensure_weights()  # ImageNet weights load when first needed
    extractor.to(memory_format=torch.channels_last).eval()
    start = config.min_trainable_level
    trainable = set_trainable(extractor, list(range(start, 9)) if start > 0 else None, LEVELS)
    net = Net(extractor, start)
    params = [p for p in extractor.parameters() if p.requires_grad]
    theta0 = {k: v.detach().clone() for k, v in extractor.state_dict().items()}
    anchors = [p.detach().clone() for p in params]

    t0 = time.perf_counter()
    caches = {
        "fit": net.prefix(fit_imgs),
        "held": net.prefix(held_imgs),
        "pseudo": net.prefix(pseudo_all.clamp(0, 1)),
    }
    if analysis:
        caches["test"] = net.prefix(data["test"])
    prefix_s = time.perf_counter() - t0
    test_labels = data["test_labels"]
    n_pseudo_each = len(held_imgs)

    def evaluate() -> tuple[dict, dict[int, torch.Tensor], Target, list[Target]]:
        """Refit on the fit images; pseudo-AUROC on held-out; test AUROC (analysis only); diagnostics."""
        extractor.eval()
        fit_f = net.all_features(caches["fit"])
        held_f = net.all_features(caches["held"])
        pseudo_f = net.all_features(caches["pseudo"])
        target, diag = fit_target(fit_f, diagnostics=analysis)
        fold_targets = [
            fit_target({k: v[folds == j] for k, v in fit_f.items()}, diagnostics=False)[0] for j in range(2)
        ]
        s_held = image_scores(target, held_f)
        s_pseudo = image_scores(target, pseudo_f)
        res = {
            "pseudo_auroc": auroc(s_held, s_pseudo),
            "pseudo_auroc_kind": {
                k: auroc(s_held, s_pseudo[i * n_pseudo_each : (i + 1) * n_pseudo_each])
                for i, k in enumerate(PSEUDO_ANOMALIES)
            },
            "test_auroc": math.nan,
        }
        if not analysis:  # what the fine-tuning itself needs: no test images, no diagnostics
            return res, fit_f, target, fold_targets
        test_f = net.all_features(caches["test"])
        s_test = image_scores(target, test_f)
        res["test_auroc"] = auroc(s_test[test_labels == 0], s_test[test_labels == 1])
        for lvl in LEVELS:
            c = fit_f[lvl].shape[1]
            other = (folds + 1) % 2
            oof = torch.stack([fold_targets[j].squared(lvl, fit_f[lvl], "mahalanobis") for j in range(2)], 1)
            diag[lvl]["d2_in_sample"] = float(target.squared(lvl, fit_f[lvl], "mahalanobis").mean() / c)
            diag[lvl]["d2_out_of_fold"] = float(oof.gather(1, other[:, None]).mean() / c)
            diag[lvl]["d2_held_out"] = float(target.squared(lvl, held_f[lvl], "mahalanobis").mean() / c)
            diag[lvl]["d2_test_good"] = float(
                target.squared(lvl, test_f[lvl][test_labels == 0], "mahalanobis").mean() / c
            )
            diag[lvl]["d2_test_bad"] = float(
                target.squared(lvl, test_f[lvl][test_labels == 1], "mahalanobis").mean() / c
            )
        res["levels"] = {str(k): v for k, v in diag.items()}
        return res, fit_f, target, fold_targets

    t0 = time.perf_counter()
    ev0, fit_f0, target0, fold_targets0 = evaluate()
    frozen_fit_s = time.perf_counter() - t0
    log(f"epoch 0: pseudo {ev0['pseudo_auroc']:.4f} test {ev0['test_auroc']:.4f} [{frozen_fit_s:.0f}s eval]")
    history = [{"epoch": 0, "loss": math.nan, **ev0}]
    pooled0 = {k: v.clone() for k, v in fit_f0.items()}  # frozen network's pooled features (distillation)
    loss_targets = fold_targets0 if config.loss_gaussian == "cross_fit" else [target0, target0]

    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0 if config.l2sp > 0 else config.weight_decay)
    steps_per_epoch = math.ceil(len(fit_imgs) / config.batch_size)
    total_steps = steps_per_epoch * config.epochs
    warmup_steps = round(config.warmup_epochs * steps_per_epoch)

    def lr_at(step: int) -> float:
        if config.schedule == "constant":
            return config.lr
        if step < warmup_steps:
            return config.lr * (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return config.lr * 0.5 * (1 + math.cos(math.pi * progress))

    step = 0
    train_time = 0.0
    for epoch in range(1, config.epochs + 1):
        t0 = time.perf_counter()
        extractor.train()
        freeze_batchnorm(extractor)
        order = torch.randperm(len(fit_imgs), generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        step_losses, step_reg = [], []
        for i in range(0, len(order), config.batch_size):
            index = order[i : i + config.batch_size]
            lr = lr_at(step)
            for group in optimizer.param_groups:
                group["lr"] = lr
            feats = net.features(caches["fit"], index)
            other = (folds[index] + 1) % 2
            losses, reg = [], []
            for lvl in LEVELS:
                c = feats[lvl].shape[1]
                per_fold = torch.stack([t.squared(lvl, feats[lvl], config.distance) for t in loss_targets], 1)
                losses.append(per_fold.gather(1, other[:, None])[:, 0].mean() / c)
                if config.distill > 0:
                    delta = (feats[lvl] - pooled0[lvl][index]) @ target0.whitening[lvl].T
                    reg.append((delta * delta).sum(-1).mean() / c)
            loss = torch.stack(losses).sum()
            total = loss + (config.distill * torch.stack(reg).sum() if reg else 0.0)
            if not torch.isfinite(total):
                raise FloatingPointError(f"non-finite loss at epoch {epoch}")
            optimizer.zero_grad(set_to_none=True)
            total.backward()
            optimizer.step()
            if config.l2sp > 0:
                with torch.no_grad():
                    for p, p0 in zip(params, anchors, strict=True):
                        p.sub_(lr * config.l2sp * (p - p0))
            step_losses.append(float(loss.detach()))
            step_reg.append(float(total.detach() - loss.detach()))
            step += 1
        epoch_train_s = time.perf_counter() - t0
        train_time += epoch_train_s
        t0 = time.perf_counter()
        ev, _, target, fold_targets = evaluate()
        eval_s = time.perf_counter() - t0
        with torch.no_grad():
            displacement = sum(float(((p - p0) ** 2).sum()) for p, p0 in zip(params, anchors, strict=True))
            anchor_norm = sum(float((p0**2).sum()) for p0 in anchors)
        history.append(
            {
                "epoch": epoch,
                "loss": float(np.mean(step_losses)),
                "reg": float(np.mean(step_reg)),
                "step_losses": step_losses,
                "lr_end": lr,
                "rel_weight_displacement": math.sqrt(displacement / anchor_norm),
                "train_s": epoch_train_s,
                "eval_s": eval_s,
                **ev,
            }
        )
        log(
            f"epoch {epoch}: loss {history[-1]['loss']:.3f} (first {step_losses[0]:.2f} last {step_losses[-1]:.2f}) "
            f"reg {history[-1]['reg']:.3f} pseudo {ev['pseudo_auroc']:.4f} test {ev['test_auroc']:.4f} "
            f"dθ {history[-1]['rel_weight_displacement']:.4f} [{epoch_train_s:.0f}s train, {eval_s:.0f}s eval]"
        )
        # Loss targets of the next epoch.
        if config.target == "refit":
            loss_targets = fold_targets if config.loss_gaussian == "cross_fit" else [target, target]
        elif config.target == "ema":
            new = fold_targets if config.loss_gaussian == "cross_fit" else [target, target]
            loss_targets = [old.ema(n, config.ema_momentum) for old, n in zip(loss_targets, new, strict=True)]

    # WiSE-FT: interpolate pretrained and last-epoch weights; choose α by the pseudo-anomaly AUROC only.
    last_state = {k: v.detach().clone() for k, v in extractor.state_dict().items()}
    wise = [{"alpha": 0.0, "pseudo_auroc": ev0["pseudo_auroc"], "test_auroc": ev0["test_auroc"]}]
    for alpha in config.wise_alphas:
        mixed = {
            k: (1 - alpha) * theta0[k] + alpha * last_state[k] if theta0[k].is_floating_point() else last_state[k]
            for k in theta0
        }
        extractor.load_state_dict(mixed)
        ev, *_ = evaluate()
        wise.append({"alpha": alpha, "pseudo_auroc": ev["pseudo_auroc"], "test_auroc": ev["test_auroc"]})
        log(f"WiSE-FT α={alpha}: pseudo {ev['pseudo_auroc']:.4f} test {ev['test_auroc']:.4f}")
    last = history[-1]
    wise.append({"alpha": 1.0, "pseudo_auroc": last["pseudo_auroc"], "test_auroc": last["test_auroc"]})
    extractor.load_state_dict(last_state)
    final_fit_s = math.nan
    if not analysis:  # the model the package would keep: WiSE-FT's α, Gaussians re-fitted on every normal
        t0 = time.perf_counter()
        alpha = max(wise, key=lambda r: (r["pseudo_auroc"], -r["alpha"]))["alpha"]
        mixed = {
            k: (1 - alpha) * theta0[k] + alpha * last_state[k] if theta0[k].is_floating_point() else last_state[k]
            for k in theta0
        }
        extractor.load_state_dict(mixed)
        extractor.eval()
        fit_target(net.all_features(net.prefix(data["train"])), diagnostics=False)
        final_fit_s = time.perf_counter() - t0

    return {
        "dataset": dataset,
        "seed": seed,
        "config": dataclasses.asdict(config),
        "n_fit": len(fit_imgs),
        "n_held_out": len(held_imgs),
        "n_test": [int((test_labels == 0).sum()), int((test_labels == 1).sum())],
        "trainable_levels": trainable,
        "history": history,
        "wise": wise,
        "selections": selections(history, wise, config.patience),
        "timing": {
            "frozen_fit_s": frozen_fit_s,
            "prefix_cache_s": prefix_s,
            "train_s": train_time,
            "final_fit_s": final_fit_s,
            "total_s": time.perf_counter() - t_start,
        },
    }


def selections(history: list[dict], wise: list[dict], patience: int) -> dict:
    """What each selection rule keeps (rules read the pseudo-anomaly AUROC only) and its test AUROC."""
    best, best_epoch, bad = -math.inf, 0, 0
    for h in history:  # the package's ForgettingMonitor (epoch 0 = pretrained), stopping after `patience`
        if h["pseudo_auroc"] > best:
            best, best_epoch, bad = h["pseudo_auroc"], h["epoch"], 0
        else:
            bad += 1
            if bad >= patience:
                break
    w = max(wise, key=lambda r: (r["pseudo_auroc"], -r["alpha"]))
    return {
        "frozen": {"test_auroc": history[0]["test_auroc"]},
        "last": {"epoch": history[-1]["epoch"], "test_auroc": history[-1]["test_auroc"]},
        "best_pseudo_epoch": {"epoch": best_epoch, "test_auroc": history[best_epoch]["test_auroc"]},
        "wise": {"alpha": w["alpha"], "test_auroc": w["test_auroc"]},
        "oracle_epoch_analysis_only": max(h["test_auroc"] for h in history),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", required=True, choices=list(DATASETS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--config", default="base", help=f"named configuration: {list(CONFIGS)}")
    parser.add_argument("--set", nargs="*", default=[], help="field=value overrides of the Config")
    parser.add_argument("--name", default=None, help="run name (default: config name + overrides)")
    parser.add_argument("--max-train", type=int, default=200)
    parser.add_argument("--max-test", type=int, default=100)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="docs/fine_tuning/levers")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    fields = {f.name: f for f in dataclasses.fields(Config)}
    values = dict(CONFIGS[args.config])
    for item in args.set:
        key, value = item.split("=", 1)
        default = getattr(Config(), key)
        values[key] = (
            type(default)(value) if not isinstance(default, tuple) else tuple(float(v) for v in value.split(","))
        )
        assert key in fields
    config = Config(**values)
    name = args.name or "_".join([args.config, *[s.replace("=", "-") for s in args.set]])
    out = Path(args.out) / f"{args.dataset}__{name}__seed{args.seed}.json"
    out.parent.mkdir(parents=True, exist_ok=True)

    def log(msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {args.dataset} {name} s{args.seed} | {msg}", flush=True)

    result = run(args.dataset, args.seed, config, args.max_train, args.max_test, log)
    result["name"] = name
    out.write_text(json.dumps(result, indent=1))
    s = result["selections"]
    log(
        f"frozen {s['frozen']['test_auroc']:.4f} | best-pseudo epoch {s['best_pseudo_epoch']['epoch']} "
        f"{s['best_pseudo_epoch']['test_auroc']:.4f} | last {s['last']['test_auroc']:.4f} | "
        f"WiSE α={s['wise']['alpha']} {s['wise']['test_auroc']:.4f} | {result['timing']['total_s']:.0f}s -> {out}"
    )


if __name__ == "__main__":
    main()
