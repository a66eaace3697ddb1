"""Can the paper's pseudo-anomalies choose the weights of the image score's terms? (issue #14)

The ``local`` image score is ``z(L) + z(M)``: the layout Gaussian L (level 5 pooled to 3 × 3, one joint
Gaussian) and the map term M (mean of the top 1 % of the 12 × 12-regional, 3 × 3-averaged map), each z-scored
on held-out normals. With all training images, L alone beats the sum on Magnetic Tile and BSData and M alone
beats it on ELPV poly (``docs/local_evidence/score_rules/full.md``). This study asks whether the anomaly-free
validation the paper uses to stop fine-tuning (held-out normals against their mixup / CutMix / cutout / AugMix
pseudo-anomalies) can pick the weight ``w`` in ``w·z(L) + (1 − w)·z(M)`` per set, without any real anomaly.

Protocol per set and seed (``local_evidence_study.py``'s, on its cached features): 20 % of the training images
held out (seeded); L and M fitted on the other 80 % score the held-out normals and their pseudo-anomalies, made
with the package's ``PseudoAnomalyGenerator`` on the 224-px images (before normalisation) and passed through the
same frozen lite0 extractor; test images are scored by L and M refitted on all training images (``--refit``
of the study). Rules compared, each given only held-out normals and pseudo-anomalies:

* ``fixed``: ``w = 0.5`` (the default's z-sum);
* ``argmax``: the ``w`` of ``0, 0.1, …, 1`` with the best pseudo-anomaly AUROC (ties: closest to 0.5);
* ``excess``: ``w ∝ (AUROC_L − 0.5)`` against ``(AUROC_M − 0.5)``, each term's own pseudo-anomaly AUROC;
* ``argmax in [a, b]``: ``argmax`` over the weights in a band around 0.5 (``--table``).

Command (results: ``OUT/<tag>_<set>_seed<k>.json``)::

    PYTHONPATH=src:benchmarks HF_HUB_CACHE=/work/shared/hf-cache/hub HF_HUB_OFFLINE=1 \
        python benchmarks/score_weight_study.py --cache /work/data/cache/full --tag full \
        --out docs/local_evidence/score_weights
    python benchmarks/score_weight_study.py --table docs/local_evidence/score_weights
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from anomalib_gaussft.gaussft.pseudo_anomalies import PSEUDO_ANOMALIES, PseudoAnomalyGenerator
from local_evidence_study import (
    MAP_VARIANTS,
    Split,
    auroc,
    fit_units,
    full_map,
    grid_distances,
    held_out_split,
    pending_runs,
    topk_mean,
    unit_maps,
    zscore,
)

MAP_VARIANT = "m_r12_k3"
LAYOUT = (5, 3, "joint")  # level, grid, mode: the package's layout term
WEIGHTS = np.round(np.linspace(0.0, 1.0, 11), 2)
BATCH = 16


def load_images(paths: list[str]) -> torch.Tensor:
    """``(N, 3, 224, 224)`` images in [0, 1] as the feature cache saw them (anomalib's reader, antialiased)."""
    from anomalib.data.utils import read_image
    from torchvision.transforms.v2.functional import resize

    return torch.stack([resize(read_image(p, as_tensor=True), [224, 224], antialias=True) for p in paths])


@torch.no_grad()
def pseudo_anomaly_features(images: torch.Tensor, seed: int) -> tuple[Split, list[str]]:
    """Frozen lite0 maps (levels 3-5) of every pseudo-anomaly of ``images`` and each one's kind."""
    from torchvision.transforms.v2 import Normalize

    import common
    from anomalib_gaussft.gaussft.feature_extractor import MultiLevelFeatureExtractor
    from anomalib_gaussft.gaussft.hyperparameters import backbone_input_config

    _, mean, std = backbone_input_config(common.BACKBONE)
    normalise = Normalize(mean=mean, std=std)
    extractor = MultiLevelFeatureExtractor(common.BACKBONE, pre_trained=True).eval()
    extractor.ensure_weights()
    generator = PseudoAnomalyGenerator(PSEUDO_ANOMALIES, seed=seed)
    maps: dict[int, list[torch.Tensor]] = {lvl: [] for lvl in (3, 4, 5)}
    kinds: list[str] = []
    for index, start in enumerate(range(0, len(images), BATCH)):
        for kind, batch in generator(images[start : start + BATCH], index).items():
            feats = extractor(normalise(batch), [3, 4, 5])
            for lvl in maps:
                maps[lvl].append(feats[lvl].float())
            kinds += [kind] * len(batch)
    cat = {lvl: torch.cat(v) for lvl, v in maps.items()}
    return Split({0: torch.zeros(len(kinds), 1)}, cat), kinds


def map_term(data, fit_idx, held: Split, pseudo: Split, refit: bool) -> tuple[torch.Tensor, ...]:
    cfg, _, sigma = MAP_VARIANTS[MAP_VARIANT]
    scorers = fit_units(data.train, fit_idx, cfg)
    test_scorers = fit_units(data.train, np.arange(len(data.train)), cfg) if refit else scorers
    out = []
    for split, fitted in ((held, scorers), (pseudo, scorers), (data.test, test_scorers)):
        out.append(topk_mean(full_map(unit_maps(split, cfg, fitted), sigma), 0.01))
    return tuple(out)


def layout_term(data, fit_idx, held: Split, pseudo: Split, refit: bool) -> tuple[torch.Tensor, ...]:
    level, grid, mode = LAYOUT
    lh, lp, lt = (d[:, 0] for d in grid_distances(data.train, fit_idx, [held, pseudo, data.test], level, grid, mode))
    if refit:
        everything = np.arange(len(data.train))
        lt = grid_distances(data.train, everything, [data.test], level, grid, mode)[0][:, 0]
    return lh, lp, lt


def pick_weight(zl_h, zm_h, zl_p, zm_p) -> tuple[float, dict[str, float]]:
    """The pseudo-anomaly AUROC of every weight and the best one (ties: closest to 0.5)."""
    labels = np.r_[np.zeros(len(zl_h)), np.ones(len(zl_p))]
    curve = {}
    for w in WEIGHTS:
        s = torch.cat([w * zl_h + (1 - w) * zm_h, w * zl_p + (1 - w) * zm_p]).numpy()
        curve[f"{w:.1f}"] = auroc(labels, s)
    best = max(curve.values())
    ties = [float(w) for w in curve if curve[w] >= best - 1e-12]
    return min(ties, key=lambda w: abs(w - 0.5)), curve


def evaluate(data, images_of_train: list[str], seed: int, frac: float, refit: bool) -> dict:
    fit_idx, held_idx = held_out_split(len(data.train), frac, seed)
    held = data.train.take(held_idx)
    images = load_images([images_of_train[i] for i in held_idx])
    pseudo, kinds = pseudo_anomaly_features(images, seed)
    lh, lp, lt = layout_term(data, fit_idx, held, pseudo, refit)
    mh, mp, mt = map_term(data, fit_idx, held, pseudo, refit)
    zl_h, zl_p, zl_t = zscore(lh, lh), zscore(lp, lh), zscore(lt, lh)
    zm_h, zm_p, zm_t = zscore(mh, mh), zscore(mp, mh), zscore(mt, mh)
    w_argmax, curve = pick_weight(zl_h, zm_h, zl_p, zm_p)
    labels = np.r_[np.zeros(len(lh)), np.ones(len(lp))]
    pseudo_l = auroc(labels, torch.cat([lh, lp]).numpy())
    pseudo_m = auroc(labels, torch.cat([mh, mp]).numpy())
    excess_l, excess_m = max(pseudo_l - 0.5, 0.0), max(pseudo_m - 0.5, 0.0)
    w_excess = excess_l / (excess_l + excess_m) if excess_l + excess_m > 0 else 0.5
    per_kind = {}
    for kind in PSEUDO_ANOMALIES:
        sel = torch.as_tensor([k == kind for k in kinds])
        lab = np.r_[np.zeros(len(lh)), np.ones(int(sel.sum()))]
        per_kind[kind] = {
            "L": auroc(lab, torch.cat([lh, lp[sel]]).numpy()),
            "M": auroc(lab, torch.cat([mh, mp[sel]]).numpy()),
        }
    test = {f"{w:.1f}": auroc(data.labels, (w * zl_t + (1 - w) * zm_t).numpy()) for w in WEIGHTS}
    return {
        "pseudo_auroc_by_weight": curve,
        "pseudo_auroc_L": pseudo_l,
        "pseudo_auroc_M": pseudo_m,
        "pseudo_auroc_by_kind": per_kind,
        "test_auroc_by_weight": test,
        "w_argmax": w_argmax,
        "w_excess": w_excess,
        "test_fixed": test["0.5"],
        "test_argmax": test[f"{w_argmax:.1f}"],
        "test_excess": auroc(data.labels, (w_excess * zl_t + (1 - w_excess) * zm_t).numpy()),
    }


def pick_in_band(record: dict, low: float, high: float) -> float:
    """``argmax`` restricted to weights in ``[low, high]`` (ties: closest to 0.5)."""
    curve = {float(w): v for w, v in record["pseudo_auroc_by_weight"].items() if low - 1e-9 <= float(w) <= high + 1e-9}
    best = max(curve.values())
    return min((w for w, v in curve.items() if v >= best - 1e-12), key=lambda w: abs(w - 0.5))


def write_table(folder: Path) -> str:
    """Markdown table of every ``<tag>_<set>_seed<k>.json`` in ``folder``: mean ± std over seeds."""
    groups: dict[str, list[dict]] = {}
    for path in sorted(folder.glob("*_seed*.json")):
        groups.setdefault(path.name.rsplit("_seed", 1)[0], []).append(json.loads(path.read_text()))
    bands = ((0.4, 0.6), (0.2, 0.8), (0.0, 1.0))
    head = ["set (tag)", "L alone", "M alone", "z-sum (w = 0.5)", *(f"argmax w ∈ [{a}, {b}]" for a, b in bands)]
    head += ["excess", "pseudo AUROC L / M", "w picked in [0, 1]"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    deltas: dict[str, list[float]] = {}

    def cell(values: list[float]) -> str:
        return f"{np.mean(values):.3f} ± {np.std(values):.3f}"

    for key, records in groups.items():
        test = [r["test_auroc_by_weight"] for r in records]
        fixed = [r["test_fixed"] for r in records]
        row = [key, cell([t["1.0"] for t in test]), cell([t["0.0"] for t in test]), cell(fixed)]
        for a, b in bands:
            picked = [t[f"{pick_in_band(r, a, b):.1f}"] for r, t in zip(records, test, strict=True)]
            deltas.setdefault(f"[{a}, {b}]", []).append(float(np.mean(picked) - np.mean(fixed)))
            row.append(cell(picked))
        row.append(cell([r["test_excess"] for r in records]))
        row.append(
            f"{np.mean([r['pseudo_auroc_L'] for r in records]):.3f} / "
            f"{np.mean([r['pseudo_auroc_M'] for r in records]):.3f}"
        )
        row.append(", ".join(f"{r['w_argmax']:.1f}" for r in records))
        lines.append("| " + " | ".join(row) + " |")
    lines.append("")
    for band, values in deltas.items():
        lines.append(
            f"argmax in {band} − z-sum: mean {np.mean(values):+.4f}, worst {min(values):+.4f}, "
            f"best {max(values):+.4f} over {len(values)} set/size pairs."
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", default="elpv_mono,elpv_poly,bsdata,magnetic_tile,kolektorsdd")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--held-out", type=float, default=0.2)
    parser.add_argument("--cache", default="/work/data/cache/full")
    parser.add_argument("--out", default="docs/local_evidence/score_weights")
    parser.add_argument("--tag", default="full")
    parser.add_argument("--no-refit", action="store_true")
    parser.add_argument("--table", help="only write FOLDER/table.md from the results in FOLDER")
    args = parser.parse_args(argv)
    if args.table:
        folder = Path(args.table)
        (folder / "table.md").write_text(write_table(folder))
        print((folder / "table.md").read_text())
        return 0
    torch.set_num_threads(2)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for data, seed, target in pending_runs(Path(args.cache), args.datasets, args.seeds, out, args.tag):
        name = data.name
        paths = torch.load(Path(args.cache) / f"{name}.pt", weights_only=False)["train"]["paths"]
        start = time.perf_counter()
        result = evaluate(data, paths, seed, args.held_out, not args.no_refit)
        record = {"dataset": name, "seed": seed, "n_train": len(data.train), **result}
        record["seconds"] = time.perf_counter() - start
        target.write_text(json.dumps(record, indent=1))
        print(
            f"{name} seed {seed}: w_argmax {result['w_argmax']:.1f} w_excess {result['w_excess']:.2f} "
            f"pseudo L {result['pseudo_auroc_L']:.3f} M {result['pseudo_auroc_M']:.3f} | test fixed "
            f"{result['test_fixed']:.3f} argmax {result['test_argmax']:.3f} excess {result['test_excess']:.3f} "
            f"L {result['test_auroc_by_weight']['1.0']:.3f} M {result['test_auroc_by_weight']['0.0']:.3f} "
            f"({record['seconds']:.0f} s)",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
