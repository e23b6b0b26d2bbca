"""Throughput, compile time and memory of gated vs ungated ResNets, and of real layer skipping.

Usage (from the repository root)::

    python bench/bench.py --small            # CPU-sized, about 20 minutes on 2 cores
    python bench/bench.py                    # AIG-ResNet-50 224² and AIG-ResNet-110 32², batch 256
    python bench/bench.py --dtype bfloat16 --cache-dir /tmp/jax-cache

One run measures, on whatever backend JAX finds: train-step and inference images/s of each
gated model (its blocks unrolled, and scanned with ``scan_blocks``) and of the ungated model of
the same architecture; trace and compile time; peak device memory (where the backend reports
it) and the compiled step's memory; the skipping inference path against the masked one (batch
1 with ``lax.cond`` at an execution rate of 0.5, and at batch scale); a cold and a warm compile
through JAX's persistent compilation cache; the training loop of ``train.py`` against the bare
train step; and the host input pipeline's images/s (``--sections`` picks some, ``--models``
some models). It prints a table and writes JSON to ``bench/results/<device>.json``. Gates are
untrained: the execution rates come from "calibrated" thresholds (-1 executes a block for every
image, 2 skips it; per-block medians of p(execute) split a batch in halves).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # configs/

from kernel_profile import profile_step

from aig_jax.data import make_source, train_iterator
from aig_jax.metrics_writer import read_metrics
from aig_jax.models import build_model
from aig_jax.sharding import make_mesh, replicated, shard_batch
from aig_jax.skip_inference import choose_path, make_fast_eval_step
from aig_jax.steps import make_eval_step, make_train_step
from aig_jax.train_state import create_train_state
from aig_jax.trainer import train_and_evaluate
from configs import default

#: (model, image size, batch) per size; "tiny" is for the test that the script runs.
SIZES: dict[str, dict[str, Any]] = {
    "full": {
        "models": [("resnet50", 224, 256), ("resnet110_cifar", 32, 256)],
        "pipeline": [
            ("cifar", "synthetic", 32, 256),
            ("imagenet", "synthetic", 224, 256),
            ("imagenet", "jpeg", 224, 256),
        ],
        "pipeline_steps": 20,
        "loop_steps": 50,
        "iters": 10,
    },
    "small": {
        "models": [("resnet50", 64, 8), ("resnet110_cifar", 32, 16)],
        "pipeline": [
            ("cifar", "synthetic", 32, 256),
            ("imagenet", "synthetic", 224, 64),
            ("imagenet", "jpeg", 224, 64),
        ],
        "pipeline_steps": 20,
        "loop_steps": 4,
        "iters": 3,
    },
    "tiny": {
        "models": [("resnet8_cifar", 16, 4)],
        "pipeline": [
            ("cifar", "synthetic", 32, 16),
            ("imagenet", "synthetic", 64, 8),
            ("imagenet", "jpeg", 64, 8),
        ],
        "pipeline_steps": 2,
        "loop_steps": 2,
        "iters": 1,
    },
}

#: What one run measures, in order; ``--sections`` picks some.
SECTIONS = ("compile_cache", "models", "loop", "pipeline")

#: (result key, gated, scan_blocks) of each measured variant of a model.
VARIANTS = (("gated", True, False), ("ungated", False, False), ("gated_scan", True, True))
VARIANT_NAMES = tuple(tag for tag, _, _ in VARIANTS)

#: Calibrated thresholds on p(execute) that execute, and skip, a block for every image.
ALWAYS, NEVER = -1.0, 2.0


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


def _compile(jitted: Any, *args: Any) -> tuple[Any, dict[str, Any]]:
    """Lower and compile ``jitted`` for ``args``: the executable, trace/compile seconds and its
    memory (arguments + outputs + temporaries, in bytes)."""
    start = time.perf_counter()
    lowered = jitted.lower(*args)
    traced = time.perf_counter()
    compiled = lowered.compile()
    done = time.perf_counter()
    info: dict[str, Any] = {"trace_s": traced - start, "compile_s": done - traced}
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
) -> dict[str, Any]:
    """Train and inference images/s, compile time and memory of the ``variants`` (gated,
    ungated, gated_scan); the skipping paths of the gated model if ``skipping``; with
    ``profile``, where each train step's time goes (:func:`kernel_profile.profile_step`)."""
    mesh = make_mesh()
    result: dict[str, Any] = {"model": name, "image_size": size, "batch": batch, "dtype": dtype}
    data = _batch(size, batch, 10, mesh)
    key = jax.random.key(0)
    for tag, gated, scan in VARIANTS:
        if tag not in variants:
            continue
        model = build_model(name, num_classes=10, gated=gated, dtype=dtype, scan_blocks=scan)
        n = len(model.block_infos())
        tx = optax.sgd(0.01, momentum=0.9)
        state = jax.jit(
            lambda model=model, tx=tx: create_train_state(model, tx, (size, size, 3), 0),
            out_shardings=replicated(mesh),
        )()
        targets = np.full(n, 0.5 if gated else 1.0)
        train = make_train_step(model, tx, targets, target_weight=1.0)
        train_c, train_info = _compile(train, state, data, key)
        holder = [state]

        def train_once(step: Any = train_c, holder: list = holder) -> Any:
            holder[0], metrics = step(holder[0], data, key)
            return metrics

        train_s = _timed(train_once, iters)
        kernels = profile_step(train_once, train_c.as_text()) if profile else None
        variables = holder[0].variables
        thresholds = jnp.full((n,), 0.5)
        evals = make_eval_step(model, mesh)
        eval_c, eval_info = _compile(evals, variables, data, key, "argmax", thresholds)
        eval_s = _timed(lambda c=eval_c, v=variables, t=thresholds: c(v, data, key, t), iters)
        result[tag] = {
            "train_images_per_s": batch / train_s,
            "infer_images_per_s": batch / eval_s,
            "train_compile": train_info,
            "infer_compile": eval_info,
            "peak_device_bytes": _peak_bytes(),
        }
        if kernels is not None:
            result[tag]["train_kernels"] = kernels
        if tag == "gated" and skipping:
            result["gated"]["skipping"] = bench_skipping(model, variables, data, iters, mesh)
    result["ratios"] = _ratios(result)
    return result


def _ratios(result: dict[str, Any]) -> dict[str, float]:
    """Gated over ungated and scanned over unrolled, for the variants measured."""
    ratios = {}
    g, u, s = (result.get(tag) for tag in ("gated", "ungated", "gated_scan"))
    if g and u:
        ratios["train_gated_over_ungated"] = g["train_images_per_s"] / u["train_images_per_s"]
        ratios["infer_gated_over_ungated"] = g["infer_images_per_s"] / u["infer_images_per_s"]
    if g and s:
        ratios["train_scan_over_unrolled"] = s["train_images_per_s"] / g["train_images_per_s"]
        ratios["compile_scan_over_unrolled"] = (
            s["train_compile"]["compile_s"] / g["train_compile"]["compile_s"]
        )
    return ratios


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
            out["batch_median_pallas"] = {
                "path": "pallas",
                "error": f"{type(err).__name__}: {err}"[:500],
            }
    return out


def _calibrated_eval(
    step: Any, variables: Any, data: dict[str, Any], num_blocks: int
) -> Callable[[jax.Array], dict[str, jax.Array]]:
    """The eval ``step`` compiled once for calibrated gates on ``data``: a function of the
    thresholds [num_blocks] that returns the step's outputs."""
    key = jax.random.key(0)
    compiled, _ = _compile(step, variables, data, key, "calibrated", jnp.zeros((num_blocks,)))
    return lambda thresholds: compiled(variables, data, key, thresholds)


def bench_compile_cache(name: str, size: int, batch: int, dtype: str) -> dict[str, Any]:
    """Cold and warm (persistent cache) compile seconds of the gated model's train step."""
    mesh = make_mesh()
    model = build_model(name, num_classes=10, dtype=dtype)
    tx = optax.sgd(0.01, momentum=0.9)
    abstract = jax.eval_shape(lambda: create_train_state(model, tx, (size, size, 3), 0))
    state = jax.tree.map(
        lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=replicated(mesh)), abstract
    )
    data = _batch(size, batch, 10, mesh)
    step = make_train_step(model, tx, np.full(len(model.block_infos()), 0.5), target_weight=1.0)
    result = {"model": name}
    for kind in ("cold", "warm"):
        jax.clear_caches()  # in-memory caches only: "warm" reads the compiled step from disk
        result[f"{kind}_compile_s"] = _compile(step, state, data, jax.random.key(0))[1]["compile_s"]
    return result


class JpegSource:
    """Photograph-like images of ImageNet's most common size (500×375) stored as JPEG bytes
    (quality 90) and decoded with Pillow at every read, as the TFDS source decodes ImageNet;
    ``distinct`` different images repeat over ``num_examples``."""

    def __init__(self, num_examples: int, distinct: int = 32) -> None:
        self.num_examples = num_examples
        rng = np.random.default_rng(0)
        yy, xx = np.mgrid[0:375, 0:500].astype(np.float32)
        self._jpegs = []
        for i in range(distinct):
            # Smooth shading plus sensor-like noise: the entropy of a photograph, roughly.
            f = rng.uniform(10, 60, size=(3, 2))
            smooth = [np.sin(xx / f[c, 0] + i) * np.cos(yy / f[c, 1] - c) for c in range(3)]
            pixels = 128 + 90 * np.stack(smooth, -1) + rng.normal(0, 12, (375, 500, 3))
            buffer = io.BytesIO()
            Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(buffer, "JPEG", quality=90)
            self._jpegs.append(buffer.getvalue())

    def __len__(self) -> int:
        return self.num_examples

    def read(self, indices: np.ndarray) -> tuple[list[np.ndarray], np.ndarray]:
        """Decoded uint8 [375, 500, 3] images (a list) and labels int32 [n]."""
        jpegs = [self._jpegs[int(i) % len(self._jpegs)] for i in indices]
        images = [np.asarray(Image.open(io.BytesIO(j)).convert("RGB")) for j in jpegs]
        return images, (np.asarray(indices) % 10).astype(np.int32)


def bench_pipeline(
    kind: str, source_kind: str, size: int, batch: int, steps: int
) -> dict[str, Any]:
    """Host images/s of ``train_iterator`` with ``kind`` ("cifar" or "imagenet") augmentation
    over ``source_kind`` images: "synthetic" (decoded pixels of the output size) or "jpeg"
    (:class:`JpegSource`, decoding included); uint8 batches as the trainer reads them
    (normalised on the device), and batches normalised on the host."""
    cfg = default.get_config().dataset
    cfg.source, cfg.image_size, cfg.num_examples, cfg.preprocess = "synthetic", size, 4096, kind
    if kind == "imagenet":
        cfg.mean, cfg.std = default.IMAGENET_MEAN, default.IMAGENET_STD
    source = JpegSource(4096) if source_kind == "jpeg" else make_source(cfg, "train")
    result: dict[str, Any] = {
        "preprocess": kind,
        "source": source_kind,
        "image_size": size,
        "batch": batch,
    }
    for label, normalised in (("images_per_s", False), ("host_normalised_images_per_s", True)):
        batches = train_iterator(
            source,
            cfg,
            global_batch=batch,
            seed=0,
            num_steps=steps + 1,
            num_threads=os.cpu_count() or 1,
            normalised=normalised,
        )
        next(batches)  # threads started, first batch ready
        start = time.perf_counter()
        for _ in batches:
            pass
        result[label] = batch * steps / (time.perf_counter() - start)
    return result


def bench_loop(name: str, size: int, batch: int, dtype: str, steps: int) -> dict[str, Any]:
    """The training loop of ``train.py`` (input pipeline, prefetching, logging) over synthetic
    data: images/s and input-wait share of its second logging interval of ``steps`` steps, the
    first one holding the compilation. Evaluation and checkpointing are left out by the loop's
    own timing."""
    config = default.get_config()
    config.model, config.dtype, config.batch_size = name, dtype, batch
    config.num_train_steps, config.log_every_steps = 2 * steps, steps
    config.eval_gate_modes, config.eval_limit, config.eval_batch_size = ("argmax",), batch, batch
    config.checkpoint_every_steps = 2 * steps
    config.data_threads = os.cpu_count() or 1
    config.progress, config.tensorboard = False, False
    ds = config.dataset
    ds.source, ds.image_size, ds.num_examples = "synthetic", size, 2 * steps * batch
    if size > 32:
        ds.preprocess, ds.mean, ds.std = "imagenet", default.IMAGENET_MEAN, default.IMAGENET_STD
    with tempfile.TemporaryDirectory(prefix="aig-jax-bench-loop-") as workdir:
        train_and_evaluate(config, workdir)
        last = read_metrics(workdir, "train")[-1]
    return {
        "model": name,
        "image_size": size,
        "batch": batch,
        "images_per_s": last["images_per_sec"],
        "input_wait_fraction": last["input_wait_fraction"],
    }


def _fmt(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


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
                    _fmt(m["train_images_per_s"]),
                    _fmt(m["infer_images_per_s"]),
                    _fmt(m["train_compile"]["compile_s"]),
                    _fmt(None if peak is None else peak / 2**20),
                )
            )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in rows]
    if len(rows) == 1:  # no model measured
        lines = []
    for r in results.get("models", []):
        ratios = r["ratios"]
        if "train_gated_over_ungated" in ratios:
            lines.append(
                f"{r['model']}: gated/ungated train {_fmt(ratios['train_gated_over_ungated'])}, "
                f"infer {_fmt(ratios['infer_gated_over_ungated'])}"
            )
        if "train_scan_over_unrolled" in ratios:
            lines.append(
                f"{r['model']}: scanned/unrolled blocks train "
                f"{_fmt(ratios['train_scan_over_unrolled'])}, compile time "
                f"{_fmt(ratios['compile_scan_over_unrolled'])}"
            )
        for tag in (t for t in VARIANT_NAMES if "train_kernels" in r.get(t, {})):
            k = r[tag]["train_kernels"]
            step_ms = 1e3 * r["batch"] / r[tag]["train_images_per_s"]
            lines.append(
                f"  {tag} train step {_fmt(step_ms)} ms: {_fmt(k['ops'])} kernels, "
                f"{_fmt(k['op_ms'])} ms of kernel time, of which gates {_fmt(k['gate_op_ms'])} ms"
            )
        for label, s in r.get("gated", {}).get("skipping", {}).items():
            if label.startswith("batch1"):
                lines.append(
                    f"  {label}: rate {_fmt(s['rate'])}, masked "
                    f"{_fmt(s['masked_ms_per_image'])} ms, cond {_fmt(s['cond_ms_per_image'])} "
                    f"ms per image, speed-up {_fmt(s['speedup'])}×"
                )
            elif "error" in s:
                lines.append(f"  {label} ({s['path']}): failed: {s['error']}")
            else:
                lines.append(
                    f"  {label} ({s['path']}): rate {_fmt(s['rate'])}, masked "
                    f"{_fmt(s['masked_images_per_s'])}, fast {_fmt(s['fast_images_per_s'])} img/s, "
                    f"speed-up {_fmt(s['speedup'])}×"
                )
    if "compile_cache" in results:
        c = results["compile_cache"]
        lines.append(
            f"{c['model']} train-step compile: cold {_fmt(c['cold_compile_s'])} s, "
            f"warm (persistent cache) {_fmt(c['warm_compile_s'])} s"
        )
    for r in results.get("loop", []):
        ratio = r.get("over_bare_step")
        lines.append(
            f"training loop {r['model']} {r['image_size']}² b{r['batch']}: "
            f"{_fmt(r['images_per_s'])} img/s"
            + ("" if ratio is None else f" ({_fmt(ratio)}× the bare step)")
            + f", waiting for input {_fmt(r['input_wait_fraction'])} of the time"
        )
    for p in results.get("pipeline", []):
        lines.append(
            f"input pipeline {p['preprocess']} ({p['source']}) {p['image_size']}² b{p['batch']}: "
            f"{_fmt(p['images_per_s'])} img/s uint8 (normalised on the host: "
            f"{_fmt(p['host_normalised_images_per_s'])})"
        )
    return "\n".join(lines)


def select_models(
    models: list[tuple[str, int, int]], names: list[str] | None
) -> list[tuple[str, int, int]]:
    """The ``(name, image size, batch)`` entries of ``models`` named in ``names`` (None: all),
    in the setting's order; a ``ValueError`` names any name the setting does not have."""
    if names is None:
        return models
    known = [m[0] for m in models]
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"--models {unknown} not among this setting's models {known}")
    return [m for m in models if m[0] in names]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run every measurement, print the table, write the JSON and return the results."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--small", action="store_const", dest="size", const="small")
    size.add_argument(
        "--tiny",
        action="store_const",
        dest="size",
        const="tiny",
        help="seconds-long run that only checks the script",
    )
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument(
        "--cache-dir",
        default=None,
        help="persistent compilation cache kept across runs (default: a fresh "
        "temporary one, used only for the cold/warm compile measurement)",
    )
    parser.add_argument(
        "--out", default=None, help="JSON path (default bench/results/<device>.json)"
    )
    parser.add_argument(
        "--no-compile-cache",
        action="store_true",
        help="skip the cold/warm persistent-cache compile measurement (two long compiles)",
    )
    parser.add_argument(
        "--sections",
        nargs="+",
        choices=SECTIONS,
        default=list(SECTIONS),
        help="measure only these sections (default: all)",
    )
    parser.add_argument(
        "--models",
        nargs="+",
        default=None,
        metavar="NAME",
        help="measure only these of the setting's models in the models and loop sections "
        "(full and small: resnet50 resnet110_cifar)",
    )
    parser.add_argument(
        "--variants",
        nargs="+",
        choices=VARIANT_NAMES,
        default=list(VARIANT_NAMES),
        help="model variants measured in the models section (default: all)",
    )
    parser.add_argument(
        "--no-skipping",
        action="store_true",
        help="leave out the skipping inference paths of the models section",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="trace a few train steps of each variant: kernels per step, their summed time "
        "and the gates' share",
    )
    args = parser.parse_args(argv)
    setting = SIZES[args.size or "full"]
    try:
        models = select_models(setting["models"], args.models)
    except ValueError as err:
        parser.error(str(err))
    cache_dir = args.cache_dir or tempfile.mkdtemp(prefix="aig-jax-cache-")
    jax.config.update("jax_compilation_cache_dir", cache_dir)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)

    device = jax.devices()[0]
    results: dict[str, Any] = {
        "backend": jax.default_backend(),
        "device": device.device_kind,
        "device_count": jax.device_count(),
        "jax_version": jax.__version__,
        "size": args.size or "full",
        "dtype": args.dtype,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
    }
    slug = re.sub(r"[^a-z0-9]+", "-", device.device_kind.lower()).strip("-")
    out = args.out or os.path.join(
        os.path.dirname(os.path.abspath(__file__)), "results", f"{slug}.json"
    )
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)

    def save() -> None:  # after every section, so an interrupted run keeps what it measured
        with open(out, "w") as f:
            json.dump(results, f, indent=2)

    name, img, batch = setting["models"][-1]  # the CIFAR model: AIG-ResNet-110 unless tiny
    if "compile_cache" in args.sections and not args.no_compile_cache:
        results["compile_cache"] = bench_compile_cache(name, img, batch, args.dtype)
        save()
    if args.cache_dir is None:  # the timings below are then cold compiles
        jax.config.update("jax_enable_compilation_cache", False)
        shutil.rmtree(cache_dir, ignore_errors=True)
    if "models" in args.sections:
        results["models"] = []
        for name, img, batch in models:
            results["models"].append(
                bench_model(
                    name,
                    img,
                    batch,
                    args.dtype,
                    setting["iters"],
                    tuple(args.variants),
                    skipping=not args.no_skipping,
                    profile=args.profile,
                )
            )
            save()
    if "loop" in args.sections:
        results["loop"] = []
        for name, img, batch in models:
            loop = bench_loop(name, img, batch, args.dtype, setting["loop_steps"])
            bare = {r["model"]: r for r in results.get("models", [])}.get(name)
            if bare is not None and "gated" in bare:  # the same model's bare train step
                loop["over_bare_step"] = loop["images_per_s"] / bare["gated"]["train_images_per_s"]
            results["loop"].append(loop)
            save()
    if "pipeline" in args.sections:
        steps = setting["pipeline_steps"]
        results["pipeline"] = []
        for p in setting["pipeline"]:
            results["pipeline"].append(bench_pipeline(*p, steps))
            save()
    save()  # also when no section ran, so that the file the last line names exists
    print(
        f"{results['device']} ({results['backend']} ×{results['device_count']}), "
        f"jax {results['jax_version']}, {args.dtype}"
    )
    print(table(results))
    print(f"wrote {out}")
    return results


if __name__ == "__main__":
    main()
