"""Train-step cost against depth on the CPU: our step beside the reference's PyTorch step.

    python -m bench.depth_scaling [--depths 20 56 110] [--batch 64] [--steps 3] [--rounds 3] \
        [--variants barriers plain] [--ungated] [--profile] [--repro] [--out PATH]

ConvNet-AIG ``resnet{depth}_cifar`` (every block gated; ``--ungated``: none), float32, 32²
inputs: ours (the step ``train.py`` builds, :class:`bench.model_bench.TrainRunner`) with
``fusion_barriers`` True ("barriers", the CPU default) or False ("plain"), and the PyTorch step
of :mod:`tests.torch_reference` on 2 threads from the same weights. After a warm-up step each,
every round times ``--steps`` steps of each side in turn. Medians over rounds: images/s, ours
over PyTorch, time per block over the first depth's (1: cost grows as the depth).
``--profile`` traces 2 steps of each variant instead: kernel ms per step in fusions of at least
:data:`BIG` instructions, in other kernels, and on XLA's threads outside named kernels (the
convolutions run there); the largest fusion and all fused instructions. ``--repro``: the same
timings of a plain ResNet written with JAX alone (the XLA reproduction).
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import statistics
import sys
import time
from collections.abc import Callable
from functools import partial
from itertools import pairwise
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import torch

from aig_jax.model.resnet import build_model
from aig_jax.model.variables import init_variables
from aig_jax.sharding import make_mesh
from aig_jax.train.step import KEEP_BARRIERS
from bench.model_bench import TrainRunner, model_config
from bench.profiling import _module_name, _trace, op_durations
from bench.table import aligned, fmt, results_path, write_json
from tests import torch_reference as ref

BIG = 100  # fused instructions: more than one block's elementwise work (with barriers < 60)
Built = tuple[Callable[[], Any], Any, float]  # run a step (its output), the program, compile s


def ours(depth: int, batch: int, barriers: bool, gated: bool = True) -> Built:
    """The train step ``train.py`` builds for ``resnet{depth}_cifar`` (every block gated, or
    none), on ``batch`` random uint8 images, from the weights of seed 0."""
    config = model_config(f"resnet{depth}_cifar", "float32", "gated" if gated else "ungated")
    runner = TrainRunner(config, 32, batch, make_mesh(1), fusion_barriers=barriers)
    run = lambda: jax.block_until_ready(runner())  # noqa: E731
    return run, runner.compiled, runner.compile_info["compile_s"]


def reference(depth: int, gated: bool, batch: int) -> Callable[[], Any]:
    """One step of the reference's PyTorch train step per call, as :func:`ours` sets it up."""
    torch.set_num_threads(2)
    model = build_model(f"resnet{depth}_cifar", gated=gated)
    naming = "reference" if gated else "torchvision"
    net = ref.TorchResNet(False, model.stage_sizes, model.widths, "cifar", 10, naming=naming)
    if gated:
        ref.load_variables(net, init_variables(model, (32, 32, 3), 0), model)
    optimizer = ref.make_optimizer(net, lr=0.1, momentum=0.9, weight_decay=5e-4)
    images = torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    targets = [0.7 if gated else 1.0] * model.num_blocks
    noise = lambda: ref.torch_gumbel_noise((len(targets), batch, 2))  # noqa: E731
    return lambda: ref.train_step(
        net, optimizer, images, torch.arange(batch) % 10, targets, noise(), lossfact=2.0
    )


def plain_resnet(depth: int, batch: int, barriers: bool) -> Built:
    """The reproduction: SGD on a plain CIFAR ResNet (BatchNorm without affine parameters), each
    block's output behind an optimisation barrier kept through fusion if ``barriers``."""
    rng = np.random.default_rng(0)
    pairs = list(pairwise([16] + [w for w in (16, 32, 64) for _ in range((depth - 2) // 6)]))
    shapes = [(3, 3, 3, 16)]
    for cin, w in pairs:
        shapes += [(3, 3, cin, w), (3, 3, w, w)] + [(1, 1, cin, w)] * (cin != w)
    shapes.append((1, 1, 64, 10))  # the classifier, as [64, 10]
    params = [
        jnp.asarray(rng.normal(0, (2 / np.prod(s[:3])) ** 0.5, s), jnp.float32) for s in shapes
    ]

    def bn(x: jax.Array) -> jax.Array:
        return (x - jnp.mean(x, (0, 1, 2))) * jax.lax.rsqrt(jnp.var(x, (0, 1, 2)) + 1e-5)

    def conv(x: jax.Array, w: jax.Array, s: int = 1) -> jax.Array:
        pad = [(w.shape[0] // 2,) * 2] * 2
        return jax.lax.conv_general_dilated(x, w, (s, s), pad, None, None, ("NHWC", "HWIO", "NHWC"))

    def loss(params: list[jax.Array], x: jax.Array, labels: jax.Array) -> jax.Array:
        ws = iter(params)
        x = jax.nn.relu(bn(conv(x, next(ws))))
        for cin, w in pairs:
            s = 1 + (cin != w)
            y = bn(conv(jax.nn.relu(bn(conv(x, next(ws), s))), next(ws)))
            x = jax.nn.relu((bn(conv(x, next(ws), s)) if s == 2 else x) + y)
            x = jax.lax.optimization_barrier(x) if barriers else x
        logp = jax.nn.log_softmax(jnp.mean(x, (1, 2)) @ next(ws)[0, 0])
        return -jnp.mean(jnp.take_along_axis(logp, labels[:, None], 1))

    def sgd(params: list[jax.Array], x: jax.Array, labels: jax.Array) -> list[jax.Array]:
        return [p - 0.1 * g for p, g in zip(params, jax.grad(loss)(params, x, labels), strict=True)]

    step = jax.jit(sgd, donate_argnums=0, compiler_options=KEEP_BARRIERS if barriers else None)
    data = (jnp.asarray(rng.normal(size=(batch, 32, 32, 3)), jnp.float32), jnp.arange(batch) % 10)
    start = time.perf_counter()
    compiled = step.lower(params, *data).compile()
    seconds, state = time.perf_counter() - start, [params]

    def run() -> list[jax.Array]:
        state[0] = jax.block_until_ready(compiled(state[0], *data))
        return state[0]

    return run, compiled, seconds


def fusion_sizes(hlo_text: str) -> dict[str, int]:
    """Fused instructions of each fusion of a compiled HLO module that writes an activation
    (a rank-4 array)."""
    bodies = {
        m[1]: m[2].count("\n")
        for m in re.finditer(r"^%?(\S+) [^\n]*\{\n(.*?)^\}", hlo_text, re.M | re.S)
    }
    fusion = r"^\s*(?:ROOT )?%?(\S+) = \w+\[\d+,\d+,\d+,\d+\]\S* fusion\(.*calls=%?([\w.\-]+)"
    return {name: bodies.get(body, 0) for name, body in re.findall(fusion, hlo_text, re.M)}


def profile(run: Callable[[], Any], compiled: Any, steps: int = 2) -> dict[str, float]:
    """Where a step's time goes (ms per step, see the module doc)."""
    text, figures = compiled.as_text(), {"big_fusion_ms": 0.0, "other_ms": 0.0}
    sizes = fusion_sizes(text)
    _, trace = _trace(lambda: [run() for _ in range(steps)])
    for op, seconds in op_durations(trace, _module_name(text), sizes.keys()):
        figures["big_fusion_ms" if sizes.get(op, 0) >= BIG else "other_ms"] += 1e3 * seconds
    threads = [line for p in trace.planes for line in p.lines if "Eigen" in line.name]
    unnamed = [e.duration_ns for t in threads for e in t.events if "hlo_op" not in dict(e.stats)]
    figures["unnamed_ms"] = 1e-6 * sum(unnamed)
    figures = {k: v / steps for k, v in figures.items()}
    return figures | {"largest_fusion": max(sizes.values()), "fused": sum(sizes.values())}


def time_rounds(steps: dict[str, Callable[[], Any]], n: int, rounds: int) -> dict[str, list]:
    """Seconds per step of each of ``steps`` in each round of ``n`` calls of each in turn."""
    for run in steps.values():
        run()  # warm-up
    seconds: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(rounds):
        for name, run in steps.items():
            start = time.perf_counter()
            for _ in range(n):
                run()
            seconds[name].append((time.perf_counter() - start) / n)
    return seconds


def timing_rows(
    depth: int, batch: int, seconds: dict[str, list], built: dict[str, Built], first: dict
) -> list[dict[str, Any]]:
    """A row per side of one depth from its seconds per step in each round: images/s, ours
    over PyTorch (the median over rounds of their time ratio), time per block over that side's
    at the first depth (``first`` remembers it) and the compile seconds."""
    rows = []
    for name, s in seconds.items():
        torch_s = seconds.get("pytorch") if name != "pytorch" else None
        over = torch_s and statistics.median([t / o for o, t in zip(s, torch_s, strict=True)])
        per_block = statistics.median(s) / (depth - 2)
        rows.append(
            dict(depth=depth, side=name, seconds=s, images_per_s=batch / statistics.median(s))
            | dict(over_pytorch=over, compile_s=built[name][2] if name in built else None)
            | dict(per_block_growth=per_block / first.setdefault(name, per_block))
        )
    return rows


COLUMNS = ("depth", "side", "images_per_s", "over_pytorch", "per_block_growth", "compile_s")
PROFILE = ("depth", "side", "big_fusion_ms", "other_ms", "unnamed_ms", "largest_fusion", "fused")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Parse the flags, time (or profile) each depth, print the table and write the JSON."""
    p = argparse.ArgumentParser("python -m bench.depth_scaling", description=__doc__.split("\n")[0])
    p.add_argument("--depths", type=int, nargs="+", default=[20, 56, 110])
    for flag, value in (("--batch", 64), ("--steps", 3), ("--rounds", 3)):
        p.add_argument(flag, type=int, default=value)
    p.add_argument("--variants", nargs="+", default=["barriers", "plain"])
    for flag in ("--ungated", "--profile", "--repro"):
        p.add_argument(flag, action="store_true")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    kind = "repro" if args.repro else "ungated" if args.ungated else "gated"
    out = args.out or results_path(f"depth-scaling-{kind}{'-profile' * args.profile}-cpu.json")
    results: dict[str, Any] = {
        "command": " ".join(["python -m bench.depth_scaling", *(argv or sys.argv[1:])]),
        "device": f"{platform.processor() or platform.machine()} CPU ×{os.cpu_count()}",
        "versions": f"jax {jax.__version__}, torch {torch.__version__}, batch {args.batch}",
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "rows": [],
    }
    make = plain_resnet if args.repro else partial(ours, gated=not args.ungated)
    prefix, first = "repro" if args.repro else "ours", {}
    for depth in args.depths:
        built = {f"{prefix} {v}": make(depth, args.batch, v == "barriers") for v in args.variants}
        if args.profile:
            for name, (run, compiled, _) in built.items():
                run()
                results["rows"].append({"depth": depth, "side": name, **profile(run, compiled)})
        else:
            steps = {name: b[0] for name, b in built.items()}
            if not args.repro:
                steps["pytorch"] = reference(depth, not args.ungated, args.batch)
            seconds = time_rounds(steps, args.steps, args.rounds)
            results["rows"] += timing_rows(depth, args.batch, seconds, built, first)
        write_json(out, results)  # after every depth, so that a stopped run keeps what it measured
    print(f"{results['device']}, {results['versions']}, {args.rounds} rounds of {args.steps} steps")
    columns = PROFILE if args.profile else COLUMNS
    rows = [columns] + [tuple(fmt(r.get(k)) for k in columns) for r in results["rows"]]
    print("\n".join(aligned(rows)) + f"\nwrote {out}")
    return results


if __name__ == "__main__":
    main()
