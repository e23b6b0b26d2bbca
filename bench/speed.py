"""Throughput, compile time and memory of gated vs ungated ResNets, real layer skipping and the
training loop.

Usage (from the repository root)::

    python -m bench.speed --small            # CPU-sized models and batches
    python -m bench.speed --dtype bfloat16   # AIG-ResNet-50 224² and AIG-ResNet-110 32², batch 256
    python -m bench.speed --sections models --models resnet110_cifar --reference --profile

Sections (``--sections`` picks some; :mod:`bench.model_bench` measures): ``models``, train-step
and inference images/s, trace and compile time and memory of each gated model and of the
ungated model of the same architecture (``--reference``: the reference's PyTorch model too;
``--profile``: kernels per step and the compiler's costliest phases); ``skipping``, the skipping
inference paths (:mod:`aig_jax.inference.skipping`) against the masked one; ``loop``,
``train.py``'s loop against its bare step. Every compile is cold unless ``--cache-dir`` names a
persistent cache. Prints a table and writes JSON to ``bench/results/<device>.json``, after every
figure, so a stopped run keeps what it measured.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

import jax

from aig_jax.compilation_cache import enable_compilation_cache
from bench import model_bench as mb
from bench.table import device_slug, results_path, table, write_json

#: Per setting, (model, image size, batch) of each model, loop steps per logging interval and
#: timed calls per measurement; "tiny" only checks that the script runs.
SIZES: dict[str, dict[str, Any]] = {
    "full": {"models": [("resnet50", 224, 256), ("resnet110_cifar", 32, 256)], "loop": 50,
             "iters": 10},
    "small": {"models": [("resnet50", 64, 8), ("resnet110_cifar", 32, 16)], "loop": 4, "iters": 3},
    "tiny": {"models": [("resnet8_cifar", 16, 4)], "loop": 2, "iters": 1},
}  # fmt: skip
SECTIONS = ("models", "skipping", "loop")


def select_models(
    models: list[tuple[str, int, int]], names: list[str] | None
) -> list[tuple[str, int, int]]:
    """The entries of ``models`` named in ``names`` (None: all), in the setting's order; a
    ``ValueError`` names any name the setting does not have."""
    known = [m[0] for m in models]
    unknown = [n for n in names or () if n not in known]
    if unknown:
        raise ValueError(f"--models {unknown} not among this setting's models {known}")
    return [m for m in models if names is None or m[0] in names]


def add_size_arguments(parser: argparse.ArgumentParser, dtype: str = "float32") -> None:
    """The flags ``bench.speed`` and ``bench.aot_compile`` share: setting, dtype, models,
    variants and the JSON path."""
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--small", action="store_const", dest="size", const="small", default="full")
    size.add_argument("--tiny", action="store_const", dest="size", const="tiny")
    parser.add_argument("--dtype", default=dtype, choices=("float32", "bfloat16"))
    parser.add_argument("--models", nargs="+", metavar="NAME", help="some of the setting's models")
    parser.add_argument("--variants", nargs="+", choices=mb.VARIANTS, default=list(mb.VARIANTS))
    parser.add_argument("--out", help="JSON path (default under bench/results/)")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the asked sections, print the table, write the JSON and return the results."""
    parser = argparse.ArgumentParser("python -m bench.speed", description=__doc__.split("\n")[0])
    add_size_arguments(parser)
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    parser.add_argument("--reference", action="store_true", help="the PyTorch reference too")
    parser.add_argument("--profile", action="store_true", help="trace steps and compiles")
    parser.add_argument("--cache-dir", help="persistent compilation cache (default: none)")
    args = parser.parse_args(argv)
    setting = SIZES[args.size]
    try:
        models = select_models(setting["models"], args.models)
    except ValueError as err:
        parser.error(str(err))
    if args.cache_dir:
        jax.config.update("jax_compilation_cache_dir", args.cache_dir)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    enable_compilation_cache(bool(args.cache_dir))  # without a cache, every compile is cold
    results: dict[str, Any] = {
        "backend": jax.default_backend(), "device": jax.devices()[0].device_kind,
        "device_count": jax.device_count(), "jax_version": jax.__version__, "size": args.size,
        "dtype": args.dtype, "xla_flags": os.environ.get("XLA_FLAGS", ""),
    }  # fmt: skip
    out = args.out or results_path(f"{device_slug()}.json")

    def save() -> None:
        write_json(out, results)

    iters, dtype = setting["iters"], args.dtype
    if "models" in args.sections:
        results["models"] = []
        for m in models:
            results["models"].append({})

            def progress(result: dict[str, Any]) -> None:
                results["models"][-1] = result
                save()

            entry = mb.bench_model(*m, dtype, iters, tuple(args.variants), args.profile, progress)
            if args.reference:
                entry["reference"] = ref = mb.bench_reference(
                    *m, dtype, iters, tuple(args.variants)
                )
                entry["ratios"].update(reference_ratios(entry, ref))
            save()
    if "skipping" in args.sections:
        results["skipping"] = []
        for m in models:
            results["skipping"].append(mb.bench_skipping(*m, dtype, iters))
            save()
    if "loop" in args.sections:
        results["loop"] = []
        for name, size, batch in models:
            config = mb.loop_config(name, size, batch, dtype)
            results["loop"].append(mb.bench_loop(config, setting["loop"], iters))
            save()
    save()
    print(f"{results['device']} ({results['backend']} ×{results['device_count']}), "
          f"jax {results['jax_version']}, {dtype}")  # fmt: skip
    print(table(results))
    print(f"wrote {out}")
    return results


def reference_ratios(ours: dict[str, Any], reference: dict[str, Any]) -> dict[str, float]:
    """Our train and inference images/s over the reference's, per variant measured by both."""
    return {
        f"{s}_{tag}_over_reference": ours[tag][f"{s}_images_per_s"] / theirs[f"{s}_images_per_s"]
        for tag, theirs in reference.items()
        if tag in mb.VARIANTS and tag in ours
        for s in ("train", "infer")
    }


if __name__ == "__main__":
    main()
