"""The evaluation report: a JSON record, a Markdown page and the plots that compare modes.

A report is a dict that ``eval.py`` fills from its evaluators (see
:mod:`aig_jax.eval.suite`): :func:`header` describes the checkpoint, model, data and blocks;
``modes`` holds a :class:`~aig_jax.eval.evaluators.Classification` summary per classification
evaluator, by name; optional ``calibration``, ``baseline``, ``attack`` and ``analysis`` (a
:class:`~aig_jax.eval.evaluators.GateStatistics` result). :func:`write_report` writes
``report.json``, ``report.md`` and the plots across modes.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from aig_jax.eval import plots
from aig_jax.eval.evaluators import EvalContext


def header(ctx: EvalContext, directory: str, step: int, num_examples: int) -> dict[str, Any]:
    """The report's description of the checkpoint (``directory``, ``step``), the model, the
    evaluated data (``num_examples`` images) and each block."""
    ds = ctx.dataset
    return {
        "checkpoint": {"directory": directory, "step": step},
        "model": ctx.spec.to_json(),
        "dataset": {
            "source": ds.source,
            "name": ds.get("name"),
            "split": ds.eval_split,
            "num_examples": num_examples,
            "image_size": ds.image_size,
        },
        "blocks": [
            {
                "name": b.name,
                "gated": b.gated,
                "downsampling": b.downsampling,
                "branch_gmacs": b.branch_macs / 1e9,
            }
            for b in ctx.cost.blocks
        ],
    }


def _plot_comparisons(report: Mapping[str, Any], output_dir: str) -> dict[str, str]:
    """Per-block execution rates of every mode (and the baseline), and accuracy against ε
    when there was an attack; returns the plot files by name."""
    files = {"layer_rates": "layer_rates.png"}
    rates = {m: s["layer_rates"] for m, s in report["modes"].items()}
    if "baseline" in report:
        rates["baseline"] = report["baseline"]["layer_rates"]
    blocks = report["blocks"]
    plots.layer_rates_bars(
        rates,
        os.path.join(output_dir, files["layer_rates"]),
        block_names=[b["name"] for b in blocks],
        downsampling=[b["downsampling"] for b in blocks],
    )
    if "attack" in report:
        curves = {}
        for who, result in report["attack"].items():
            curves[who] = (result["epsilons"], result["accuracy"])
            curves[f"{who} + JPEG"] = (result["epsilons"], result["accuracy_jpeg"])
        files["attack"] = "accuracy_vs_epsilon.png"
        plots.accuracy_vs_epsilon(curves, os.path.join(output_dir, files["attack"]))
    return files


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
    plots_ = {**report.get("plots", {}), **report.get("analysis", {}).get("plots", {})}
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
    g = attack["gated"]
    kind = "FGSM" if g["steps"] == 1 else f"BIM/PGD, {g['steps']} steps"
    who = [w for w in ("gated", "baseline") if w in attack]
    out = [
        "",
        f"## Adversarial robustness ({kind}; JPEG quality {g['jpeg_quality']})",
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


def write_report(report: dict[str, Any], output_dir: str) -> tuple[str, str]:
    """Draw the plots across modes into ``output_dir`` (their names go to ``report["plots"]``),
    then write ``report.json`` and ``report.md`` there; returns the two paths."""
    os.makedirs(output_dir, exist_ok=True)
    report["plots"] = _plot_comparisons(report, output_dir)
    json_path = os.path.join(output_dir, "report.json")
    md_path = os.path.join(output_dir, "report.md")
    with open(json_path, "w") as f:
        json.dump(report, f, indent=1)
    with open(md_path, "w") as f:
        f.write(markdown(report))
    return json_path, md_path
