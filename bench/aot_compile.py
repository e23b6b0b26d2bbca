"""Compile the train step for a GPU this host does not have: XLA's GPU compiler, run ahead of
time on the CPU, gives each model variant's compile time and kernels per step.

Usage (from the repository root)::

    pip install "jax-cuda12-plugin[with-cuda]==0.10.2"   # the installed jaxlib's version
    python -m bench.aot_compile                          # H100, AIG-ResNet-50 and -110, batch 256
    python -m bench.aot_compile --models resnet110_cifar --variants gated --repeats 3
    python -m bench.aot_compile --models resnet50 --profile    # where each compile's time goes
    python -m bench.aot_compile --target cpu --tiny      # this host's CPU; no plugin needed

No GPU is needed: the plugin's compiler reads the card from ``bench/targets/<target>.txtpb``.
It cannot autotune without the card (cuDNN algorithms, Triton tiles), and the host's cores set
the pace of kernel code generation: compare variants within one run. Per train step it counts
the kernels of the compiled program (a loop's body once per iteration) and, for a GPU target,
the kernels XLA generated code for ("compiled": identical fusions share one), from the PTX it
dumps at each variant's first compile (:mod:`launches`). Prints a table and writes
``bench/results/aot-<target>-<dtype>.json``."""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
from typing import Any

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # compiling for a target needs no device of it
import jax

from aig_jax.compilation_cache import enable_compilation_cache
from bench.launches import compiled_kernels, kernel_launches
from bench.model_bench import VARIANTS, abstract_train_step, compile_timed, model_config
from bench.speed import SIZES, add_size_arguments, select_models
from bench.table import aligned, fmt, phase_list, results_path, write_json

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
    config: Any, size: int, batch: int, mesh: Any, first: bool, profile: bool
) -> dict[str, Any]:
    """Trace and compile seconds and kernels per step of ``config``'s train step on ``mesh``.
    The ``first`` compile for a GPU target also has XLA dump the program into a temporary
    folder, from which the kernels it generated code for are counted (:mod:`launches`); with
    ``profile`` it also lists the compiler's costliest phases."""
    dumped = first and mesh.devices.flat[0].platform != "cpu"  # XLA:CPU dumps no PTX
    with tempfile.TemporaryDirectory() as dump:
        step, args = abstract_train_step(config, size, batch, mesh)
        options = {"xla_dump_to": dump} if dumped else None
        compiled, info = compile_timed(step, *args, profile=profile, compiler_options=options)
        info["launches"] = kernel_launches(compiled.as_text())
        generated = compiled_kernels(dump) if dumped else None
    if generated is not None:
        info["compiled_kernels"] = generated
    return info


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Compile every asked variant, print the table, write the JSON and return the results."""
    parser = argparse.ArgumentParser(
        "python -m bench.aot_compile", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--target", default="h100", help=f"one of {target_names()}")
    add_size_arguments(parser, dtype="bfloat16")
    parser.add_argument(
        "--repeats", type=int, default=1,
        help="compiles of each variant, the variants in turn; the table gives the median",
    )  # fmt: skip
    parser.add_argument("--profile", action="store_true", help="trace the first compiles")
    args = parser.parse_args(argv)
    try:
        models = select_models(SIZES[args.size]["models"], args.models)
        devices = target_devices(args.target)
    except (ValueError, RuntimeError) as err:
        parser.error(str(err))
    mesh = jax.make_mesh(
        (1,), ("data",), axis_types=(jax.sharding.AxisType.Explicit,), devices=devices
    )
    enable_compilation_cache(False)  # every compile below is a cold one
    results: dict[str, Any] = {
        "target": args.target, "device": devices[0].device_kind, "host_cpus": os.cpu_count(),
        "jax_version": jax.__version__, "size": args.size, "dtype": args.dtype,
        "xla_flags": os.environ.get("XLA_FLAGS", ""), "models": [],
    }  # fmt: skip
    out = args.out or results_path(f"aot-{args.target}-{args.dtype}.json")
    tags = [t for t in VARIANTS if t in args.variants]
    for name, img, batch in models:
        entry: dict[str, Any] = {"model": name, "image_size": img, "batch": batch}
        results["models"].append(entry)
        for run in range(args.repeats):
            for tag in tags:
                config = model_config(name, args.dtype, tag)
                info = compile_variant(config, img, batch, mesh, run == 0, args.profile and not run)
                m = entry.setdefault(tag, {**info, "compile_s_runs": []})
                m["compile_s_runs"].append(info["compile_s"])
                m["compile_s"] = statistics.median(m["compile_s_runs"])
                write_json(out, results)  # after every compile: an interrupted run keeps them
    print(
        f"{results['device']} ({args.target}), compiled on {os.cpu_count()} host cores, "
        f"jax {jax.__version__}, {args.dtype}"
    )
    print(aot_table(results))
    print(f"wrote {out}")
    return results


def aot_table(results: dict[str, Any]) -> str:
    """One row per model and variant: median and every compile's seconds, kernels compiled (on
    a GPU target) and launched per train step; then each variant's costliest compile phases
    where they were traced."""
    columns = "model|variant|compile s|runs|compiled|kernels"
    rows: list[tuple[str, ...]] = [tuple(columns.split("|"))]
    notes = []
    for r in results["models"]:
        for tag in (t for t in VARIANTS if t in r):
            m = r[tag]
            rows.append((
                f"{r['model']} {r['image_size']}² b{r['batch']}", tag, fmt(m["compile_s"]),
                " ".join(fmt(s) for s in m["compile_s_runs"]), fmt(m.get("compiled_kernels")),
                str(m["launches"]),
            ))  # fmt: skip
            if "phases" in m:
                first = m["compile_s_runs"][0]
                notes.append(f"  {tag} {r['model']}: " + phase_list(m["phases"], first))
    return "\n".join(aligned(rows) + notes)


if __name__ == "__main__":
    main()
