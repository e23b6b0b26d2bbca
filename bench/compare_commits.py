"""Speed of two commits of aig-jax, measured in one run on the same machine.

    python bench/compare_commits.py --before 12dcd0f --after HEAD [--repeats 3] [--iters 10] \
        [--models resnet110_cifar:32:16 resnet50:64:8] [--out bench/results/compare-cpu.json]

Each commit is checked out into a temporary detached git worktree; every repeat runs the two
alternately, each in a fresh Python process that imports its worktree's aig_jax, with JAX's
persistent compilation cache off (cold compiles). Per model (``name:image size:batch``) the
process measures a jitted, donated training step (cross-entropy + 2 × target-rate loss, SGD
with momentum 0.9, sampled Gumbel gates) and a jitted inference forward (argmax gates):
trace+lower and XLA compile seconds, and images per second over ``--iters`` calls after two
warm-up calls. resnet50 is gated by the ``resnet50_reference`` schedule at t = 0.5, other models in
every block at target 0.7; only top-level API that both package layouts export is used. Also
counts each commit's model-core lines; prints medians, min-max over repeats and after/before
ratios, and writes everything (raw per-repeat results too) as JSON to ``--out``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

DEFAULT_MODELS = ("resnet110_cifar:32:16", "resnet50:64:8")
COMMITS = ("before", "after")
WARMUP = 2
HANG_GUARD_S = 3 * 3600  # only against a hung child, not a deadline
OLD_CORE = ("models", "gates", "blocks", "batch_norm", "model_spec", "schedules")
#: (result key, table label) of each summarised measurement.
METRICS = (
    ("train_img_s", "train img/s"),
    ("infer_img_s", "inference img/s"),
    ("train_cpu_ms", "train CPU ms/step"),
    ("infer_cpu_ms", "inference CPU ms/call"),
    ("train_total_compile_s", "train trace+compile s"),
    ("infer_total_compile_s", "inference trace+compile s"),
)
CHILD = (
    "import importlib.util as u; s = u.spec_from_file_location('compare_commits', {path!r}); "
    "m = u.module_from_spec(s); s.loader.exec_module(m); m.child({spec!r})"
)


def _compile(jitted: Any, *args: Any) -> tuple[Any, dict[str, float]]:
    """The executable of ``jitted`` for ``args``; seconds of trace+lower, XLA compile, both."""
    start = time.perf_counter()
    lowered = jitted.lower(*args)
    mid = time.perf_counter()
    compiled = lowered.compile()
    end = time.perf_counter()
    return compiled, {"trace_lower_s": mid - start, "compile_s": end - mid, "total_s": end - start}


def _timed(call: Callable[[Any, int], Any], carry: Any, iters: int) -> tuple[Any, float, float]:
    """``carry = call(carry, i)`` for WARMUP calls, then ``iters`` timed calls: the last carry,
    the wall seconds of the timed calls (waiting for the device) and the CPU seconds this
    process spent in them (all threads; less sensitive to other load on a shared host)."""
    import jax

    for i in range(WARMUP):
        carry = jax.block_until_ready(call(carry, i))
    wall, cpu = time.perf_counter(), time.process_time()
    for i in range(WARMUP, WARMUP + iters):
        carry = call(carry, i)
    jax.block_until_ready(carry)
    return carry, time.perf_counter() - wall, time.process_time() - cpu


def measure_model(name: str, size: int, batch: int, iters: int) -> dict[str, Any]:
    """Compile times and images per second of the training step and the inference forward of
    model ``name`` on random ``batch`` × ``size`` × ``size`` × 3 images (runs in the child)."""
    import jax
    import jax.numpy as jnp
    import optax

    from aig_jax import build_model, target_rate_loss, target_rates

    x = jax.random.normal(jax.random.key(1), (batch, size, size, 3), jnp.float32)
    labels = jax.random.randint(jax.random.key(2), (batch,), 0, 10)
    rngs = {"params": jax.random.key(3), "gumbel": jax.random.key(4)}
    probe = build_model(name, num_classes=10, gated=True)
    gates = jax.eval_shape(lambda v: probe.init_with_output(rngs, v, train=True)[0].gates, x)
    num_blocks = gates.shape[0]
    schedule, t = ("resnet50_reference", 0.5) if name == "resnet50" else ("uniform", 0.7)
    rates = target_rates(schedule, num_blocks, t)
    model: Any = build_model(name, num_classes=10, gated=tuple(r < 1.0 for r in rates))
    targets = jnp.asarray(rates, jnp.float32)
    variables = model.init(rngs, x, train=True)
    tx = optax.sgd(0.1, momentum=0.9)
    key = jax.random.key(5)

    def loss_fn(params: Any, stats: Any, images: jax.Array, y: jax.Array, step: jax.Array) -> Any:
        out, updates = model.apply(
            {"params": params, "batch_stats": stats},
            images,
            train=True,
            gate_mode="sample",
            rngs={"gumbel": jax.random.fold_in(key, step)},
            mutable=["batch_stats"],
        )
        onehot = jax.nn.one_hot(y, out.logits.shape[-1])
        ce = -jnp.mean(jnp.sum(onehot * jax.nn.log_softmax(out.logits), axis=-1))
        return ce + 2.0 * target_rate_loss(out.gates, targets), updates["batch_stats"]

    def train_step(state: Any, images: jax.Array, y: jax.Array, step: jax.Array) -> Any:
        params, stats, opt_state = state
        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        (loss, new_stats), grads = grad_fn(params, stats, images, y, step)
        updates, opt_state = tx.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), new_stats, opt_state), loss

    state = (variables["params"], variables["batch_stats"], tx.init(variables["params"]))
    steps = [jnp.int32(i) for i in range(WARMUP + iters)]
    train, train_c = _compile(jax.jit(train_step, donate_argnums=0), state, x, labels, steps[0])
    (state, loss), train_s, train_cpu = _timed(
        lambda c, i: train(c[0], x, labels, steps[i]), (state, 0), iters
    )
    infer_vars = {"params": state[0], "batch_stats": state[1]}
    infer, infer_c = _compile(jax.jit(lambda v, xs: model.apply(v, xs).logits), infer_vars, x)
    _, infer_s, infer_cpu = _timed(lambda c, i: infer(infer_vars, x), None, iters)
    result: dict[str, Any] = {"size": size, "batch": batch, "num_blocks": num_blocks}
    timings = (("train", train_c, train_s, train_cpu), ("infer", infer_c, infer_s, infer_cpu))
    for prefix, times, seconds, cpu in timings:
        result[f"{prefix}_trace_lower_s"] = times["trace_lower_s"]
        result[f"{prefix}_compile_s"] = times["compile_s"]
        result[f"{prefix}_total_compile_s"] = times["total_s"]
        result[f"{prefix}_img_s"] = batch * iters / seconds
        result[f"{prefix}_cpu_ms"] = 1000 * cpu / iters
    return {**result, "final_loss": float(loss)}


def child(spec_json: str) -> None:
    """Child process entry: measure every model of ``spec_json`` and print one JSON line."""
    import jax

    jax.config.update("jax_enable_compilation_cache", False)
    import aig_jax

    spec = json.loads(spec_json)
    device = jax.devices()[0]
    models = {m: measure_model(m, s, b, spec["iters"]) for m, s, b in spec["models"]}
    info = {"aig_jax_file": aig_jax.__file__, "jax_version": jax.__version__}
    info |= {"platform": device.platform, "device_kind": device.device_kind}
    print(json.dumps({**info, "models": models}), flush=True)


def git(*args: str, cwd: Path) -> str:
    """Stdout of ``git args`` in ``cwd``, stripped; raises on failure."""
    return subprocess.run(
        ["git", *args], cwd=cwd, check=True, capture_output=True, text=True
    ).stdout.strip()


def core_lines(tree: Path) -> dict[str, Any]:
    """Line counts of the model core of a checkout: ``aig_jax/model/*.py`` except flops.py
    where that package exists, else the old layout's modules; per file and in total."""
    package = tree / "aig_jax" / "model"
    if package.is_dir():
        files = sorted(p for p in package.glob("*.py") if p.name != "flops.py")
    else:
        files = [tree / "aig_jax" / f"{name}.py" for name in OLD_CORE]
    per_file = {str(p.relative_to(tree)): len(p.read_text().splitlines()) for p in files}
    return {"total": sum(per_file.values()), "files": per_file}


def run_child(tree: Path, models: list[tuple[str, int, int]], iters: int) -> dict[str, Any]:
    """Measurements of one commit: a fresh interpreter in worktree ``tree``, cache off."""
    env = dict(os.environ, PYTHONPATH=str(tree))
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    spec = json.dumps({"models": models, "iters": iters})
    code = CHILD.format(path=str(Path(__file__).resolve()), spec=spec)
    options: dict[str, Any] = {"capture_output": True, "text": True, "timeout": HANG_GUARD_S}
    proc = subprocess.run([sys.executable, "-c", code], cwd=tree, env=env, **options)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"measurement in {tree} failed ({proc.returncode}):\n{proc.stderr}")
    result: dict[str, Any] = json.loads(lines[-1])
    if not Path(result["aig_jax_file"]).resolve().is_relative_to(tree.resolve()):
        raise RuntimeError(f"child imported {result['aig_jax_file']}, not the worktree {tree}")
    return result


def summarise(runs: list[dict[str, Any]], models: list[str]) -> dict[str, Any]:
    """Per model and metric: median, min and max over repeats of each commit, and the
    after/before ratio of the medians."""
    summary: dict[str, Any] = {}
    for model in models:
        summary[model] = {}
        for key, _ in METRICS:
            entry: dict[str, Any] = {}
            for commit in COMMITS:
                vals = [r["models"][model][key] for r in runs if r["commit"] == commit]
                median, lo, hi = statistics.median(vals), min(vals), max(vals)
                entry[commit] = {"median": median, "min": lo, "max": hi, "n": len(vals)}
            entry["ratio"] = entry["after"]["median"] / entry["before"]["median"]
            summary[model][key] = entry
    return summary


def _cell(stats: dict[str, float]) -> str:
    """ "median (min-max)" of one commit's measurement: whole numbers from 100 up, else three
    significant digits."""
    fmt = [
        f"{v:.0f}" if v >= 100 else f"{v:.3g}"
        for v in (stats["median"], stats["min"], stats["max"])
    ]
    return f"{fmt[0]} ({fmt[1]}-{fmt[2]})"


def print_table(report: dict[str, Any]) -> None:
    """The summary as one plain-text table, then the model-core line counts."""
    dev, commits = report["device"], report["commits"]
    print(f"device: {dev['device_kind']} ({dev['platform']}), {report['host_cpu_count']} host CPUs")
    for c in COMMITS:
        print(f"{c}: {commits[c]['ref']} = {commits[c]['sha'][:10]}")
    print(f"JAX {report['jax_version']}, {report['repeats']} repeat(s), {report['iters']} iters")
    for model, size, batch in report["models"]:
        print(f"\n{model} {size}x{size} batch {batch}")
        head = ("before median (min-max)", "after median (min-max)", "after/before", "n")
        print(f"  {'':27}{head[0]:>26}{head[1]:>26}{head[2]:>14}{head[3]:>4}")
        for key, label in METRICS:
            e = report["summary"][model][key]
            before, after, n = _cell(e["before"]), _cell(e["after"]), e["before"]["n"]
            print(f"  {label:27}{before:>26}{after:>26}{e['ratio']:>14.3f}{n:>4}")
    print("\nmodel-core lines")
    for commit in COMMITS:
        lines = commits[commit]["core_lines"]
        files = ", ".join(f"{Path(f).name} {n}" for f, n in lines["files"].items())
        print(f"  {commit:7}{lines['total']:>6}  ({files})")


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, measure both commits alternately, print the table and write JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", required=True, help="git ref of the older commit")
    parser.add_argument("--after", default="HEAD", help="git ref of the newer commit")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--iters", type=int, default=10, help="timed calls per measurement")
    parser.add_argument(
        "--models", nargs="+", default=list(DEFAULT_MODELS), help="name:image_size:batch"
    )
    parser.add_argument("--out", help="JSON path (default bench/results/compare-<platform>.json)")
    args = parser.parse_args(argv)
    models = [(n, int(s), int(b)) for n, s, b in (m.split(":") for m in args.models)]
    repo = Path(git("rev-parse", "--show-toplevel", cwd=Path(__file__).resolve().parent))
    refs = {"before": args.before, "after": args.after}
    shas = {c: git("rev-parse", "--verify", f"{refs[c]}^{{commit}}", cwd=repo) for c in COMMITS}
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="aig-compare-") as tmp:
        trees = {c: Path(tmp) / c for c in COMMITS}
        added: list[Path] = []
        try:
            for c in COMMITS:
                git("worktree", "add", "--detach", str(trees[c]), shas[c], cwd=repo)
                added.append(trees[c])
            for r in range(args.repeats):
                for c in COMMITS:
                    print(f"repeat {r + 1}/{args.repeats}: {c} ({shas[c][:10]})", flush=True)
                    result = run_child(trees[c], models, args.iters)
                    runs.append({"repeat": r, "commit": c, **result})
            lines = {c: core_lines(trees[c]) for c in COMMITS}
        finally:
            for tree in added:  # also on errors and KeyboardInterrupt
                remove = ["git", "worktree", "remove", "--force", str(tree)]
                if subprocess.run(remove, cwd=repo).returncode != 0:
                    print(f"could not remove the worktree {tree}", file=sys.stderr)
    first = runs[0]
    report: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "argv": sys.argv,
        "host_cpu_count": os.cpu_count(),
        "jax_version": first["jax_version"],
        "device": {"platform": first["platform"], "device_kind": first["device_kind"]},
        "repeats": args.repeats,
        "iters": args.iters,
        "warmup": WARMUP,
        "models": models,
        "commits": {c: {"ref": refs[c], "sha": shas[c], "core_lines": lines[c]} for c in COMMITS},
        "summary": summarise(runs, [m for m, _, _ in models]),
        "runs": runs,
    }
    print_table(report)
    out = Path(args.out or repo / "bench" / "results" / f"compare-{first['platform']}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
