"""Device measurements of a model: train and inference images/s, compile time and memory of its
gated and ungated variants, the skipping inference paths against the masked one, ``train.py``'s
loop against its bare step, and the reference's PyTorch model.

Every train step is the one ``train.py`` builds from its config (:func:`train_step_for`):
uint8 images normalised on the device, SGD with momentum and weight decay. Gates are untrained:
execution rates come from "calibrated" thresholds (-1 executes a block for every image, 2 skips
it; per-block medians of p(execute) split a batch in halves).
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from aig_jax.eval.step import make_eval_step
from aig_jax.inference.skipping import make_fast_eval_step
from aig_jax.model.spec import ModelSpec
from aig_jax.model.variables import init_variables
from aig_jax.sharding import batch_sharded, make_mesh, replicated, replicated_like, shard_batch
from aig_jax.train.loop import train_and_evaluate
from aig_jax.train.metrics import read_metrics
from aig_jax.train.optim import learning_rate_schedule, make_optimizer
from aig_jax.train.state import create_train_state
from aig_jax.train.step import make_train_step
from bench.profiling import profile_compile, profile_step
from configs import default

#: The measured variants of a model: every block gated, or none (a plain ResNet).
VARIANTS = ("gated", "ungated")
#: Calibrated thresholds on p(execute) that execute, and skip, a block for every image.
ALWAYS, NEVER = -1.0, 2.0


def model_config(name: str, dtype: str, variant: str = "gated", base: Any = None) -> Any:
    """``train.py``'s config (``base``, default the CIFAR-10 recipe) for model ``name`` in
    ``dtype``, every block gated or, for ``"ungated"``, none (``configs/cifar10_resnet110.py``)."""
    c = (base or default.get_config()).copy_and_resolve_references()
    c.model, c.dtype = name, dtype
    if variant == "ungated":
        c.target_schedule, c.gate_rate_one_blocks = "ungated", "drop"
    return c


def train_step_for(
    config: Any, steps_per_epoch: int = 1, fusion_barriers: bool | None = None
) -> tuple[Any, Any, Any]:
    """The model, optimizer and jitted train step that ``train.py`` builds from ``config``
    (``fusion_barriers``: :func:`~aig_jax.train.step.make_train_step`'s, default as there)."""
    spec = ModelSpec.from_config(config)
    model = spec.build()
    schedule = learning_rate_schedule(config, steps_per_epoch)
    tx = make_optimizer(config, schedule)
    step = make_train_step(
        model, tx, spec.targets, target_weight=config.target_weight,
        normalize=config.target_loss_normalize, learning_rate=schedule,
        pixel_stats=(config.dataset.mean, config.dataset.std), on_nonfinite=config.on_nonfinite,
        fusion_barriers=fusion_barriers,
    )  # fmt: skip
    return model, tx, step


def error_text(err: BaseException) -> str:
    """A measurement's failure as a result to report: its type and message, ≤ 500 characters."""
    return f"{type(err).__name__}: {err}"[:500]


def _timed(
    fn: Callable[[], Any], iters: int, wait: Callable[[Any], Any] = jax.block_until_ready
) -> float:
    """Seconds per call of ``fn`` after two warm-up calls, ``wait`` (for the device to finish
    a call's result) after the warm-up and after the last call."""
    for _ in range(2):
        out = fn()
    wait(out)
    start = time.perf_counter()
    for _ in range(iters):
        out = fn()
    wait(out)
    return (time.perf_counter() - start) / iters


def compile_timed(
    jitted: Any, *args: Any, profile: bool = False, compiler_options: dict | None = None
) -> tuple[Any, dict[str, Any]]:
    """Lower and compile ``jitted`` for ``args`` (with XLA's ``compiler_options``): the
    executable, trace and compile seconds and its memory (arguments + outputs + temporaries,
    bytes); with ``profile`` the compiler's costliest phases (:func:`profiling.profile_compile`)."""
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


def _batch(size: int, batch: int, mesh: jax.sharding.Mesh, pixels: bool) -> dict[str, Any]:
    """A random batch on ``mesh``: uint8 ``pixels`` (as the train step reads them) or normalised
    float32 images (as the eval step does), labels, mask and index."""
    rng = np.random.default_rng(0)
    shape = (batch, size, size, 3)
    image = rng.integers(0, 256, shape, np.uint8) if pixels else rng.normal(size=shape)
    host = {
        "image": image if pixels else image.astype(np.float32),
        "label": (np.arange(batch) % 10).astype(np.int32),
        "mask": np.ones(batch, bool),
        "index": np.arange(batch, dtype=np.int32),
    }
    return shard_batch(host, mesh)


class TrainRunner:
    """``train.py``'s train step for ``config`` (:func:`train_step_for`), compiled for a random
    batch of uint8 images on ``mesh``; each call takes one step, carrying the state, and
    returns its metrics. ``compile_info``: :func:`compile_timed`'s figures."""

    def __init__(
        self,
        config: Any,
        size: int,
        batch: int,
        mesh: Any,
        spe: int = 1,
        profile: bool = False,
        fusion_barriers: bool | None = None,
    ) -> None:
        self.model, tx, step = train_step_for(config, spe, fusion_barriers)
        self.state = jax.jit(
            lambda: create_train_state(self.model, tx, (size, size, 3), 0),
            out_shardings=replicated(mesh),
        )()
        self.data, self.key = _batch(size, batch, mesh, pixels=True), jax.random.key(0)
        self.compiled, self.compile_info = compile_timed(
            step, self.state, self.data, self.key, profile=profile
        )

    def __call__(self) -> Any:
        self.state, metrics = self.compiled(self.state, self.data, self.key)
        return metrics


def bench_model(
    name: str,
    size: int,
    batch: int,
    dtype: str,
    iters: int,
    variants: tuple[str, ...] = VARIANTS,
    profile: bool = False,
    progress: Callable[[dict[str, Any]], None] = lambda result: None,
) -> dict[str, Any]:
    """Train and inference images/s, compile time and memory of the ``variants``; with
    ``profile`` where each train step's and its compile's time goes (:mod:`profiling`).
    ``progress`` gets the result so far after each figure, so a stopped run keeps them."""
    mesh = make_mesh()
    result: dict[str, Any] = {"model": name, "image_size": size, "batch": batch, "dtype": dtype}
    for tag in variants:
        result[tag] = {}

        def say(what: str, tag: str = tag) -> None:
            print(f"{name} {tag}: {what}", file=sys.stderr, flush=True)
            progress(result)

        config = model_config(name, dtype, tag)
        _bench_variant(config, size, batch, iters, mesh, profile, result[tag], say)
    result["ratios"] = _ratios(result)
    progress(result)
    return result


def _bench_variant(
    config: Any,
    size: int,
    batch: int,
    iters: int,
    mesh: Any,
    profile: bool,
    figures: dict[str, Any],
    say: Callable[[str], None],
) -> None:
    """:func:`bench_model`'s figures of one variant, into ``figures``; ``say`` reports
    progress."""
    say("compiling the train step")
    train = TrainRunner(config, size, batch, mesh, profile=profile)
    figures["train_compile"] = train.compile_info
    figures["train_images_per_s"] = batch / _timed(train, iters)
    if profile:
        figures["train_kernels"] = profile_step(train, train.compiled.as_text())
    say(f"train {figures['train_images_per_s']:,.0f} img/s; compiling the inference step")
    variables, n = train.state.variables, train.model.num_blocks
    data, key, thresholds = _batch(size, batch, mesh, pixels=False), train.key, jnp.full((n,), 0.5)
    evals, figures["infer_compile"] = compile_timed(
        make_eval_step(train.model, mesh), variables, data, key, "argmax", thresholds
    )
    seconds = _timed(lambda: evals(variables, data, key, thresholds), iters)
    figures.update(infer_images_per_s=batch / seconds, peak_device_bytes=_peak_bytes())
    say(f"inference {figures['infer_images_per_s']:,.0f} img/s")


def _peak_bytes() -> int | None:
    stats = jax.local_devices()[0].memory_stats()
    return None if not stats else int(stats.get("peak_bytes_in_use", 0))


def _ratios(result: dict[str, Any]) -> dict[str, float]:
    """Gated over ungated train and inference images/s, when both variants were measured."""
    g, u = result.get("gated", {}), result.get("ungated", {})
    return {
        f"{s}_gated_over_ungated": g[f"{s}_images_per_s"] / u[f"{s}_images_per_s"]
        for s in ("train", "infer")
        if f"{s}_images_per_s" in g and f"{s}_images_per_s" in u
    }


def bench_skipping(name: str, size: int, batch: int, dtype: str, iters: int) -> dict[str, Any]:
    """The skipping paths against the masked model, in images/s, at batch 1 (execution rates
    0.5 and 1) and at ``batch`` (per-block median thresholds: about half of the images execute
    each block): ``lax.cond`` everywhere, the Pallas kernel too on accelerators (a failure to
    compile is a result). Each program compiles once and runs at every threshold setting."""
    model = ModelSpec.from_config(model_config(name, dtype)).build()
    n = model.num_blocks
    paths = ("cond",) if jax.default_backend() == "cpu" else ("cond", "pallas")
    variables, out = init_variables(model, (size, size, 3), 0), {}
    for b in (1, batch):
        mesh = make_mesh(1) if b == 1 else make_mesh()
        data = _batch(size, b, mesh, pixels=False)
        masked = _calibrated(make_eval_step(model, mesh), variables, data, mesh, n)
        if b == 1:
            alternate = [ALWAYS, NEVER] * (n // 2) + [ALWAYS] * (n % 2)
            settings = {"rate_0.5": jnp.asarray(alternate), "rate_1.0": jnp.full((n,), ALWAYS)}
        else:
            probs = masked(jnp.zeros((n,)))["probs"]  # calibrated at 0: every block executes
            settings = {"median": jnp.median(probs, axis=1)}
        fast: dict[str, Any] = {}
        for path in paths:
            try:
                step = make_fast_eval_step(model, mesh, path=path)
                fast[path] = _calibrated(step, variables, data, mesh, n)
            except Exception as err:  # any lowering error is a result to report
                fast[path] = error_text(err)
        reps = iters * (20 if b == 1 else 1)
        for label, t in settings.items():
            masked_s = _timed(lambda t=t, masked=masked: masked(t), reps)
            row: dict[str, Any] = {
                "rate": float(jnp.mean(masked(t)["gates"])),
                "masked_images_per_s": b / masked_s,
            }
            for path, run in fast.items():
                if isinstance(run, str):
                    row[path] = {"error": run}
                    continue
                seconds = _timed(lambda run=run, t=t: run(t), reps)
                row[path] = {"images_per_s": b / seconds, "speedup": masked_s / seconds}
            out[f"batch{b}_{label}"] = row
    return {"model": name, "image_size": size, "batch": batch, **out}


def _calibrated(
    step: Any, variables: Any, data: dict[str, Any], mesh: jax.sharding.Mesh, n: int
) -> Callable[[jax.Array], dict[str, jax.Array]]:
    """The eval ``step`` compiled once for calibrated gates on ``data``: a function of the
    thresholds [n] that returns the step's outputs."""
    key, variables = jax.random.key(0), jax.device_put(variables, replicated(mesh))
    compiled, _ = compile_timed(step, variables, data, key, "calibrated", jnp.zeros((n,)))
    return lambda thresholds: compiled(variables, data, key, thresholds)


def abstract_train_step(
    config: Any, size: int, batch: int, mesh: jax.sharding.Mesh
) -> tuple[Any, tuple[Any, ...]]:
    """The train step of ``config`` (:func:`train_step_for`) and abstract arguments for it on
    ``mesh``: the state, ``batch`` uint8 images [size, size, 3] with their labels, and the key.
    Compiling needs no arrays and no device."""
    model, tx, step = train_step_for(config)
    abstract = jax.eval_shape(lambda: create_train_state(model, tx, (size, size, 3), 0))
    shapes = {"image": ((batch, size, size, 3), jnp.uint8), "label": ((batch,), jnp.int32)}
    data = {
        k: jax.ShapeDtypeStruct(shape, dtype, sharding=batch_sharded(mesh))
        for k, (shape, dtype) in shapes.items()
    }
    key = jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=replicated(mesh))
    return step, (replicated_like(abstract, mesh), data, key)


def loop_config(name: str, size: int, batch: int, dtype: str, base: Any = None) -> Any:
    """``model_config`` on synthetic images of ``size`` (ImageNet preprocessing above 32²)."""
    config = model_config(name, dtype, base=base)
    config.batch_size, config.eval_batch_size = batch, batch
    ds = config.dataset
    ds.source, ds.image_size, ds.num_examples = "synthetic", size, ds.num_examples or 4 * batch
    if size > 32:
        ds.preprocess, ds.mean, ds.std = "imagenet", default.IMAGENET_MEAN, default.IMAGENET_STD
    return config


def bench_loop(config: Any, steps: int, iters: int) -> dict[str, Any]:
    """``train.py``'s loop (input pipeline, prefetching, logging) on ``config``'s data for two
    logging intervals of ``steps`` steps (the first holds the compile), against its bare train
    step: images/s of both and, per step of the second interval, the milliseconds spent waiting
    for input and on the host beyond the bare step and the wait. Evaluation (of one batch) and
    checkpointing are outside the loop's own timing."""
    config = config.copy_and_resolve_references()
    config.num_train_steps, config.log_every_steps = 2 * steps, steps
    config.checkpoint_every_steps, config.eval_limit = 2 * steps, config.eval_batch_size
    config.evals.sample.during_training = False  # one argmax evaluation
    config.data_threads = os.cpu_count() or 1
    config.progress, config.tensorboard = False, False
    with tempfile.TemporaryDirectory(prefix="aig-jax-bench-loop-") as workdir:
        train_and_evaluate(config, workdir)
        last = read_metrics(workdir, "train")[-1]
    batch, size = config.batch_size, config.dataset.image_size
    spe = max(1, config.dataset.num_examples // batch)
    bare = TrainRunner(config, size, batch, make_mesh(), spe)  # the loop's own program
    loop_ms, bare_ms = 1e3 * batch / last["images_per_sec"], 1e3 * _timed(bare, iters)
    wait_ms = last["input_wait_fraction"] * loop_ms
    return {
        "model": config.model, "image_size": size, "batch": batch,
        "images_per_s": last["images_per_sec"], "bare_images_per_s": 1e3 * batch / bare_ms,
        "over_bare_step": bare_ms / loop_ms, "input_wait_ms": wait_ms,
        "host_ms": loop_ms - bare_ms - wait_ms, "input_wait_fraction": last["input_wait_fraction"],
    }  # fmt: skip


def bench_reference(
    name: str, size: int, batch: int, dtype: str, iters: int, variants: tuple[str, ...] = VARIANTS
) -> dict[str, Any]:
    """Train and inference images/s of the reference's PyTorch model of ``name``
    (:mod:`tests.torch_reference`: its train step and SGD; ungated: the torchvision-named
    ResNet), channels-last, in bfloat16 autocast for ``dtype`` bfloat16; on CUDA if PyTorch has
    it, else on the CPU."""
    import torch

    from aig_jax.model.blocks import Bottleneck
    from tests import torch_reference as ref

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    like = ModelSpec.from_config(model_config(name, dtype)).build()
    n, script = like.num_blocks, "imagenet" if like.stem == "imagenet" else "cifar"
    x = torch.randn(batch, 3, size, size, device=dev).to(memory_format=torch.channels_last)
    y, noise = torch.arange(batch, device=dev) % 10, ref.torch_gumbel_noise((n, batch, 2)).to(dev)
    result: dict[str, Any] = {"device": dev, "torch": torch.__version__}

    def sync(_: Any) -> None:
        if dev == "cuda":
            torch.cuda.synchronize()

    for tag in variants:
        net = ref.TorchResNet(
            like.block_cls is Bottleneck, like.stage_sizes, like.widths, like.stem, 10,
            naming="reference" if tag == "gated" else "torchvision",
        ).to(dev, memory_format=torch.channels_last)  # fmt: skip
        opt = ref.make_optimizer(net, script=script)
        cast = torch.autocast(dev, dtype=torch.bfloat16, enabled=dtype == "bfloat16")

        def train(net: Any = net, opt: Any = opt, cast: Any = cast) -> Any:
            with cast:
                ref.train_step(net, opt, x, y, [0.5] * n, noise, lossfact=1.0, script=script)

        def infer(net: Any = net, cast: Any = cast) -> Any:
            net.eval()
            with torch.no_grad(), cast:
                net(x, "argmax")

        result[tag] = {
            f"{s}_images_per_s": batch / _timed(fn, iters, sync)
            for s, fn in (("train", train), ("infer", infer))
        }
    return result
