"""Throughput, compile time and memory of gated vs ungated ResNets, and of real layer skipping.

Usage (from the repository root)::

    python -m bench.speed --small            # CPU-sized models and batches
    python -m bench.speed                    # AIG-ResNet-50 224² and AIG-ResNet-110 32², batch 256
    python -m bench.speed --dtype bfloat16 --cache-dir /tmp/jax-cache

One run measures, on whatever backend JAX finds: train-step and inference images/s of each gated
model and of the ungated model of the same architecture (``--variants`` picks which); trace and
compile time; peak device memory (where the backend reports it) and the compiled step's memory;
the skipping inference paths (:mod:`aig_jax.inference.skipping`) against the masked one (batch 1
with ``lax.cond`` at execution rates of 0.5 and 1; the whole batch with the path ``choose_path``
picks, and on accelerators the Pallas kernel too); a cold and a warm compile through JAX's
persistent compilation cache; the training loop of ``train.py`` against the bare train step; and
the host input pipeline's images/s (``--sections`` picks some, ``--models`` some models). It
prints a table and writes JSON to ``bench/results/<device>.json``. Gates are untrained: the
execution rates come from "calibrated" thresholds (-1 executes a block for every image, 2 skips
it; per-block medians of p(execute) split a batch in halves).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import tempfile
from typing import Any

import jax

from aig_jax.compilation_cache import enable_compilation_cache
from bench.input_bench import bench_loop, bench_pipeline
from bench.model_bench import VARIANT_NAMES, bench_compile_cache, bench_model
from bench.table import table

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
        help="the smallest setting, which only checks that the script runs",
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
        default=None,
        help="model variants measured in the models section (default: both)",
    )
    parser.add_argument(
        "--no-skipping",
        action="store_true",
        help="leave out the skipping inference paths of the models section",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="trace a few train steps of each variant (kernels per step, their summed time "
        "and the gates' share) and its train-step compile (the compiler's costliest phases)",
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

    def save() -> None:  # after every measurement, so an interrupted run keeps what it measured
        with open(out, "w") as f:
            json.dump(results, f, indent=2)

    name, img, batch = setting["models"][-1]  # the CIFAR model: AIG-ResNet-110 unless tiny
    if "compile_cache" in args.sections and not args.no_compile_cache:
        results["compile_cache"] = bench_compile_cache(name, img, batch, args.dtype)
        save()
    if args.cache_dir is None:  # the timings below are then cold compiles
        enable_compilation_cache(False)
        shutil.rmtree(cache_dir, ignore_errors=True)
    if "models" in args.sections:
        results["models"] = []
        for i, (name, img, batch) in enumerate(models):
            results["models"].append({"model": name})

            def progress(partial: dict[str, Any], i: int = i) -> None:
                results["models"][i] = partial
                save()

            bench_model(
                name,
                img,
                batch,
                args.dtype,
                setting["iters"],
                tuple(args.variants or VARIANT_NAMES),
                skipping=not args.no_skipping,
                profile=args.profile,
                progress=progress,
            )
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
