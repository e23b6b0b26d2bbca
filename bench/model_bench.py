"""Device measurements of gated and ungated ResNets: train and inference throughput, compile
time and memory, the skipping inference paths against the masked one, and cold vs warm
compiles through JAX's persistent compilation cache.

Gates are untrained here: execution rates come from "calibrated" thresholds (-1 executes a
block for every image, 2 skips it; per-block medians of p(execute) split a batch in halves).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from aig_jax.eval.step import make_eval_step
from aig_jax.inference.skipping import choose_path, make_fast_eval_step
from aig_jax.model.resnet import build_model
from aig_jax.sharding import batch_sharded, make_mesh, replicated, replicated_like, shard_batch
from aig_jax.train.state import create_train_state
from aig_jax.train.step import make_train_step
from bench.profiling import profile_compile, profile_step

#: (result key, gated) of each measured variant of a model: the gated model and the ungated
#: one of the same architecture.
VARIANTS = (("gated", True), ("ungated", False))
VARIANT_NAMES = tuple(v[0] for v in VARIANTS)

#: Calibrated thresholds on p(execute) that execute, and skip, a block for every image.
ALWAYS, NEVER = -1.0, 2.0


def _error_text(err: Exception) -> str:
    """A measurement's failure as a result to report: its type and message, at most 500
    characters."""
    return f"{type(err).__name__}: {err}"[:500]


def _timed(fn: Callable[[], Any], iters: int) -> float:
    """Seconds per call of ``fn`` after one warm-up call, waiting for the device each time."""
    jax.block_until_ready(fn())
    start = time.perf_counter()
    for _ in range(iters):
        out = fn()
    jax.block_until_ready(out)
    return (time.perf_counter() - start) / iters


def _peak_bytes() -> int | None:
    stats = jax.local_devices()[0].memory_stats()
    return None if not stats else int(stats.get("peak_bytes_in_use", 0))


def compile_timed(
    jitted: Any,
    *args: Any,
    profile: bool = False,
    compiler_options: dict[str, Any] | None = None,
) -> tuple[Any, dict[str, Any]]:
    """Lower and compile ``jitted`` for ``args`` (with XLA's ``compiler_options``, if any):
    the executable, trace/compile seconds and its memory (arguments + outputs + temporaries,
    in bytes); with ``profile`` also the compiler's costliest phases
    (:func:`profiling.profile_compile`)."""
    start = time.perf_counter()
    lowered = jitted.lower(*args)
    info: dict[str, Any] = {"trace_s": time.perf_counter() - start}
    if profile:
        compiled, phases = profile_compile(lowered, compiler_options=compiler_options)
        info.update(phases)
    else:
        start = time.perf_counter()
        compiled = lowered.compile(compiler_options=compiler_options)
        info["compile_s"] = time.perf_counter() - start
    mem = compiled.memory_analysis()
    if mem is not None:
        info["compiled_bytes"] = int(
            mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
        )
    return compiled, info


def _batch(size: int, batch: int, num_classes: int, mesh: jax.sharding.Mesh) -> dict[str, Any]:
    rng = np.random.default_rng(0)
    host = {
        "image": rng.normal(size=(batch, size, size, 3)).astype(np.float32),
        "label": (np.arange(batch) % num_classes).astype(np.int32),
        "mask": np.ones(batch, bool),
        "index": np.arange(batch, dtype=np.int32),
    }
    return shard_batch(host, mesh)


def bench_model(
    name: str,
    size: int,
    batch: int,
    dtype: str,
    iters: int,
    variants: tuple[str, ...] = VARIANT_NAMES,
    skipping: bool = True,
    profile: bool = False,
    progress: Callable[[dict[str, Any]], None] = lambda result: None,
) -> dict[str, Any]:
    """Train and inference images/s, compile time and memory of the ``variants`` (see
    :data:`VARIANTS`); the skipping paths of the gated model if ``skipping``; with ``profile``,
    where each train step's time and its compile time go (:mod:`profiling`). ``progress`` is
    called with the result so far after each variant's train and inference figures and once
    complete, so that a run stopped midway keeps what it measured."""
    mesh = make_mesh()
    result: dict[str, Any] = {"model": name, "image_size": size, "batch": batch, "dtype": dtype}
    data = _batch(size, batch, 10, mesh)
    for tag, gated in VARIANTS:
        if tag not in variants:
            continue
        model = build_model(name, num_classes=10, gated=gated, dtype=dtype)

        def say(text: str, tag: str = tag) -> None:
            print(f"{name} {tag}: {text}", file=sys.stderr, flush=True)

        def measured(figures: dict[str, Any], tag: str = tag) -> None:
            result[tag] = figures
            say(_summary(figures))
            progress(result)

        variables = _bench_variant(model, data, iters, mesh, profile, say, measured)
        if tag == "gated" and skipping:
            result["gated"]["skipping"] = bench_skipping(model, variables, data, iters, mesh)
    result["ratios"] = _ratios(result)
    progress(result)
    return result


def bench_train_step(model: Any) -> tuple[optax.GradientTransformation, Any]:
    """The optimizer and jitted train step every measurement uses: SGD with momentum, and a
    target rate of 0.5 on the gated blocks (λ = 1; ungated blocks are left out of the loss)."""
    tx = optax.sgd(0.01, momentum=0.9)
    targets = np.array([0.5 if info.gated else 1.0 for info in model.block_infos()])
    return tx, make_train_step(model, tx, targets, target_weight=1.0)


def _bench_variant(
    model: Any,
    data: dict[str, Any],
    iters: int,
    mesh: jax.sharding.Mesh,
    profile: bool,
    say: Callable[[str], None],
    measured: Callable[[dict[str, Any]], None],
) -> Any:
    """Measure one variant of :func:`bench_model` and return its variables after the timed
    train steps. ``say`` is told which step starts compiling (a large model's compile is
    long), and ``measured`` receives the figures after the train step's
    and again after the inference step's."""
    batch, size = data["image"].shape[:2]
    key = jax.random.key(0)
    n = len(model.block_infos())
    tx, train = bench_train_step(model)
    state = jax.jit(
        lambda: create_train_state(model, tx, (size, size, 3), 0), out_shardings=replicated(mesh)
    )()
    say("tracing and compiling the train step")
    train_c, train_info = compile_timed(train, state, data, key, profile=profile)
    holder = [state]

    def train_once() -> Any:
        holder[0], metrics = train_c(holder[0], data, key)
        return metrics

    train_s = _timed(train_once, iters)
    out: dict[str, Any] = {"train_images_per_s": batch / train_s, "train_compile": train_info}
    if profile:
        out["train_kernels"] = profile_step(train_once, train_c.as_text())
    measured(out)
    variables = holder[0].variables
    thresholds = jnp.full((n,), 0.5)
    evals = make_eval_step(model, mesh)
    say("tracing and compiling the inference step")
    eval_c, eval_info = compile_timed(evals, variables, data, key, "argmax", thresholds)
    eval_s = _timed(lambda: eval_c(variables, data, key, thresholds), iters)
    out.update(
        infer_images_per_s=batch / eval_s, infer_compile=eval_info, peak_device_bytes=_peak_bytes()
    )
    measured(out)
    return variables


def _summary(figures: dict[str, Any]) -> str:
    """One progress line of a variant's figures so far: images/s and compile seconds."""
    parts = [
        f"{step} {figures[f'{step}_images_per_s']:,.0f} img/s, compiled in "
        f"{figures[f'{step}_compile']['compile_s']:.1f} s"
        for step in ("train", "infer")
        if f"{step}_images_per_s" in figures
    ]
    return "; ".join(parts)


def _ratios(result: dict[str, Any]) -> dict[str, float]:
    """Gated over ungated train and inference images/s, when both variants were measured."""
    g, u = result.get("gated"), result.get("ungated")
    if not (g and u):
        return {}
    return {
        "train_gated_over_ungated": g["train_images_per_s"] / u["train_images_per_s"],
        "infer_gated_over_ungated": g["infer_images_per_s"] / u["infer_images_per_s"],
    }


def bench_skipping(
    model: Any, variables: Any, data: dict[str, Any], iters: int, mesh: jax.sharding.Mesh
) -> dict[str, Any]:
    """Masked vs skipping inference: batch 1 (lax.cond) at execution rates 0.5 and 1, and the
    whole batch at per-block median thresholds (about half of the images execute each block).
    Each eval program is compiled once and timed at every threshold setting."""
    n = len(model.block_infos())
    out: dict[str, Any] = {}
    mesh1 = make_mesh(1)
    one = _batch(data["image"].shape[1], 1, 10, mesh1)
    masked1 = _calibrated_eval(make_eval_step(model, mesh1), variables, one, n)
    cond1 = _calibrated_eval(make_fast_eval_step(model, mesh1, path="cond"), variables, one, n)
    for label, thresholds in (
        ("rate_0.5", jnp.asarray([ALWAYS, NEVER] * (n // 2) + [ALWAYS] * (n % 2))),
        ("rate_1.0", jnp.full((n,), ALWAYS)),
    ):
        times = {
            kind: _timed(lambda run=run, t=thresholds: run(t), 20 * iters)
            for kind, run in (("masked", masked1), ("cond", cond1))
        }
        out[f"batch1_{label}"] = {
            "rate": float(jnp.mean(masked1(thresholds)["gates"])),
            "masked_ms_per_image": 1e3 * times["masked"],
            "cond_ms_per_image": 1e3 * times["cond"],
            "speedup": times["masked"] / times["cond"],
        }
    batch = data["image"].shape[0]
    masked_step = make_eval_step(model, mesh)
    key = jax.random.key(0)
    probs = masked_step(variables, data, key, "open", jnp.zeros((n,)))["probs"]
    thresholds = jnp.median(probs, axis=1)
    path = choose_path(batch // mesh.devices.size, data["image"].shape[1])
    masked = _calibrated_eval(masked_step, variables, data, n)
    masked_s = _timed(lambda: masked(thresholds), iters)
    rate = float(jnp.mean(masked(thresholds)["gates"]))

    def against_masked(path: str) -> dict[str, Any]:
        fast = _calibrated_eval(make_fast_eval_step(model, mesh, path=path), variables, data, n)
        fast_s = _timed(lambda: fast(thresholds), iters)
        return {
            "path": path,
            "rate": rate,
            "masked_images_per_s": batch / masked_s,
            "fast_images_per_s": batch / fast_s,
            "speedup": masked_s / fast_s,
        }

    out["batch_median"] = against_masked(path)
    if jax.default_backend() != "cpu" and path != "pallas":
        # The row/channel-tiled Pallas kernel where "auto" does not use it yet: measured, and
        # a failure to compile is recorded rather than fatal.
        try:
            out["batch_median_pallas"] = against_masked("pallas")
        except Exception as err:  # any lowering or runtime error is a result to report
            out["batch_median_pallas"] = {"path": "pallas", "error": _error_text(err)}
    return out


def _calibrated_eval(
    step: Any, variables: Any, data: dict[str, Any], num_blocks: int
) -> Callable[[jax.Array], dict[str, jax.Array]]:
    """The eval ``step`` compiled once for calibrated gates on ``data``: a function of the
    thresholds [num_blocks] that returns the step's outputs."""
    key = jax.random.key(0)
    compiled, _ = compile_timed(step, variables, data, key, "calibrated", jnp.zeros((num_blocks,)))
    return lambda thresholds: compiled(variables, data, key, thresholds)


def abstract_train_step(
    model: Any, size: int, batch: int, mesh: jax.sharding.Mesh
) -> tuple[Any, tuple[Any, ...]]:
    """The train step of ``model`` (:func:`bench_train_step`) and abstract arguments for it on
    ``mesh``: shapes, dtypes and shardings of the state, a batch of ``batch`` images
    [size, size, 3] and the key. Compiling needs no arrays and no device."""
    tx, step = bench_train_step(model)
    abstract = jax.eval_shape(lambda: create_train_state(model, tx, (size, size, 3), 0))
    state = replicated_like(abstract, mesh)
    shapes = {
        "image": ((batch, size, size, 3), jnp.float32),
        "label": ((batch,), jnp.int32),
        "mask": ((batch,), jnp.bool_),
        "index": ((batch,), jnp.int32),
    }
    data = {
        k: jax.ShapeDtypeStruct(shape, dtype, sharding=batch_sharded(mesh))
        for k, (shape, dtype) in shapes.items()
    }
    key = jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=replicated(mesh))
    return step, (state, data, key)


def bench_compile_cache(name: str, size: int, batch: int, dtype: str) -> dict[str, Any]:
    """Cold and warm (persistent cache) compile seconds of the gated model's train step."""
    model = build_model(name, num_classes=10, dtype=dtype)
    step, args = abstract_train_step(model, size, batch, make_mesh())
    result = {"model": name}
    for kind in ("cold", "warm"):
        jax.clear_caches()  # in-memory caches only: "warm" reads the compiled step from disk
        result[f"{kind}_compile_s"] = compile_timed(step, *args)[1]["compile_s"]
    return result
