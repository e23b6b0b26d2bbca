"""Exported models on the CPU, one image at a time: the batch-1 skipping program against the
batched (masked) one, and both against the in-package paths (``aig_jax.inference.skipping``).

    python -m bench.export_bench                      # AIG-ResNet-110 32² and AIG-ResNet-50 224²
    python -m bench.export_bench --dtype=bfloat16     # on an accelerator
    python -m bench.export_bench --tiny               # ResNet-8 16², 4 images (tests)

Per model (untrained, initialised as the configs do, every block gated): the artefact's size,
export, load and first-call (compile) seconds; at execution rates near 0.5 (thresholds fitted
so that each block executes half of the timed images) and 1, the median latency per image over
``--images`` random images of the exported batch-1 and batched programs and of the in-package
``lax.cond`` and masked eval steps (images normalised on the host as ``eval.py`` does), the four
alternating. Prints a table, writes ``bench/results/export-<device>.json``.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import tempfile
import time
import types
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from aig_jax.data.preprocess import normalise, normalise_pixels
from aig_jax.eval.calibration import ALWAYS, fit_thresholds
from aig_jax.export.artefact import export_model
from aig_jax.export.runtime import Exported
from aig_jax.inference.skipping import make_fast_eval_step
from aig_jax.model.resnet import build_model
from aig_jax.sharding import make_mesh, replicated, shard_batch
from bench.table import aligned, device_slug, fmt, results_path, write_json

MODELS = {"resnet110_cifar": (32, 10), "resnet50": (224, 1000), "resnet8_cifar": (16, 10)}
VARIANTS = ("exported_batch1", "exported_masked", "package_cond", "package_masked")
MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
REFITS = 5  # rounds of threshold fitting: every block within a few % of rate 0.5
PLATFORMS = ["cpu", "cuda", "tpu"]  # what each artefact is lowered for
GOALS = "rate 0.5 speed-up >= 1.5; exported/in-package <= 1.05; rate 1 batch-1/masked <= 1.03"


def _timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    start = time.perf_counter()
    out = jax.block_until_ready(fn())
    return out, time.perf_counter() - start


def calibrated_half(model: Any, variables: Any, images: np.ndarray) -> np.ndarray:
    """Thresholds [L] under which each block executes half of ``images`` [N, 1, S, S, 3]:
    fitted again under the decisions they make (a block's p(execute) depends on the blocks
    before it executing), from every block executing."""

    def gate_probs(x: np.ndarray, t: np.ndarray) -> jax.Array:
        x = normalise_pixels(x, MEAN, STD)
        return model.apply(variables, x, gate_mode="calibrated", thresholds=t).probs

    fn, thresholds = jax.jit(gate_probs), np.full(len(model.block_infos()), ALWAYS, np.float32)
    for _ in range(REFITS):
        probs = np.concatenate([fn(x, thresholds) for x in images], axis=1)  # [L, N]
        thresholds = fit_thresholds(probs.T, np.full(len(probs), 0.5))
    return thresholds


def bench_model(name: str, num_images: int, dtype: str, tmp: str) -> dict[str, Any]:
    """Sizes, load and compile seconds and per-image latencies of one model (see module)."""
    size, classes = MODELS[name]
    model = build_model(name, num_classes=classes, dtype=dtype)
    init = jax.jit(model.init)({"params": jax.random.key(0)}, jnp.zeros((1, size, size, 3)))
    variables = jax.device_get(init)
    rng = np.random.default_rng(0)  # noise with a random gain per image and channel, so
    gain = rng.uniform(0.1, 1, (num_images, 1, 1, 1, 3))  # that the gates see different means
    images = (rng.integers(0, 256, (num_images, 1, size, size, 3)) * gain).astype(np.uint8)
    half = calibrated_half(model, variables, images)
    path, settings = os.path.join(tmp, f"{name}.aig"), {"preprocess": "none", "mean": MEAN}
    _, export_s = _timed(
        lambda: export_model(
            path, model, variables, image_size=size, std=STD, **settings,
            gate_mode="calibrated", thresholds=half, platforms=PLATFORMS,
        )
    )  # fmt: skip
    start = time.perf_counter()
    loaded = Exported.load(path)
    load_s = time.perf_counter() - start + _timed(lambda: loaded.weights)[1]
    mesh = make_mesh(1)
    steps = {p: make_fast_eval_step(model, mesh, path=p) for p in ("cond", "masked")}
    on_device, key, zero = jax.device_put(variables, replicated(mesh)), jax.random.key(0), [0]
    extra = {"label": np.int32(zero), "mask": np.ones(1, bool), "index": np.int32(zero)}

    def package(path: str, x: np.ndarray, thresholds: jax.Array) -> Any:
        image = normalise(x, types.SimpleNamespace(mean=MEAN, std=STD))  # as eval.py does
        batch = shard_batch({"image": image, **extra}, mesh)
        return jax.device_get(steps[path](on_device, batch, key, "calibrated", thresholds))

    run = {"exported_batch1": functools.partial(loaded, program="batch1")}
    run["exported_masked"] = functools.partial(loaded, program="batched")
    run.update({f"package_{p}": functools.partial(package, p) for p in steps})
    thr = {"0.5": jax.device_put(half), "1.0": jax.device_put(np.full_like(half, ALWAYS))}
    first = {v: _timed(lambda v=v: run[v](images[0], thresholds=thr["0.5"]))[1] for v in run}
    result = {"model": name, "image_size": size, "images": num_images, "export_s": export_s}
    result.update(artefact_bytes=os.path.getsize(path), load_s=load_s, first_call_s=first)
    for rate, t in thr.items():
        ms: dict[str, list[float]] = {v: [] for v in VARIANTS}
        executed, agree = [], True
        for i, x in enumerate(images):
            outs = {}
            for v in VARIANTS[i % 4 :] + VARIANTS[: i % 4]:  # each variant in every position
                outs[v], seconds = _timed(lambda v=v, x=x, t=t: run[v](x, thresholds=t))
                ms[v].append(1e3 * seconds)
            decisions = outs["exported_batch1"].decisions
            executed.append(decisions.mean())
            agree &= bool(np.array_equal(decisions, outs["package_cond"]["gates"] > 0))
        median = {v: statistics.median(ms[v]) for v in VARIANTS}
        result[f"rate_{rate}"] = {
            "rate": float(np.mean(executed)),
            "median_ms": median,
            "decisions_agree": agree,
            "speedup_exported": median["exported_masked"] / median["exported_batch1"],
            "speedup_package": median["package_masked"] / median["package_cond"],
            "exported_over_package": median["exported_batch1"] / median["package_cond"],
        }
    return result


def table(results: dict[str, Any]) -> str:
    """Latencies and ratios per model and rate, then sizes, load and compile seconds."""
    rows = [("model", "rate", "exported b1 ms", "masked ms", "speed-up", "in-package cond ms")]
    rows[0] += ("masked ms", "speed-up", "exported/in-package")
    lines: list[str] = []
    for r in results["models"]:
        for key in ("rate_0.5", "rate_1.0"):
            m = r[key]
            ms = [m["median_ms"][v] for v in VARIANTS]
            speed = (m["speedup_exported"], m["speedup_package"], m["exported_over_package"])
            cells = (m["rate"], *ms[:2], speed[0], *ms[2:], *speed[1:])
            rows.append((f"{r['model']} {r['image_size']}²", *map(fmt, cells)))
        first = {k: fmt(s) for k, s in r["first_call_s"].items()}
        lines.append(
            f"{r['model']}: artefact {fmt(r['artefact_bytes'] / 1e6)} MB, export "
            f"{fmt(r['export_s'])} s, load {fmt(r['load_s'])} s, first call (compile) s: {first}"
        )
    return "\n".join([*aligned(rows), *lines, f"goals: {GOALS}"])


def main() -> None:
    """Measure the asked models, print the table and write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS)[:2], choices=list(MODELS))
    parser.add_argument("--images", type=int, default=100, help="timed images per rate")
    parser.add_argument("--dtype", default="float32", help="compute dtype of the models")
    parser.add_argument("--tiny", action="store_true", help="ResNet-8 16², 4 images")
    parser.add_argument("--out", help="JSON path (default bench/results/export-<device>.json)")
    args = parser.parse_args()
    if args.tiny:
        args.models, args.images = ["resnet8_cifar"], 4
    with tempfile.TemporaryDirectory() as tmp:
        models = [bench_model(m, args.images, args.dtype, tmp) for m in args.models]
    device = jax.devices()[0].device_kind
    results = dict(device=device, jax=jax.__version__, platforms=PLATFORMS, dtype=args.dtype)
    results["models"] = models
    out = args.out or results_path(f"export-{device_slug()}.json")
    write_json(out, results)
    print(table(results))
    print(f"device: {device}; results: {out}")


if __name__ == "__main__":
    main()
