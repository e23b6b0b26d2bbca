"""The benchmark's results as a text table."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from bench.model_bench import VARIANT_NAMES


def fmt(value: Any) -> str:
    """A measured value for a table: three significant digits, ``n/a`` for None."""
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.3g}"
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
    """The results as aligned text rows: one per model and variant, then skipping, compile
    cache and input pipeline."""
    rows = [("model", "variant", "train img/s", "infer img/s", "compile s", "peak MiB")]
    for r in results.get("models", []):
        for tag in (t for t in VARIANT_NAMES if t in r):
            m = r[tag]
            peak = m["peak_device_bytes"]
            rows.append(
                (
                    f"{r['model']} {r['image_size']}² b{r['batch']}",
                    tag,
                    fmt(m["train_images_per_s"]),
                    fmt(m["infer_images_per_s"]),
                    fmt(m["train_compile"]["compile_s"]),
                    fmt(None if peak is None else peak / 2**20),
                )
            )
    lines = aligned(rows)
    for r in results.get("models", []):
        ratios = r["ratios"]
        if "train_gated_over_ungated" in ratios:
            lines.append(
                f"{r['model']}: gated/ungated train {fmt(ratios['train_gated_over_ungated'])}, "
                f"infer {fmt(ratios['infer_gated_over_ungated'])}"
            )
        for tag in (t for t in VARIANT_NAMES if "train_kernels" in r.get(t, {})):
            k = r[tag]["train_kernels"]
            step_ms = 1e3 * r["batch"] / r[tag]["train_images_per_s"]
            lines.append(
                f"  {tag} train step {fmt(step_ms)} ms: {fmt(k['ops'])} kernels, "
                f"{fmt(k['op_ms'])} ms of kernel time, of which gates {fmt(k['gate_op_ms'])} ms"
            )
            compile_info = r[tag]["train_compile"]
            lines.append(
                f"  {tag} train compile {fmt(compile_info['compile_s'])} s: "
                + phase_list(compile_info["phases"], compile_info["compile_s"])
            )
        for label, s in r.get("gated", {}).get("skipping", {}).items():
            if label.startswith("batch1"):
                lines.append(
                    f"  {label}: rate {fmt(s['rate'])}, masked "
                    f"{fmt(s['masked_ms_per_image'])} ms, cond {fmt(s['cond_ms_per_image'])} "
                    f"ms per image, speed-up {fmt(s['speedup'])}×"
                )
            elif "error" in s:
                lines.append(f"  {label} ({s['path']}): failed: {s['error']}")
            else:
                lines.append(
                    f"  {label} ({s['path']}): rate {fmt(s['rate'])}, masked "
                    f"{fmt(s['masked_images_per_s'])}, fast {fmt(s['fast_images_per_s'])} img/s, "
                    f"speed-up {fmt(s['speedup'])}×"
                )
    if "compile_cache" in results:
        c = results["compile_cache"]
        lines.append(
            f"{c['model']} train-step compile: cold {fmt(c['cold_compile_s'])} s, "
            f"warm (persistent cache) {fmt(c['warm_compile_s'])} s"
        )
    for r in results.get("loop", []):
        ratio = r.get("over_bare_step")
        lines.append(
            f"training loop {r['model']} {r['image_size']}² b{r['batch']}: "
            f"{fmt(r['images_per_s'])} img/s"
            + ("" if ratio is None else f" ({fmt(ratio)}× the bare step)")
            + f", waiting for input {fmt(r['input_wait_fraction'])} of the time"
        )
    for p in results.get("pipeline", []):
        lines.append(
            f"input pipeline {p['preprocess']} ({p['source']}) {p['image_size']}² b{p['batch']}: "
            f"{fmt(p['images_per_s'])} img/s uint8 (normalised on the host: "
            f"{fmt(p['host_normalised_images_per_s'])})"
        )
    return "\n".join(lines)
