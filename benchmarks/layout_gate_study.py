"""Should the layout map's excess be added where the local maps already found the defect? (issue #14, heatmaps)

The default heatmap is ``h + e``: ``h = max(s_avg, s_det)``, the local maps on their held-out tail scale, and ``e =
relu(s_layout − 1)``, the layout map's excess over its held-out tail. ``e`` is coarse (a cell is a ninth of the
image): it lifts the large diffuse defects the local maps miss (Magnetic Tile), but in an image whose small defect
``h`` already finds, it lifts every normal pixel of the defect's cell too, above the normal pixels of other
images (BSData, the textures: 0.002-0.006 pixel AUROC, docs/local_evidence.md, "The layout map").

Candidate: weight the excess by how little the local maps found, ``h + e · min(1, τ / max h)``, with ``max h`` the
image's largest local-map value and ``τ`` the same statistic's tail on the held-out normals (a Gaussian q99 of
their image maxima, ``mean + 2.326 · std``, as the layout map's own tail). An image whose local maps stay within
what normal images show gets the full excess; one whose local map exceeds it k-fold gets 1/k of it. Normal-only:
τ is one more held-out constant. Variants: τ the held-out maximum, the held-out mean; a hard gate (the excess only
where ``max h ≤ τ``); and, added after the first run, the ratio uncapped but floored at the held-out mean ``μ`` of
``max h``, ``τ / max(max h, μ)``: up to ``τ / μ`` times the excess where the local maps are as quiet as a typical
normal image's (the package's default). The image score is not changed (its map term reads the averaged map and
the excess, not the detail map); its AUROC is reported for the variant that gates it too, with ``max s_avg``.

Protocol of the layout studies (20 % held out fix every constant with Gaussians fitted on the other 80 %; test
maps from Gaussians refitted on all training images).

    PYTHONPATH=src:benchmarks python benchmarks/layout_gate_study.py --tag n200 --out docs/local_evidence/layout_gate
    PYTHONPATH=src:benchmarks python benchmarks/layout_gate_study.py --cache /work/data/cache/full --tag full \
        --datasets magnetic_tile,bsdata,kolektorsdd,elpv_mono,elpv_poly --out docs/local_evidence/layout_gate
    python benchmarks/layout_gate_study.py --table docs/local_evidence/layout_gate
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from anomalib_gaussft.gaussft.map_fusion import LAYOUT_TAIL_Z
from layout_map_study import AVERAGED, DETAIL, layout_evidence
from layout_scale_study import mean_std_table, run_study, seed_runs
from local_evidence_study import auroc, held_out_split, topk_mean, zscore
from multiscale_map_study import maps_of, pixel_tail


def image_max(maps: torch.Tensor) -> torch.Tensor:
    """``(N,)`` largest value of each map."""
    return maps.flatten(1).amax(dim=1)


def soft_gate(test_max: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    """``min(1, τ / max h)`` per image, shaped to multiply ``(N, H, W)`` maps."""
    return (tau / test_max.clamp_min(1e-12)).clamp(max=1)[:, None, None]


def record_of(data, seed: int, frac: float) -> dict:
    """Pixel AUROC of the default heatmap and the gated ones; image AUROC of the score with and without a gate."""
    fit_idx, held_idx = held_out_split(len(data.train), frac, seed)
    held = data.train.take(held_idx)
    avg_h, avg_t = maps_of(data, AVERAGED, fit_idx, held)
    s_avg_h, s_avg_t = pixel_tail(avg_h, avg_h, 0.99), pixel_tail(avg_h, avg_t, 0.99)
    evidence = layout_evidence(data, fit_idx, held)  # the layout excess and L as the package computes them
    (e_h, e_t), (l_h, l_t) = evidence["excess"], evidence["distance"]
    results = {}
    # image score: z(L) + z(M'), M' = top 1 % of s_avg + excess; gated variant uses max s_avg
    max_avg_h, max_avg_t = image_max(s_avg_h), image_max(s_avg_t)
    tau_avg = max_avg_h.mean() + LAYOUT_TAIL_Z * max_avg_h.std()
    labels = np.asarray(data.labels)
    for name, (g_h, g_t) in {
        "image: L + M' (default)": (1.0, 1.0),
        "image: L + M', excess gated by max s_avg": (soft_gate(max_avg_h, tau_avg), soft_gate(max_avg_t, tau_avg)),
    }.items():
        m_h, m_t = topk_mean(s_avg_h + e_h * g_h, 0.01), topk_mean(s_avg_t + e_t * g_t, 0.01)
        results[name] = auroc(labels, (zscore(l_t, l_h) + zscore(m_t, m_h)).numpy())
    if data.masks is None:
        return {"results": results}
    det_h, det_t = maps_of(data, DETAIL, fit_idx, held, 2.0)
    h_h = torch.maximum(s_avg_h, pixel_tail(det_h, det_h, 0.99))
    h_t = torch.maximum(s_avg_t, pixel_tail(det_h, det_t, 0.99))
    max_h, max_t = image_max(h_h), image_max(h_t)
    taus = {
        "q99": max_h.mean() + LAYOUT_TAIL_Z * max_h.std(),
        "max": max_h.max(),
        "mean": max_h.mean(),
    }
    heatmaps = {
        "pixel: h + e (default)": h_t + e_t,
        "pixel: h + e · min(1, τ/max h), τ Gaussian q99": h_t + e_t * soft_gate(max_t, taus["q99"]),
        "pixel: h + e · τ/max(max h, μ), τ Gaussian q99, μ held-out mean": h_t
        + e_t * (taus["q99"] / max_t.clamp_min(taus["mean"]))[:, None, None],
        "pixel: h + e · min(1, τ/max h), τ held-out max": h_t + e_t * soft_gate(max_t, taus["max"]),
        "pixel: h + e · min(1, τ/max h), τ held-out mean": h_t + e_t * soft_gate(max_t, taus["mean"]),
        "pixel: h + e · [max h ≤ τ], τ Gaussian q99": h_t + e_t * (max_t <= taus["q99"]).float()[:, None, None],
        "pixel: h (no layout map)": h_t,
    }
    masks = data.masks.numpy()
    results.update({name: auroc(masks, m.numpy()) for name, m in heatmaps.items()})
    return {
        "results": results,
        "tau_q99": float(taus["q99"]),
        "gate_open_share": float((max_t <= taus["q99"]).float().mean()),
    }


def write_table(folder: Path) -> str:
    """Markdown: pixel and image AUROC, one row per rule, mean ± std over seeds per set and training-set size."""
    runs = seed_runs(folder, lambda _record, rule: rule, lambda r: f"{r['dataset']} ({r['n_train']})")
    parts = []
    for measure in ("pixel", "image"):
        rows = [rule for rule in runs if rule.startswith(f"{measure}: ")]
        parts.append(mean_std_table(f"{measure} AUROC", runs, rows, lambda row: row.split(": ", 1)[1]))
    return "\n\n".join(parts) + "\n"


def main(argv: list[str] | None = None) -> int:
    return run_study(argv, __doc__, "docs/local_evidence/layout_gate", record_of, write_table)


if __name__ == "__main__":
    raise SystemExit(main())
