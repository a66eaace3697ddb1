"""Markdown report and PNG plots of ``compare.py``'s ``results.jsonl`` rows.

Used by ``compare.py`` after its jobs (and by ``compare.py --report-only``); ``write_report`` writes
``OUT/results.md`` and, with ``--docs PATH``, ``PATH``, each with its plots next to it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from common import BACKBONE, IMAGE_SIZE, SCORE_SOURCE, machine_description, now


def fmt(value: Any, digits: int = 3) -> str:
    """A table cell: ``–`` for missing values, floats to ``digits`` decimals."""
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def summary(result: dict[str, Any]) -> str:
    """One console line for a finished job."""
    parts = [f"image AUROC {fmt(result['image_auroc'])}"]
    if result.get("pixel_auroc") is not None:
        parts.append(f"pixel AUROC {fmt(result['pixel_auroc'])}")
    parts.append(f"fit {result['fit_s']:.1f} s, peak {result['fit_peak_rss_mb']:.0f} MB")
    return ", ".join(parts)


def markdown_table_for_console(markdown: str) -> str:
    """The report from its results section on (what the console shows)."""
    lines = markdown.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith("## Results")), 0)
    return "\n".join(lines[start : start + 200])


def _ratio(value: float | None, reference: float | None) -> str:
    if value is None or not reference:
        return "–"
    return f"×{value / reference:.2f}"


def write_report(rows: list[dict[str, Any]], args: argparse.Namespace, command_line: str, out: Path) -> str:
    targets = [out / "results.md"]
    if args.docs:
        targets.append(Path(args.docs))
    markdown = ""
    for target in targets:
        target.parent.mkdir(parents=True, exist_ok=True)
        plots = make_plots(rows, target.parent, prefix=target.stem)
        markdown = render_markdown(rows, args, command_line, plots)
        target.write_text(markdown)
    return markdown


def render_markdown(rows: list[dict[str, Any]], args: argparse.Namespace, command_line: str, plots: list[str]) -> str:
    machine = machine_description()
    threads = sorted({r.get("torch_threads") for r in rows if r.get("torch_threads")})
    models = list(dict.fromkeys(r["model"] for r in rows))
    datasets = list(dict.fromkeys(r["dataset"] for r in rows))
    base_scale = min(r["scale"] for r in rows)
    lines = [
        "# GaussFT vs PaDiM, PatchCore, DFM",
        "",
        f"Generated {now()} by `benchmarks/compare.py`.",
        "",
        "```bash",
        command_line,
        "```",
        *_other_commands(rows, command_line),
        "",
        "## Machine",
        "",
        f"- CPU: {machine.get('cpu')} — {machine.get('logical_cores')} logical cores"
        + (f" ({machine['affinity_cores']} usable)" if "affinity_cores" in machine else "")
        + (f", {machine['ram']} RAM" if "ram" in machine else ""),
        f"- torch {machine['torch']} (threads per job: {', '.join(map(str, threads)) or '?'}), anomalib "
        f"{machine['anomalib']}, timm {machine['timm']}, openvino {machine['openvino']}, "
        f"Python {machine['python']}",
        f"- {machine['platform']}; no GPU used (accelerator cpu)",
        f"- 1-min load average seen at job start/end: {_load_range(rows)} (timings are noisy when it exceeds the "
        "cores: other work was running)",
        f"- Allocator: {', '.join(sorted({r.get('malloc', '?') for r in rows}))}",
        "",
        "## Method",
        "",
        f"- Backbone for every model: `{BACKBONE}` (ImageNet weights), input {IMAGE_SIZE}×{IMAGE_SIZE}, normalised "
        "with the backbone's mean/std. PaDiM: `blocks.1,2,4`, 100 random channels; PatchCore: `blocks.2,4`, "
        f"coreset ratio {args.coreset_ratio}; DFM: `blocks.4`; GaussFT: its defaults (9 pooled levels for the "
        "image score, levels 3-5 shared Gaussians for the map) unless the model's kwargs say otherwise.",
        f"- Scores: {SCORE_SOURCE}; AUROC by `sklearn.metrics.roc_auc_score`. Pixel AUROC and AUPRO (anomalib, "
        "FPR ≤ 0.3) at the map's 224 px resolution; only for datasets with masks.",
        "- Fit time: wall time of `engine.fit` (no validation, no checkpoint written). Fit peak RSS: the job's own "
        "`ru_maxrss` right after the fit (each job is a fresh process, `num_workers=0`); Δ = peak minus the RSS "
        "before the fit (weights, data module and imports already loaded). ×PaDiM: ratio to PaDiM on the same "
        "dataset and training-set size (memory ratio on the absolute peak).",
        "- Throughput: `model.model` on pre-processed 224 px tensors, `torch.inference_mode`, images/s.",
        "- Stored: `state_dict` of the torch model in MB (float32 unless the model stores otherwise); statistics = "
        "without the backbone's weights (what a frozen model adds on top of the public backbone). OpenVINO: size "
        "of the FP32 IR (`.xml` + `.bin`) written by `engine.export`.",
        "- GaussFT's fit memory does not depend on the number of training images once it exceeds one batch "
        f"(batch size {args.batch_size}): below that, smaller batches make its Δ smaller.",
        "",
        f"## Results (training-set scale ×{base_scale})",
        "",
    ]
    main_rows = [r for r in rows if r["scale"] == base_scale]
    padim = {(r["dataset"], r["scale"]): r for r in rows if r["model"] == "padim"}
    has_export = any(r.get("openvino_mb") is not None for r in rows)
    for dataset in datasets:
        subset = [r for r in main_rows if r["dataset"] == dataset]
        if not subset:
            continue
        sample = subset[0]
        lines += [
            f"### {dataset} ({sample['n_train']} train, {sample['n_test']} test of which "
            f"{sample['n_test_anomalous']} anomalous)",
            "",
        ]
        header = (
            "| model | image AUROC | pixel AUROC | AUPRO | fit s | fit ×PaDiM | fit peak MB | Δ MB | peak ×PaDiM "
            "| img/s b1 | img/s b16 | stored MB | statistics MB |"
        )
        sep = "|---|" + "---:|" * 12
        if has_export:
            header += " OpenVINO MB |"
            sep += "---:|"
        lines += [header, sep]
        for model in models:
            row = next((r for r in subset if r["model"] == model), None)
            if row is None:
                continue
            ref = padim.get((dataset, row["scale"]))
            name = model
            if row.get("fine_tune_epochs_run") is not None:
                name += f" (best epoch {row['fine_tune_best_epoch']}/{row['fine_tune_epochs_run']})"
            cells = [
                name,
                fmt(row["image_auroc"]),
                fmt(row.get("pixel_auroc")),
                fmt(row.get("aupro")),
                fmt(row["fit_s"], 1),
                _ratio(row["fit_s"], ref and ref["fit_s"]),
                fmt(row["fit_peak_rss_mb"], 0),
                fmt(row["fit_delta_rss_mb"], 0),
                _ratio(row["fit_peak_rss_mb"], ref and ref["fit_peak_rss_mb"]),
                fmt(row["throughput_b1"], 1),
                fmt(row["throughput_b16"], 1),
                fmt(row["state_dict_mb"], 1),
                fmt(row["stats_mb"], 1),
            ]
            if has_export:
                cells.append(fmt(row.get("openvino_mb"), 1))
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    if len(datasets) > 1:
        lines += [
            "### Mean over datasets",
            "",
            "| model | datasets | mean image AUROC | mean pixel AUROC | mean fit ×PaDiM |",
        ]
        lines.append("|---|---:|---:|---:|---:|")
        for model in models:
            subset = [r for r in main_rows if r["model"] == model]
            image = [r["image_auroc"] for r in subset if r["image_auroc"] is not None]
            pixel = [r["pixel_auroc"] for r in subset if r.get("pixel_auroc") is not None]
            ratios = [
                r["fit_s"] / padim[(r["dataset"], r["scale"])]["fit_s"]
                for r in subset
                if (r["dataset"], r["scale"]) in padim
            ]
            lines.append(
                f"| {model} | {len(subset)} | {fmt(sum(image) / len(image) if image else None)} | "
                f"{fmt(sum(pixel) / len(pixel) if pixel else None)} | "
                f"{'×' + format(sum(ratios) / len(ratios), '.2f') if ratios else '–'} |"
            )
        lines.append("")
    if len({r["scale"] for r in rows}) > 1:
        lines += [
            "## Scaling with the training-set size",
            "",
            "Nested training subsets (the ×1 images are part of ×2, …); the test set is the same for every size.",
            "",
        ]
        for dataset in datasets:
            subset = [r for r in rows if r["dataset"] == dataset]
            scales = sorted({r["scale"] for r in subset})
            lines += [f"### {dataset}", ""]
            lines.append(
                "| model | "
                + " | ".join(f"×{s} (n={_n_for(subset, s)}): fit s / peak MB / Δ MB" for s in scales)
                + " |"
            )
            lines.append("|---|" + "---:|" * len(scales))
            for model in models:
                cells = []
                for scale in scales:
                    row = next((r for r in subset if r["model"] == model and r["scale"] == scale), None)
                    cells.append(
                        "–"
                        if row is None
                        else f"{row['fit_s']:.1f} / {row['fit_peak_rss_mb']:.0f} / {row['fit_delta_rss_mb']:.0f}"
                    )
                lines.append(f"| {model} | " + " | ".join(cells) + " |")
            lines.append("")
    if plots:
        lines += ["## Plots", ""] + [f"![{Path(p).stem}]({p})" for p in plots] + [""]
    lines += [
        "## Model configurations",
        "",
        "| model | kwargs |",
        "|---|---|",
    ]
    for model in models:
        row = next(r for r in rows if r["model"] == model)
        lines.append(f"| {model} | `{json.dumps(row['model_kwargs'])}` |")
    lines.append("")
    return "\n".join(lines)


def _other_commands(rows: list[dict[str, Any]], command_line: str) -> list[str]:
    others = sorted({r.get("command", "") for r in rows} - {command_line, ""})
    if not others:
        return []
    intro = "Some rows were measured by earlier invocations (resumed), with the same job settings:"
    return ["", intro, "", "```bash", *others, "```"]


def _load_range(rows: list[dict[str, Any]]) -> str:
    loads = [x for r in rows for x in r.get("load_avg", [])]
    return f"{min(loads):.1f}–{max(loads):.1f}" if loads else "?"


def _n_for(rows: list[dict[str, Any]], scale: int) -> str:
    sizes = sorted({r["n_train"] for r in rows if r["scale"] == scale})
    return ",".join(map(str, sizes))


def make_plots(rows: list[dict[str, Any]], folder: Path, prefix: str) -> list[str]:
    """Write PNG plots next to the markdown; return their names (relative links)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    names = []
    models = list(dict.fromkeys(r["model"] for r in rows))
    datasets = list(dict.fromkeys(r["dataset"] for r in rows))
    base_scale = min(r["scale"] for r in rows)
    main_rows = [r for r in rows if r["scale"] == base_scale]

    fig, ax = plt.subplots(figsize=(max(5, 1.6 * len(datasets) + 2), 3.8))
    width = 0.8 / max(1, len(models))
    for i, model in enumerate(models):
        values = [
            next((r["image_auroc"] or 0 for r in main_rows if r["model"] == model and r["dataset"] == d), 0)
            for d in datasets
        ]
        ax.bar([j + i * width for j in range(len(datasets))], values, width, label=model)
    ax.set_xticks([j + width * (len(models) - 1) / 2 for j in range(len(datasets))], datasets)
    ax.set_ylabel("image AUROC")
    lowest = min((r["image_auroc"] for r in main_rows if r["image_auroc"] is not None), default=0.5)
    ax.set_ylim(min(0.4, lowest - 0.05), 1.0)
    ax.axhline(0.5, color="grey", lw=0.5)
    ax.legend(fontsize=7, ncol=2)
    ax.set_title(f"Image AUROC ({BACKBONE}, {IMAGE_SIZE} px)")
    fig.tight_layout()
    name = f"{prefix}_image_auroc.png"
    fig.savefig(folder / name, dpi=120)
    plt.close(fig)
    names.append(name)

    if len({r["scale"] for r in rows}) > 1:
        fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
        for model in models:
            for dataset in datasets:
                subset = sorted(
                    (r for r in rows if r["model"] == model and r["dataset"] == dataset), key=lambda r: r["n_train"]
                )
                if len(subset) < 2:
                    continue
                label = model if len(datasets) == 1 else f"{model} / {dataset}"
                x = [r["n_train"] for r in subset]
                axes[0].plot(x, [r["fit_peak_rss_mb"] for r in subset], marker="o", label=label)
                axes[1].plot(x, [r["fit_delta_rss_mb"] for r in subset], marker="o", label=label)
                axes[2].plot(x, [r["fit_s"] for r in subset], marker="o", label=label)
        axes[0].set_ylabel("fit peak RSS (MB)")
        axes[1].set_ylabel("fit Δ RSS over pre-fit (MB)")
        axes[2].set_ylabel("fit time (s)")
        for ax in axes:
            ax.set_xlabel("training images")
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize=7)
        fig.suptitle("Fit cost vs training-set size")
        fig.tight_layout()
        name = f"{prefix}_scaling.png"
        fig.savefig(folder / name, dpi=120)
        plt.close(fig)
        names.append(name)
    return names
