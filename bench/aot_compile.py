"""Compile the train step for a GPU this host does not have: XLA's own GPU compiler, run ahead of
time on the CPU, gives each model variant's compile time and kernel launches per step.

Usage (from the repository root)::

    pip install "jax-cuda12-plugin[with-cuda]==0.10.2"   # the installed jaxlib's version
    python -m bench.aot_compile                          # H100, AIG-ResNet-50 and -110, batch 256
    python -m bench.aot_compile --models resnet110_cifar --variants gated --repeats 3
    python -m bench.aot_compile --models resnet50 --profile    # where each compile's time goes
    python -m bench.aot_compile --target cpu --tiny      # this host's CPU; no plugin needed

No GPU or driver is needed (the plugin's ``with-cuda`` extra brings the CUDA compiler it runs),
and JAX is kept on the CPU backend: the plugin's compiler reads the card's description from
``bench/targets/<target>.txtpb``. What it cannot do without the card is
autotune (cuDNN convolution algorithms, Triton GEMM tiles), so a compile on the card takes
that much longer, and the host's cores set the pace of the parallel phases (kernel code
generation): compare variants within one run, not with a compile on another machine.

Per train step it counts the kernels of the compiled program (a loop's body once per
iteration) and, for a GPU target, how the executable launches them (:mod:`launches`, from the
thunk sequence XLA dumps during each variant's first compile): the CUDA graphs into which XLA
records runs of kernels, each one call from the host; the launches outside graphs (cuDNN
convolutions, library calls, loop control), one call each; and the kernels inside the graphs.
When a step is bound by launches rather than arithmetic, the host's calls and the graphs'
kernels are what its time follows. For a GPU target it also counts the kernels XLA generated
code for ("compiled"): identical fusions share one kernel, so this is where per-block
differences in the code show up as compile time. It prints a table and writes
``bench/results/aot-<target>-<dtype>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
from typing import Any

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # compiling for a target needs no device of it
import jax

from aig_jax.compilation_cache import enable_compilation_cache
from aig_jax.model.resnet import build_model
from bench.launches import compiled_kernels, dumped_launches, kernel_launches
from bench.model_bench import VARIANT_NAMES, VARIANTS, abstract_train_step, compile_timed
from bench.speed import SIZES, select_models
from bench.table import aligned, fmt, phase_list

TARGETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "targets")


def target_names() -> list[str]:
    """``cpu`` (this host) and every GPU description in ``bench/targets``."""
    gpus = sorted(f[: -len(".txtpb")] for f in os.listdir(TARGETS) if f.endswith(".txtpb"))
    return ["cpu", *gpus]


def target_devices(target: str) -> list[Any]:
    """One device of ``target``: this host's CPU, or a GPU from its description (through the
    CUDA plugin's ahead-of-time compiler). Errors name an unknown target and a missing plugin."""
    if target == "cpu":
        return jax.devices("cpu")[:1]
    if target not in target_names():
        raise ValueError(f"unknown target {target!r}; expected one of {target_names()}")
    from jax.experimental import topologies

    with open(os.path.join(TARGETS, f"{target}.txtpb")) as f:
        config = f.read()
    try:
        topology = topologies.get_topology_desc(
            platform="cuda", topology="1x1x1", target_config=config
        )
    except (NotImplementedError, RuntimeError) as err:
        import jaxlib

        raise RuntimeError(
            f"compiling for {target} needs JAX's CUDA plugin (no GPU needed): pip install "
            f"'jax-cuda12-plugin[with-cuda]=={jaxlib.__version__}' ({err})"
        ) from err
    return list(topology.devices)


def compile_variant(
    name: str, size: int, batch: int, dtype: str, tag: str, mesh: Any, first: bool, profile: bool
) -> dict[str, Any]:
    """Trace and compile seconds and kernel launches of one variant's train step on ``mesh``.
    The ``first`` compile of a variant for a GPU target also has XLA dump the program into a
    temporary folder, from which its CUDA graphs and other launches per step are read (see
    :mod:`launches`); with ``profile`` it also lists the compiler's costliest phases."""
    gated = dict(VARIANTS)[tag]
    model = build_model(name, num_classes=10, gated=gated, dtype=dtype)
    # XLA:CPU writes no thunk sequence: only a GPU target's first compile is dumped.
    dumped = first and mesh.devices.flat[0].platform != "cpu"
    with tempfile.TemporaryDirectory() as dump:
        step, args = abstract_train_step(model, size, batch, mesh)
        options = {"xla_dump_to": dump} if dumped else None
        compiled, info = compile_timed(step, *args, profile=profile, compiler_options=options)
        hlo = compiled.as_text()
        info["launches"] = kernel_launches(hlo)
        host = dumped_launches(dump, hlo) if dumped else None
        generated = compiled_kernels(dump) if dumped else None
    if generated is not None:
        info["compiled_kernels"] = generated
    if host is not None:
        info.update(
            graph_launches=host.graphs, other_launches=host.other, graph_kernels=host.graph_kernels
        )
    return info


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Compile every asked variant, print the table, write the JSON and return the results."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--target", default="h100", help=f"one of {target_names()}")
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--small", action="store_const", dest="size", const="small")
    size.add_argument("--tiny", action="store_const", dest="size", const="tiny")
    parser.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16"))
    parser.add_argument("--models", nargs="+", default=None, metavar="NAME")
    parser.add_argument(
        "--variants",
        nargs="+",
        choices=VARIANT_NAMES,
        default=list(VARIANT_NAMES),
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="compile each variant this many times, the variants in turn (compile times vary "
        "from run to run, more so on a busy or small host); the table gives the median",
    )
    parser.add_argument(
        "--profile", action="store_true", help="trace the first compile's phases of each variant"
    )
    parser.add_argument("--out", default=None, help="JSON path")
    args = parser.parse_args(argv)
    setting = args.size or "full"
    try:
        models = select_models(SIZES[setting]["models"], args.models)
        mesh = jax.make_mesh(
            (1,),
            ("data",),
            axis_types=(jax.sharding.AxisType.Explicit,),
            devices=target_devices(args.target),
        )
    except (ValueError, RuntimeError) as err:
        parser.error(str(err))
    enable_compilation_cache(False)  # every compile below is a cold one
    results: dict[str, Any] = {
        "target": args.target,
        "device": mesh.devices.flat[0].device_kind,
        "host_cpus": os.cpu_count(),
        "jax_version": jax.__version__,
        "size": setting,
        "dtype": args.dtype,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "models": [],
    }
    out = args.out or os.path.join(
        os.path.dirname(os.path.abspath(__file__)),
        "results",
        f"aot-{args.target}-{args.dtype}.json",
    )
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    tags = [t for t in VARIANT_NAMES if t in args.variants]
    for name, img, batch in models:
        entry: dict[str, Any] = {"model": name, "image_size": img, "batch": batch}
        results["models"].append(entry)
        for run in range(args.repeats):
            for tag in tags:
                first = run == 0
                info = compile_variant(
                    name, img, batch, args.dtype, tag, mesh, first, args.profile and first
                )
                m = entry.setdefault(tag, {**info, "compile_s_runs": []})
                m["compile_s_runs"].append(info["compile_s"])
                m["compile_s"] = statistics.median(m["compile_s_runs"])
                with open(out, "w") as f:  # after every compile: an interrupted run keeps them
                    json.dump(results, f, indent=2)
    print(
        f"{results['device']} ({args.target}), compiled on {os.cpu_count()} host cores, "
        f"jax {jax.__version__}, {args.dtype}"
    )
    print(aot_table(results))
    print(f"wrote {out}")
    return results


def aot_table(results: dict[str, Any]) -> str:
    """One row per model and variant (median and every compile's seconds; per train step the
    kernels, and on a GPU target the host's launches: CUDA graphs and other launches, and the
    kernels inside the graphs), then each variant's costliest compile phases where they were
    traced."""
    columns = "model|variant|compile s|runs|compiled|kernels|graphs|other|in graphs"
    rows: list[tuple[str, ...]] = [tuple(columns.split("|"))]
    notes = []
    for r in results["models"]:
        for tag in (t for t in VARIANT_NAMES if t in r):
            m = r[tag]
            label = f"{r['model']} {r['image_size']}² b{r['batch']}"
            runs = " ".join(fmt(s) for s in m["compile_s_runs"])
            host = (fmt(m.get(k)) for k in ("graph_launches", "other_launches", "graph_kernels"))
            compiled = fmt(m.get("compiled_kernels"))
            rows.append(
                (label, tag, fmt(m["compile_s"]), runs, compiled, str(m["launches"]), *host)
            )
            if "phases" in m:
                first = m["compile_s_runs"][0]
                notes.append(f"  {tag} {r['model']}: " + phase_list(m["phases"], first))
    return "\n".join(aligned(rows) + notes)


if __name__ == "__main__":
    main()
