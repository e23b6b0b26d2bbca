"""The benchmarks' results as text tables, and where their JSON goes."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from typing import Any

import jax

from bench.model_bench import VARIANTS

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def device_slug() -> str:
    """The first device's kind as a file name: ``nvidia-h100-80gb-hbm3``, ``cpu``."""
    return re.sub(r"[^a-z0-9]+", "-", jax.devices()[0].device_kind.lower()).strip("-")


def results_path(name: str) -> str:
    """``bench/results/<name>``, the default place of a benchmark's JSON."""
    return os.path.join(RESULTS, name)


def write_json(path: str, results: dict[str, Any]) -> None:
    """Write ``results`` to ``path`` as indented JSON, creating its folder."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump(results, f, indent=1)


def fmt(value: Any) -> str:
    """A measured value for a table: three significant digits, ``n/a`` for None."""
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:,.0f}" if abs(value) >= 999.5 else f"{value:.3g}"
    return str(value)


def phase_list(phases: list[list[Any]], compile_s: float, shown: int = 6) -> str:
    """The ``shown`` costliest compiler phases as ``name s (×count)``, leaving out those that
    last 90% of the compile or more (they wrap the whole of it)."""
    inner = [p for p in phases if p[1] < 0.9 * compile_s][:shown]
    return ", ".join(f"{name} {fmt(s)} s (×{count})" for name, s, count in inner)


def aligned(rows: Sequence[Sequence[str]]) -> list[str]:
    """``rows`` of cells as lines whose columns line up (the first row is the header); no
    lines when only the header is there."""
    if len(rows) == 1:
        return []
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in rows]


def table(results: dict[str, Any]) -> str:
    """``bench.speed``'s results as text: one row per model and variant (with the reference's
    PyTorch model where measured), then ratios, profiles, skipping and loop."""
    head = ("model", "variant", "train img/s", "infer img/s", "compile s", "peak MiB")
    rows: list[Sequence[str]] = [(*head, "reference train", "infer")]
    lines = []
    for r in results.get("models", []):
        ref = r.get("reference", {})
        for tag in (t for t in VARIANTS if "infer_images_per_s" in r.get(t, {})):
            m, peak, theirs = r[tag], r[tag]["peak_device_bytes"], ref.get(tag, {})
            rows.append((
                f"{r['model']} {r['image_size']}² b{r['batch']}", tag,
                *(fmt(m[f"{s}_images_per_s"]) for s in ("train", "infer")),
                fmt(m["train_compile"]["compile_s"]), fmt(None if peak is None else peak / 2**20),
                *(fmt(theirs.get(f"{s}_images_per_s")) for s in ("train", "infer")),
            ))  # fmt: skip
        if r.get("ratios"):
            lines.append(
                f"{r['model']}: " + ", ".join(f"{k} {fmt(v)}" for k, v in r["ratios"].items())
            )
        for tag in (t for t in VARIANTS if "train_kernels" in r.get(t, {})):
            k, step_ms = r[tag]["train_kernels"], 1e3 * r["batch"] / r[tag]["train_images_per_s"]
            info = r[tag]["train_compile"]
            lines.append(
                f"  {tag} train step {fmt(step_ms)} ms: {fmt(k['ops'])} kernels, "
                f"{fmt(k['op_ms'])} ms of kernel time, of which gates {fmt(k['gate_op_ms'])} ms"
            )
            lines.append(
                f"  {tag} train compile {fmt(info['compile_s'])} s: "
                + phase_list(info["phases"], info["compile_s"])
            )
    for r in results.get("skipping", []):
        for label, s in ((k, v) for k, v in r.items() if isinstance(v, dict)):
            paths = [
                f"{p} failed ({v['error'][:60]})" if "error" in v
                else f"{p} {fmt(v['images_per_s'])} ({fmt(v['speedup'])}×)"
                for p, v in s.items() if isinstance(v, dict)
            ]  # fmt: skip
            lines.append(
                f"skipping {r['model']} {label}: rate {fmt(s['rate'])}, img/s masked "
                f"{fmt(s['masked_images_per_s'])}, " + ", ".join(paths)
            )
    for r in results.get("loop", []):
        lines.append(
            f"training loop {r['model']} {r['image_size']}² b{r['batch']}: "
            f"{fmt(r['images_per_s'])} img/s, {fmt(r['over_bare_step'])}× the bare step's "
            f"{fmt(r['bare_images_per_s'])}; per step {fmt(r['input_wait_ms'])} ms waiting for "
            f"input, {fmt(r['host_ms'])} ms more on the host"
        )
    return "\n".join(aligned(rows) + lines)
