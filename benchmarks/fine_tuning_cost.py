"""Wall time of the recommended fine-tuning vs the frozen GaussFT fit vs anomalib's PatchCore fit, in one process.

All three see the same capped training set (default 200 normals at 224 px, already in memory) on the same
CPU thread(s), one after the other:

* frozen GaussFT: extract the 9 levels of every normal, fit the 9 Ledoit-Wolf Gaussians;
* fine-tuned GaussFT with a recipe of ``fine_tuning_levers.py`` (held-out split, pseudo-anomalies,
  epoch-0 check, the epochs, the per-epoch re-fit and pseudo-anomaly check, the WiSE-FT grid and the final
  re-fit on every normal), without any test image or diagnostic;
* anomalib's ``PatchcoreModel`` on the same backbone (``blocks.2`` + ``blocks.4``, the stride-8/16 stages):
  memory bank of every patch, then anomalib's greedy coreset (``KCenterGreedy``) at its default ratio 0.1.
  On one CPU thread that selection runs at a few selections per second (~15,700 to select here), so it is
  timed for ``--coreset-probe`` selections and extrapolated linearly (each greedy step costs the same: one
  distance update over all patches); both numbers are written.

Example:
    export PYTHONPATH=src HF_HUB_CACHE=/work/shared/hf-cache/hub HF_HUB_OFFLINE=1
    nice -n 10 python3 benchmarks/fine_tuning_cost.py --dataset elpv_poly \\
        --out docs/fine_tuning/levers/cost_elpv_poly.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import fine_tuning_levers as flv

RECIPE = {
    "min_trainable_level": 5,
    "schedule": "warmup_cosine",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="elpv_poly")
    parser.add_argument("--set", nargs="*", default=[], help="field=value overrides of the recipe")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--coreset-probe", type=int, default=200)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    recipe = dict(RECIPE)
    for item in args.set:
        key, value = item.split("=", 1)
        default = getattr(flv.Config(), key)
        recipe[key] = type(default)(value) if not isinstance(default, tuple) else tuple(map(float, value.split(",")))
    config = flv.Config(**recipe)
    data = flv.load_dataset(args.dataset, 200, 100)
    images = data["train"]
    result = {"dataset": args.dataset, "n_train": len(images), "threads": args.threads}

    # Frozen GaussFT fit.
    t0 = time.perf_counter()
    extractor = flv.MultiLevelFeatureExtractor(flv.BACKBONE, pre_trained=True)
    extractor.ensure_weights()
    extractor.to(memory_format=torch.channels_last).eval()
    load_s = time.perf_counter() - t0
    net = flv.Net(extractor, 0)
    t0 = time.perf_counter()
    flv.fit_target(net.all_features({"input": images, "pooled": {}}), diagnostics=False)
    result["frozen_fit_s"] = time.perf_counter() - t0
    result["backbone_load_s"] = load_s
    out = Path(args.out)
    out.write_text(json.dumps(result, indent=1))

    # Recommended fine-tuning (no analysis).
    t0 = time.perf_counter()
    run = flv.run(args.dataset, 0, config, 200, 100, lambda m: print(m, flush=True), analysis=False)
    result["fine_tuning_s"] = time.perf_counter() - t0
    result["fine_tuning_timing"] = run["timing"]
    result["fine_tuning_config"] = dataclasses.asdict(config)
    result["fine_tuning_wise_alpha"] = run["selections"]["wise"]["alpha"]
    result["fine_tuning_epochs"] = [
        {"epoch": h["epoch"], "train_s": h.get("train_s"), "eval_s": h.get("eval_s")} for h in run["history"]
    ]
    out.write_text(json.dumps(result, indent=1))

    # anomalib PatchCore fit on the same images and backbone.
    from anomalib.models.image.patchcore.torch_model import PatchcoreModel

    t0 = time.perf_counter()
    patchcore = PatchcoreModel(layers=["blocks.2", "blocks.4"], backbone=flv.BACKBONE, pre_trained=True)
    patchcore.train()
    with torch.no_grad():
        for i in range(0, len(images), 32):
            patchcore(flv.normalise(images[i : i + 32]).contiguous())
    result["patchcore_embedding_s"] = time.perf_counter() - t0
    n_patches = sum(len(e) for e in patchcore.embedding_store)
    target = round(0.1 * n_patches)
    t0 = time.perf_counter()
    with torch.no_grad():
        patchcore.subsample_embedding(args.coreset_probe / n_patches)
    probe_s = time.perf_counter() - t0
    result["patchcore_patches"] = n_patches
    result["patchcore_coreset_probe"] = {"selections": args.coreset_probe, "seconds": probe_s}
    result["patchcore_coreset_extrapolated_s"] = probe_s * target / args.coreset_probe
    result["patchcore_fit_extrapolated_s"] = (
        result["patchcore_embedding_s"] + result["patchcore_coreset_extrapolated_s"]
    )
    print(json.dumps(result, indent=1))
    out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
