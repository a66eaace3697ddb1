"""What the second held-out pass costs the frozen fit (``score_layout_map``, the image score reading the layout map).

With ``score_layout_map`` on, the held-out 20 % of the training images pass through the backbone twice: the map
fusion's constants must exist before the score's terms can be computed (keeping their maps instead would grow with
the held-out set). This times ``Engine.fit`` of the frozen default with the option on and off, interleaved, in one
process on the same thread(s), on an MVTec-layout category, and writes the wall times and their ratio.

    export PYTHONPATH=src HF_HUB_CACHE=/work/shared/hf-cache/hub HF_HUB_OFFLINE=1
    python benchmarks/held_out_pass_cost.py --root /work/data/bsdata --category bsdata \
        --out docs/results/held_out_pass_cost.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from anomalib.data import MVTecAD
from anomalib.engine import Engine

from anomalib_gaussft import GaussFT


def timed_fit(root: str, category: str, score_layout_map: bool, backbone: str, workdir: Path) -> tuple[float, int]:
    """Wall time of ``Engine.fit`` (frozen default, the option as given) and the number of training images."""
    datamodule = MVTecAD(root=root, category=category, num_workers=0, train_batch_size=16, eval_batch_size=16)
    model = GaussFT(backbone=backbone, fine_tune_epochs=0, score_layout_map=score_layout_map)
    engine = Engine(default_root_dir=workdir, logger=False, enable_progress_bar=False)
    start = time.perf_counter()
    engine.fit(model=model, datamodule=datamodule)
    return time.perf_counter() - start, len(datamodule.train_data)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", required=True)
    parser.add_argument("--category", required=True)
    parser.add_argument("--backbone", default="tf_efficientnet_lite0")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    times: dict[str, list[float]] = {"off": [], "on": []}
    n_train = 0
    with tempfile.TemporaryDirectory() as tmp:
        timed_fit(args.root, args.category, False, args.backbone, Path(tmp))  # warm-up: file cache, imports
        for repeat in range(args.repeats):
            for option in ("off", "on"):
                seconds, n_train = timed_fit(args.root, args.category, option == "on", args.backbone, Path(tmp))
                times[option].append(seconds)
                print(f"repeat {repeat}: score_layout_map {option}: {seconds:.1f} s", flush=True)
    medians = {option: statistics.median(values) for option, values in times.items()}
    result = {
        "command": "python benchmarks/held_out_pass_cost.py " + " ".join(sys.argv[1:]),
        "dataset": f"{args.root}/{args.category}",
        "n_train": n_train,
        "backbone": args.backbone,
        "threads": args.threads,
        "fit_seconds": times,
        "median_seconds": medians,
        "on_over_off": medians["on"] / medians["off"],
        "load_average_after": os.getloadavg(),
    }
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: result[k] for k in ("n_train", "median_seconds", "on_over_off")}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
