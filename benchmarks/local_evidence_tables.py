"""Curated markdown tables for docs/local_evidence.md from the raw results under docs/local_evidence/.

python benchmarks/local_evidence_tables.py --dir docs/local_evidence > docs/local_evidence/tables.md
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

sys_path = Path(__file__).resolve().parent
import sys  # noqa: E402

sys.path.insert(0, str(sys_path))
from local_evidence_report import load_baselines, load_study  # noqa: E402

SETS = ("elpv_mono", "elpv_poly", "bsdata", "brick", "grass", "gravel")
MASK_SETS = ("bsdata", "brick", "grass", "gravel")
SHORT = {
    "elpv_mono": "ELPV mono",
    "elpv_poly": "ELPV poly",
    "bsdata": "BSData",
    "brick": "brick",
    "grass": "grass",
    "gravel": "gravel",
}

MAP_ROWS = [  # (label, tag, variant)
    ("shipped default: levels 3-5, shared Gaussian, fitted on all (`default_all`)", "focus", "default_all"),
    ("same, fitted on 80 % (`m_default`)", "focus", "m_default"),
    ("+ 3x3 local average before the Gaussian (`m_k3`)", "focus", "m_k3"),
    ("+ per-level z-score on held-out normals (`m_z`, seed 0 screen)", "study", "m_z"),
    ("+ per-level division by the held-out 99.9 % quantile (`m_q`, seed 0 screen)", "study", "m_q"),
    ("+ 3x3 + z-score (`m_k3_z`)", "focus", "m_k3_z"),
    ("levels 3, 5 (`m_l35`)", "focus", "m_l35"),
    ("levels 2-5 (`m_l2345`, seed 0 screen)", "study", "m_l2345"),
    ("levels 2-4 (`m_l234`, seed 0 screen)", "study", "m_l234"),
    ("PCA residual instead of Mahalanobis (`m_fre`)", "focus", "m_fre"),
    ("levels 3-5 concatenated, 3x3 (`m_cat345_k3`)", "focus", "m_cat345_k3"),
    ("blur sigma 0 (`m_s0`, seed 0 screen)", "study", "m_s0"),
    ("blur sigma 2 (`m_s2`, seed 0 screen)", "study", "m_s2"),
    ("blur sigma 8 (`m_s8`, seed 0 screen)", "study", "m_s8"),
    ("**per-position** Gaussians (`m_pp`)", "focus", "m_pp"),
    ("per-position, 3x3 (`m_pp_k3`)", "focus", "m_pp_k3"),
    ("per-position, levels 3, 5 (`m_pp_l35`)", "focus", "m_pp_l35"),
    ("**7x7 regions** (`m_r7`)", "focus", "m_r7"),
    ("7x7 regions, 3x3 (`m_r7_k3`)", "focus", "m_r7_k3"),
    ("7x7 regions, sigma 2 (`m_r7_s2`)", "focus", "m_r7_s2"),
    ("7x7 regions, levels 2-5 (`m_r7_l2345`)", "focus", "m_r7_l2345"),
    ("14x14 regions (`m_r14`)", "focus", "m_r14"),
    ("14x14 regions, levels 3, 5 (`m_r14_l35`)", "focus", "m_r14_l35"),
    ("14x14 regions, 3x3 (`m_r14_k3`)", "focus", "m_r14_k3"),
    ("7x7 regions, levels 3+5 concatenated, 3x3 (PatchCore's features) (`m_r7_cat35_k3`)", "focus", "m_r7_cat35_k3"),
    ("7x7 regions, refitted on all (`refit` run)", "refit", "m_r7"),
]

IMAGE_ROWS = [  # (label, tag, variant, metric)
    ("shipped default: pooled sum, fitted on all", "focus", "default_all", "image_auroc"),
    ("pooled sum, fitted on 80 %", "focus", "img_pool", "image_auroc"),
    ("pooled sum of per-level z-scores", "extra", "img_pool_zlev", "image_auroc"),
    ("map max, shipped map", "focus", "img_m_default_max", "image_auroc"),
    ("map top 1 %, shipped map", "focus", "img_m_default_top1", "image_auroc"),
    ("map top 1 %, shared + 3x3", "focus", "img_m_k3_top1", "image_auroc"),
    ("map top 1 %, per-position", "focus", "img_m_pp_top1", "image_auroc"),
    ("map top 1 %, per-position + 3x3", "focus", "img_m_pp_k3_top1", "image_auroc"),
    ("map top 1 %, 7x7 regions", "focus", "img_m_r7_top1", "image_auroc"),
    ("map max, 7x7 regions", "focus", "img_m_r7_max", "image_auroc"),
    ("map top 1 %, 7x7 regions + 3x3", "focus", "img_m_r7_k3_top1", "image_auroc"),
    ("map top 1 %, 7x7 regions, levels 3+5 cat + 3x3", "focus", "img_m_r7_cat35_k3_top1", "image_auroc"),
    ("grid: level 5 -> 4x4 cells, one Gaussian per cell, max", "focus", "img_g_l5_4_max", "image_auroc"),
    ("grid: level 7 -> 2x2 cells, per cell, max", "focus", "img_g_l7_2_max", "image_auroc"),
    ("grid: level 8 -> 4x4 cells, shared, mean", "focus", "img_g_l8_4s_mean", "image_auroc"),
    ("layout: level 5 -> 3x3, joint Gaussian (1008 d)", "extra", "img_g_l5_3j_max", "image_auroc"),
    ("layout: level 5 -> 3x3, joint PCA residual (DFM-like)", "extra", "img_g_l5_3f_max", "image_auroc"),
    ("z(pooled) + z(map top 1 %, 7x7 regions)", "focus", "comb_z[pool+m_r7_top1]", "image_auroc"),
    ("Fisher(Gaussian tails) of the same two", "focus", "comb_fisher[pool+m_r7_top1]", "image_auroc"),
    ("max of the same two z", "focus", "comb_zmax[pool+m_r7_top1]", "image_auroc"),
    ("z(pooled) + z(map top 1 %, per-position + 3x3)", "focus", "comb_z[pool+m_pp_k3_top1]", "image_auroc"),
    ("z(pooled) + z(layout)", "extra", "comb_z[pool+g_l5_3j_max]", "image_auroc"),
    (
        "z(pooled) + z(grid l5 4x4 max) + z(map top 1 %, regions 7)",
        "focus",
        "comb3_z[pool+g_l5_4_max+m_r7_top1]",
        "image_auroc",
    ),
    (
        "**z(pooled) + z(layout) + z(map top 1 %, regions 7)**",
        "extra",
        "comb3_z[pool+g_l5_3j_max+m_r7_top1]",
        "image_auroc",
    ),
    ("same, regions 7 + 3x3 map", "extra", "comb3_z[pool+g_l5_3j_max+m_r7_k3_top1]", "image_auroc"),
    (
        "**same three, Gaussians refitted on all (recommended)**",
        "refit",
        "comb3_z[pool+g_l5_3j_max+m_r7_top1]",
        "image_auroc",
    ),
    ("same, refitted, layout as PCA residual", "refit", "comb3_z[pool+g_l5_3f_max+m_r7_top1]", "image_auroc"),
    ("z(pooled) + z(map top 1 %, regions 7), refitted", "refit", "comb_z[pool+m_r7_top1]", "image_auroc"),
]


def cell(values: list[float] | None) -> str:
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{np.mean(values):.3f} ± {np.std(values, ddof=1):.3f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", default="docs/local_evidence")
    args = parser.parse_args(argv)
    folder = Path(args.dir)
    base = load_baselines(folder)
    studies = {tag: load_study(folder, tag) for tag in ("study", "focus", "extra", "refit")}

    print("### Baselines (one run each; `benchmarks/local_evidence_baselines.py`)\n")
    print(
        "| model | "
        + " | ".join(f"{SHORT[s]} image" for s in SETS)
        + " | "
        + " | ".join(f"{SHORT[s]} pixel" for s in MASK_SETS)
        + " | statistics MB |"
    )
    print("|---|" + "---:|" * (len(SETS) + len(MASK_SETS) + 1))
    for model in ("padim", "patchcore", "dfm", "gaussft_frozen"):
        rows = base.get(model, {})
        cells = [f"{rows[s]['image_auroc']:.3f}" if s in rows else "–" for s in SETS]
        cells += [
            f"{rows[s]['pixel_auroc']:.3f}" if s in rows and rows[s].get("pixel_auroc") else "–" for s in MASK_SETS
        ]
        stats = [rows[s]["stats_mb"] for s in SETS if s in rows]
        cells.append(f"{max(stats):.1f}" if stats else "–")
        print(f"| {model} | " + " | ".join(cells) + " |")

    def best(s: str, metric: str, models=("padim", "patchcore", "dfm")) -> float | None:
        vals = [base[m][s].get(metric) for m in models if s in base.get(m, {})]
        vals = [v for v in vals if v is not None]
        return max(vals) if vals else None

    print("\n### Heatmaps: pixel AUROC (mean ± std over 3 held-out seeds unless marked)\n")
    print("| map variant | " + " | ".join(SHORT[s] for s in MASK_SETS) + " |")
    print("|---|" + "---:|" * len(MASK_SETS))
    print(
        "| PatchCore (baseline) | "
        + " | ".join(
            f"{base['patchcore'][s]['pixel_auroc']:.3f}" if s in base.get("patchcore", {}) else "–" for s in MASK_SETS
        )
        + " |"
    )
    print(
        "| PaDiM (baseline) | "
        + " | ".join(f"{base['padim'][s]['pixel_auroc']:.3f}" if s in base.get("padim", {}) else "–" for s in MASK_SETS)
        + " |"
    )
    for label, tag, variant in MAP_ROWS:
        per = studies[tag].get(variant, {})
        print(f"| {label} | " + " | ".join(cell(per.get(s, {}).get("pixel_auroc")) for s in MASK_SETS) + " |")

    print("\n### Image scores: image AUROC (mean ± std over 3 held-out seeds)\n")
    print("| image score | " + " | ".join(SHORT[s] for s in SETS) + " |")
    print("|---|" + "---:|" * len(SETS))
    print(
        "| best of PaDiM / PatchCore / DFM | "
        + " | ".join(f"{best(s, 'image_auroc'):.3f}" if best(s, "image_auroc") else "–" for s in SETS)
        + " |"
    )
    for label, tag, variant, metric in IMAGE_ROWS:
        per = studies[tag].get(variant, {})
        print(f"| {label} | " + " | ".join(cell(per.get(s, {}).get(metric)) for s in SETS) + " |")

    final = folder / "final.json"
    if final.is_file():
        rep = json.loads(final.read_text())
        norefit_path = folder / "final_norefit.json"
        norefit = json.loads(norefit_path.read_text()) if norefit_path.is_file() else {"sets": {}}
        print("\n### Recommended default vs baselines (`benchmarks/local_evidence_final.py`)\n")
        print(
            "Image rows: AUROC of the recommended score z(layout) + z(map top 1 %) (mean ± std over 3 held-out "
            'seeds); the three-term variant adds z(pooled sum); "no refit": test images scored by the 80 % '
            "Gaussians. Pixel rows: the recommended map (7 x 7 regional Gaussians, levels 3-5, sigma 4).\n"
        )
        print(
            "| set | GaussFT shipped | **recommended** | 3-term (+ pooled) | recommended, no refit | PaDiM | "
            "PatchCore | DFM | recommended − PatchCore [95 % CI] | recommended − best baseline [95 % CI] |"
        )
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")

        def g(m: str, s: str, key: str) -> str:
            v = base.get(m, {}).get(s, {}).get(key)
            return f"{v:.3f}" if v is not None else "–"

        def ms(d: dict | None) -> str:
            return f"{d['mean']:.3f} ± {d['std']:.3f}" if d else "–"

        for s in SETS:
            e = rep["sets"].get(s)
            if not e:
                continue
            vs = e.get("vs_baselines", {})
            pc = vs.get("patchcore")
            best_model = max(
                ("padim", "patchcore", "dfm"), key=lambda m: base.get(m, {}).get(s, {}).get("image_auroc", -1)
            )
            bb = vs.get(best_model)

            def ci(v: dict | None) -> str:
                return f"{v['diff']:+.3f} [{v['ci95'][0]:+.3f}, {v['ci95'][1]:+.3f}]" if v else "–"

            nr = norefit["sets"].get(s, {}).get("image_auroc")
            print(
                f"| {SHORT[s]} image | {g('gaussft_frozen', s, 'image_auroc')} | **{ms(e['image_auroc'])}** | "
                f"{ms(e['image_auroc_subsets']['P+L+M'])} | {ms(nr)} | {g('padim', s, 'image_auroc')} | "
                f"{g('patchcore', s, 'image_auroc')} | {g('dfm', s, 'image_auroc')} | {ci(pc)} | "
                f"{ci(bb)} ({best_model}) |"
            )
        for s in MASK_SETS:
            e = rep["sets"].get(s)
            if not e or "pixel_auroc" not in e:
                continue
            pc = base.get("patchcore", {}).get(s, {}).get("pixel_auroc")
            nr = norefit["sets"].get(s, {}).get("pixel_auroc")
            print(
                f"| {SHORT[s]} pixel | {g('gaussft_frozen', s, 'pixel_auroc')} | **{ms(e['pixel_auroc'])}** | "
                f"(same map) | {ms(nr)} | {g('padim', s, 'pixel_auroc')} | {g('patchcore', s, 'pixel_auroc')} | "
                f"{g('dfm', s, 'pixel_auroc')} | {e['pixel_auroc']['mean'] - pc:+.3f} (no CI) | |"
            )

        print(
            "\nEvery subset of the three z-scored components (refitted; mean over 3 seeds): P = pooled sum, "
            "L = layout, M = map top 1 %.\n"
        )
        subsets = list(next(iter(rep["sets"].values()))["image_auroc_subsets"])
        print("| components | " + " | ".join(SHORT[s] for s in SETS if s in rep["sets"]) + " |")
        print("|---|" + "---:|" * len([s for s in SETS if s in rep["sets"]]))
        for k in subsets:
            print(
                f"| {k} | "
                + " | ".join(
                    f"{rep['sets'][s]['image_auroc_subsets'][k]['mean']:.3f}" for s in SETS if s in rep["sets"]
                )
                + " |"
            )
        print(
            "\nPaired bootstrap (2000 resamples of the test images, normal and anomalous separately; seed-0 "
            "scores) of AUROC(recommended) − AUROC(other):\n"
        )
        print("| set | PaDiM | PatchCore | DFM | GaussFT shipped | 3-term (+ pooled) |")
        print("|---|---:|---:|---:|---:|---:|")
        for s in SETS:
            if s not in rep["sets"]:
                continue
            vs = rep["sets"][s].get("vs_baselines", {})
            cells = []
            for m in ("padim", "patchcore", "dfm", "gaussft_frozen"):
                v = vs.get(m)
                cells.append(f"{v['diff']:+.3f} [{v['ci95'][0]:+.3f}, {v['ci95'][1]:+.3f}]" if v else "–")
            v = rep["sets"][s].get("L+M_minus_P+L+M")
            cells.append(f"{v['diff']:+.3f} [{v['ci95'][0]:+.3f}, {v['ci95'][1]:+.3f}]" if v else "–")
            print(f"| {SHORT[s]} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
