"""The evaluation report: inference-graph analysis, PNG plots, JSON and Markdown.

:func:`analyse` computes the per-class, per-image and difficulty statistics of one gate mode
and draws every plot; :func:`write_report` writes ``report.json`` and ``report.md`` (tables of
all gate modes side by side, the baseline and the attack results).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from aig_jax import gate_stats, plots
from aig_jax.data import Source, eval_transform
from aig_jax.evaluation import Predictions


def _class_names(config: Any, num_classes: int) -> list[str]:
    names = config.dataset.get("class_names")
    return [str(n) for n in names] if names else [str(k) for k in range(num_classes)]


def _nan_to_none(values: np.ndarray) -> list[float | None]:
    return [None if math.isnan(v) else float(v) for v in np.asarray(values, np.float64)]


def analyse(
    report: Mapping[str, Any],
    preds: Predictions,
    mode: str,
    per_image_gmacs: Mapping[str, np.ndarray],
    source: Source,
    config: Any,
    output_dir: str,
    grid_size: int = 8,
) -> dict[str, Any]:
    """Inference-graph statistics of ``preds`` (gate mode ``mode``) and all plots as PNGs.

    ``report`` holds ``blocks``, ``modes`` and optionally ``baseline`` and ``attack`` (see
    :func:`aig_jax.evaluator.evaluate_checkpoint`); ``per_image_gmacs`` maps each mode to
    realised GMACs [N]. Images for the grid are read back from ``source`` by index. Returns
    the ``analysis`` section of the report (plot file names relative to ``output_dir``).
    """
    os.makedirs(output_dir, exist_ok=True)
    blocks = report["blocks"]
    names = [b["name"] for b in blocks]
    num_classes = report["model"]["num_classes"]
    classes = _class_names(config, num_classes)
    matrix = gate_stats.class_layer_rates(preds.gates, preds.labels, num_classes)
    order = gate_stats.cluster_order(matrix)
    most, least = gate_stats.top_classes_per_layer(matrix, k=min(3, num_classes))
    executed = gate_stats.executed_counts(preds.gates)
    difficulty = gate_stats.by_executed_count(preds.gates, preds.correct, preds.confidence)
    files = {
        "layer_rates": "layer_rates.png",
        "class_layer": f"class_layer_{mode}.png",
        "executed_histogram": "executed_histogram.png",
        "gmacs_histogram": "gmacs_histogram.png",
        "difficulty": f"difficulty_{mode}.png",
        "extreme_images": f"fewest_most_blocks_{mode}.png",
    }
    path = {k: os.path.join(output_dir, v) for k, v in files.items()}
    rates = {m: s["layer_rates"] for m, s in report["modes"].items()}
    if "baseline" in report:
        rates["baseline"] = report["baseline"]["layer_rates"]
    plots.layer_rates_bars(
        rates,
        path["layer_rates"],
        block_names=names,
        downsampling=[b["downsampling"] for b in blocks],
    )
    plots.class_layer_heatmap(
        matrix[order],
        path["class_layer"],
        class_names=[classes[k] for k in order],
        block_names=names,
        ungated=[not b["gated"] for b in blocks],
        title=f"execution rate per class and block ({mode} gates; classes clustered)",
    )
    plots.histograms(
        {mode: executed},
        path["executed_histogram"],
        bins=[n - 0.5 for n in range(len(blocks) + 2)],
        xlabel="executed blocks",
        title="blocks executed per image",
    )
    full = report["modes"][mode]["full_gmacs"]
    plots.histograms(
        dict(per_image_gmacs),
        path["gmacs_histogram"],
        bins=40,
        xlabel="realised GMACs per image",
        title="computation per image",
        reference=("every block", full),
    )
    plots.difficulty(
        executed, preds.confidence, preds.correct, difficulty["accuracy"], path["difficulty"]
    )
    rank = np.lexsort((-preds.confidence, executed))  # fewest blocks first, confident first
    k = min(grid_size, len(rank))
    picks = {"fewest blocks": rank[:k], "most blocks": rank[::-1][:k]}
    rows, captions = {}, {}
    for label, pick in picks.items():
        images, _ = source.read(preds.index[pick])
        rows[label] = eval_transform(images, config.dataset, normalised=False)
        captions[label] = [
            f"{executed[i]} blk, {classes[preds.labels[i]]}→{classes[preds.top[i, 0]]}"
            for i in pick
        ]
    plots.image_grid(rows, captions, path["extreme_images"], title=f"{mode} gates")
    if "attack" in report:
        curves = {}
        for who, result in report["attack"].items():
            if isinstance(result, dict):
                curves[who] = (result["epsilons"], result["accuracy"])
                curves[f"{who} + JPEG"] = (result["epsilons"], result["accuracy_jpeg"])
        files["attack"] = "accuracy_vs_epsilon.png"
        plots.accuracy_vs_epsilon(curves, os.path.join(output_dir, files["attack"]))
    return {
        "gate_mode": mode,
        "class_names": classes,
        "class_order": order.tolist(),
        "class_layer_rates": [_nan_to_none(row) for row in matrix],
        "most_used_by": most.tolist(),
        "least_used_by": least.tolist(),
        "executed_histogram": gate_stats.executed_histogram(preds.gates).tolist(),
        "by_executed_blocks": {
            "count": difficulty["count"].tolist(),
            "accuracy": _nan_to_none(difficulty["accuracy"]),
            "confidence": _nan_to_none(difficulty["confidence"]),
        },
        "fewest_blocks_examples": preds.index[picks["fewest blocks"]].tolist(),
        "most_blocks_examples": preds.index[picks["most blocks"]].tolist(),
        "plots": files,
    }


def _pm(summary: Mapping[str, Any], key: str, scale: float = 1.0, spec: str = ".2f") -> str:
    """``summary[key]`` (times ``scale``), with ``± std`` over seeds where there is one."""
    value = format(summary[key] * scale, spec)
    std = summary.get("seed_std", {}).get(key)
    return value if std is None else f"{value} ± {format(std * scale, spec)}"


def _modes_table(report: Mapping[str, Any]) -> list[str]:
    rows = dict(report["modes"])
    if "baseline" in report:
        rows["baseline (ungated)"] = report["baseline"]
    lines = [
        "| gates | top-1 error % | top-5 error % | GMACs / image | saving vs all blocks | "
        "blocks executed | measured images/s |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, s in rows.items():
        lines.append(
            f"| {name} | {_pm(s, 'top1_error')} | {_pm(s, 'top5_error')} | "
            f"{_pm(s, 'realised_gmacs', spec='.4g')} | {_pm(s, 'macs_saving', 100, '.1f')}% | "
            f"{_pm(s, 'mean_executed_blocks')} | {_pm(s, 'images_per_sec', spec='.0f')} |"
        )
    return lines


def markdown(report: Mapping[str, Any]) -> str:
    """The report as Markdown: tables of modes, blocks, classes, difficulty and attacks."""
    ds, model = report["dataset"], report["model"]
    ck = report["checkpoint"]
    out = [
        f"# Evaluation of {model['name']} (step {ck['step']})",
        "",
        f"Checkpoint `{ck['directory']}`; {ds['num_examples']} images of {ds['name']} "
        f"split `{ds['split']}` at {ds['image_size']}². Sampled gates: mean ± std over "
        "seeds. GMACs are realised multiply-accumulates (skipped branches not counted).",
        "",
        *_modes_table(report),
        "",
        "## Execution rate per block",
        "",
    ]
    modes = list(report["modes"])
    calib = report.get("calibration")
    head = "| block | downsampling | " + " | ".join(modes)
    head += " | calibration threshold |" if calib else " |"
    out += [head, "|---" * (len(modes) + 2 + bool(calib)) + "|"]
    for i, b in enumerate(report["blocks"]):
        cells = " | ".join(f"{report['modes'][m]['layer_rates'][i]:.3f}" for m in modes)
        row = f"| {b['name']}{'' if b['gated'] else ' (ungated)'} | "
        row += f"{'yes' if b['downsampling'] else ''} | {cells} |"
        if calib:
            row += f" {calib['thresholds'][i]:.4f} |"
        out.append(row)
    if calib:
        out += [
            "",
            f"Calibrated thresholds were fitted on {calib['num_examples']} images of split "
            f"`{calib['split']}`: mean rate there {np.mean(calib['sampled_rates']):.3f} sampled, "
            f"{np.mean(calib['calibrated_rates']):.3f} calibrated, "
            f"{np.mean(calib['argmax_rates']):.3f} argmax.",
        ]
    out += _analysis_sections(report)
    if "attack" in report:
        out += _attack_sections(report["attack"], [b["name"] for b in report["blocks"]])
    plots_ = report.get("analysis", {}).get("plots", {})
    if plots_:
        out += ["", "## Plots", ""] + [f"![{k}]({v})" for k, v in plots_.items()]
    return "\n".join(out) + "\n"


def _analysis_sections(report: Mapping[str, Any]) -> list[str]:
    a = report.get("analysis")
    if not a:
        return []
    classes = a["class_names"]
    out = [
        "",
        f"## Which classes use each block ({a['gate_mode']} gates)",
        "",
        "| block | most used by (rate) | least used by (rate) |",
        "|---|---|---|",
    ]
    rates = a["class_layer_rates"]

    def fmt(ks: list[int], i: int) -> str:
        return ", ".join(
            f"{classes[k]} ({rates[k][i]:.2f})" if rates[k][i] is not None else classes[k]
            for k in ks
        )

    for i, b in enumerate(report["blocks"]):
        out.append(
            f"| {b['name']} | {fmt(a['most_used_by'][i], i)} | {fmt(a['least_used_by'][i], i)} |"
        )
    order = ", ".join(classes[k] for k in a["class_order"])
    out += ["", f"Classes ordered by similarity of their gate patterns: {order}.", ""]
    out += [
        "## Executed blocks against difficulty",
        "",
        "| executed blocks | images | accuracy % | mean confidence |",
        "|---|---|---|---|",
    ]
    by = a["by_executed_blocks"]
    for n, count in enumerate(by["count"]):
        if count:
            out.append(
                f"| {n} | {count} | {100 * by['accuracy'][n]:.2f} | {by['confidence'][n]:.3f} |"
            )
    return out


def _attack_sections(attack: Mapping[str, Any], block_names: list[str]) -> list[str]:
    kind = "FGSM" if attack["steps"] == 1 else f"BIM/PGD, {attack['steps']} steps"
    who = [w for w in ("gated", "baseline") if w in attack]
    out = [
        "",
        f"## Adversarial robustness ({kind}; JPEG quality {attack['jpeg_quality']})",
        "",
        "| ε (pixels) | " + " | ".join(f"{w} | {w} + JPEG" for w in who) + " |",
        "|---" * (1 + 2 * len(who)) + "|",
    ]
    eps = attack[who[0]]["epsilons"]
    for j, e in enumerate(eps):
        cells = " | ".join(
            f"{attack[w]['accuracy'][j]:.2f} | {attack[w]['accuracy_jpeg'][j]:.2f}" for w in who
        )
        out.append(f"| {e:g} | {cells} |")
    g = attack["gated"]
    clean = np.asarray(g["layer_rates"][0])
    out += [
        "",
        f"Top-1 accuracy %. Execution rate per block under attack ({g['gate_mode']} gates; "
        "change against ε = 0 in brackets):",
        "",
        "| block | " + " | ".join(f"ε = {e:g}" for e in eps) + " |",
        "|---" * (1 + len(eps)) + "|",
    ]
    for i, name in enumerate(block_names):
        cells = " | ".join(
            f"{r[i]:.3f} ({r[i] - clean[i]:+.3f})" for r in np.asarray(g["layer_rates"])
        )
        out.append(f"| {name} | {cells} |")
    return out


def write_report(report: Mapping[str, Any], output_dir: str) -> tuple[str, str]:
    """Write ``report.json`` and ``report.md`` into ``output_dir``; returns their paths."""
    os.makedirs(output_dir, exist_ok=True)
    json_path = os.path.join(output_dir, "report.json")
    md_path = os.path.join(output_dir, "report.md")
    with open(json_path, "w") as f:
        json.dump(report, f, indent=1)
    with open(md_path, "w") as f:
        f.write(markdown(report))
    return json_path, md_path
