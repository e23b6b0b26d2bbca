"""How sensitive ConvNet-AIG's first training steps are, in our trainer and in the reference's.

    python -m bench.sensitivity [--depth 110] [--seed 0] [--steps 8] [--draws 6] [--epochs 1] \
        [--data_dir ../shared/data/cifar10/mini] [--out bench/results/sensitivity-cpu.json] \
        [--plot docs/images/sensitivity.png]

Everything starts from one set of initial weights (ours at the config's initialisation, loaded
into the reference model of :mod:`tests.torch_reference`) and one batch order, the
recipe of ``learning_curves.py`` (``resnet{depth}_cifar``, every block gated at ``--target``):

1. Divergence. Pairs trained side by side for ``--steps`` steps on the same batches with the
   same Gumbel noise (the noise our gates draw from key ``--seed``): ours against ours started
   from weights nudged one float32 ulp up, the reference against itself nudged likewise, and
   ours against the reference. After every step: the largest and the median, over parameter
   arrays, of ``max|a - b| / max|b|``.
2. Spread. Each side trains ``--epochs`` epochs under ``--draws`` Gumbel-noise draws (ours: the
   train step with key d; the reference: its loop with a generator seeded d), then is evaluated
   on the test split with sampled gates. Test error and execution rate per draw, their mean,
   standard deviation and range; our trained weights are evaluated by the reference model too,
   which compares evaluation alone.

Prints both tables, writes JSON after every measurement (a rerun with the same depth, seed and
epochs keeps the draws already measured) and plots the divergence and the per-draw results.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

ROOT = Path(__file__).resolve().parents[1]

from aig_jax.data import make_source  # noqa: E402
from aig_jax.data.loader import eval_iterator, steps_per_epoch, train_iterator  # noqa: E402
from aig_jax.eval.predict import predict  # noqa: E402
from aig_jax.eval.step import make_eval_step  # noqa: E402
from aig_jax.model.resnet import ResNet  # noqa: E402
from aig_jax.model.spec import ModelSpec  # noqa: E402
from aig_jax.sharding import make_mesh  # noqa: E402
from aig_jax.train.optim import learning_rate_schedule, make_optimizer  # noqa: E402
from aig_jax.train.state import TrainState, create_train_state  # noqa: E402
from aig_jax.train.step import make_train_step  # noqa: E402
from bench.learning_curves import (  # noqa: E402
    add_recipe_arguments,
    evaluate_torch,
    header,
    make_config,
    run_reference,
    torch_images,
)

SIDES = ("aig-jax", "reference")
PAIRS = ("ours vs ours nudged", "reference vs reference nudged", "ours vs reference")


def nudge(tree: Any) -> Any:
    """``tree`` with every float32 element moved one ulp towards +inf (others unchanged)."""

    def up(x: Any) -> Any:
        x = np.asarray(x)
        return np.nextafter(x, np.float32(np.inf)) if x.dtype == np.float32 else x

    return jax.tree.map(up, tree)


def relative_difference(a: Any, b: Any) -> tuple[float, float]:
    """(largest, median) over the arrays of two like trees of ``max|a - b| / max|b|``."""
    ratios = [
        float(np.abs(np.asarray(x) - np.asarray(y)).max() / max(np.abs(np.asarray(y)).max(), 1e-12))
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    ]
    return max(ratios), float(np.median(ratios))


class Ours:
    """Our train step (``train.py``'s, jit-compiled) for ``config``'s model and recipe."""

    def __init__(self, config: Any, steps_per_epoch: int) -> None:
        self.spec = ModelSpec.from_config(config)
        model = self.spec.build()
        assert isinstance(model, ResNet)
        self.model = model
        schedule = learning_rate_schedule(config, steps_per_epoch)
        self.tx = make_optimizer(config, schedule)
        self.config = config
        self.step = jax.jit(
            make_train_step(
                model,
                self.tx,
                self.spec.targets,
                target_weight=config.target_weight,
                normalize=config.target_loss_normalize,
                learning_rate=schedule,
            )
        )

    def init(self) -> TrainState:
        """The state at step 0 (the initial weights both sides start from)."""
        return create_train_state(self.model, self.tx, (32, 32, 3), self.config.seed)


def _batches(config: Any, source: Any, steps: int) -> Iterator[dict[str, np.ndarray]]:
    return train_iterator(
        source, config.dataset, global_batch=config.batch_size, seed=config.seed,
        num_steps=steps, num_threads=2,
    )  # fmt: skip


def _reference(ours: Ours, variables: Any) -> tuple[Any, Any]:
    """The reference model holding ``variables`` and its SGD, as ``run_reference`` builds."""
    import torch

    from tests import torch_reference as ref

    c = ours.config
    net = ref.TorchResNet(
        False, ours.model.stage_sizes, ours.model.widths, "cifar", ours.spec.num_classes
    )
    ref.load_variables(net, jax.device_get(variables), ours.model)
    optimizer = ref.make_optimizer(
        net, lr=c.learning_rate, momentum=c.momentum, weight_decay=c.weight_decay
    )
    torch.manual_seed(c.seed)
    return net, optimizer


def divergence(config: Any, steps: int) -> list[dict[str, Any]]:
    """Per step, each pair of :data:`PAIRS`: (largest, median) relative parameter difference,
    and each run's cross-entropy."""
    import torch

    from tests import torch_reference as ref

    source = make_source(config.dataset, config.dataset.train_split)
    ours = Ours(config, steps_per_epoch(len(source), config.batch_size))
    targets = [float(t) for t in ours.spec.targets]
    key = jax.random.key(config.seed)
    a = ours.init()
    b = a.replace(params=jax.device_put(nudge(a.params)))
    nets = [_reference(ours, a.variables), _reference(ours, b.variables)]
    out = []
    for step, batch in enumerate(_batches(config, source, steps)):
        images = jnp.asarray(batch["image"])
        noise = ref.jax_gate_noise(ours.model, a.variables, images, jax.random.fold_in(key, step))
        jbatch = {"image": images, "label": jnp.asarray(batch["label"])}
        a, ma = ours.step(a, jbatch, key)
        b, mb = ours.step(b, jbatch, key)
        ce = [float(ma["ce"]), float(mb["ce"])]
        for net, optimizer in nets:
            parts = ref.train_step(
                net, optimizer, torch_images(torch, batch["image"]),
                torch.from_numpy(batch["label"]).long(), targets, torch.from_numpy(noise),
                lossfact=config.target_weight,
            )  # fmt: skip
            ce.append(float(parts["ce"]))
        ra, rb = (ref.variables_of(net, ours.model)["params"] for net, _ in nets)
        diffs = [
            relative_difference(b.params, a.params),
            relative_difference(rb, ra),
            relative_difference(a.params, ra),
        ]
        out.append(
            {
                "step": step,
                **{pair: list(d) for pair, d in zip(PAIRS, diffs, strict=True)},
                "ce": dict(
                    zip(("ours", "ours nudged", "reference", "reference nudged"), ce, strict=True)
                ),
            }
        )
        print(
            f"step {step}: "
            + ", ".join(f"{p} {d[0]:.2g}/{d[1]:.2g}" for p, d in zip(PAIRS, diffs, strict=True)),
            flush=True,
        )
    return out


def spread_ours(config: Any, draw: int) -> dict[str, float]:
    """Our train step for ``config.num_epochs`` epochs with Gumbel key ``draw``; the test
    error (%) and execution rate with sampled gates, the mean training CE and rate."""
    train_source = make_source(config.dataset, config.dataset.train_split)
    test_source = make_source(config.dataset, config.dataset.eval_split)
    spe = steps_per_epoch(len(train_source), config.batch_size)
    ours = Ours(config, spe)
    state, key = ours.init(), jax.random.key(draw)
    ce, rate = [], []
    for batch in _batches(config, train_source, int(config.num_epochs) * spe):
        state, metrics = ours.step(state, jax.tree.map(jnp.asarray, batch), key)
        ce.append(float(metrics["ce"]))
        rate.append(float(np.mean(metrics["gate_rates"])))
    mesh = make_mesh(1)  # the train step above runs on one device too
    batches = eval_iterator(test_source, config.dataset, global_batch=500, num_threads=2)
    preds = predict(
        make_eval_step(ours.model, mesh), state.variables, batches, mesh, gate_mode="sample",
        key=jax.random.key(config.seed + 7), num_layers=len(ours.spec.targets), progress=False,
    )  # fmt: skip
    theirs = _cross_evaluate(ours, state.variables, config, test_source)
    return {
        "test_error": float(100.0 * (1.0 - preds.correct.mean())),
        "test_rate": float(preds.gates.mean()),
        "train_ce": float(np.mean(ce)),
        "train_rate": float(np.mean(rate)),
        "reference_eval_test_error": theirs[0],
        "reference_eval_test_rate": theirs[1],
    }


def _cross_evaluate(ours: Ours, variables: Any, config: Any, source: Any) -> tuple[float, float]:
    """Test error (%) and execution rate of our trained ``variables`` evaluated by the
    reference model (sampled gates, its own noise): evaluation alone, compared."""
    import torch

    net, _ = _reference(ours, variables)
    gen = torch.Generator().manual_seed(config.seed)
    return evaluate_torch(torch, net, len(ours.spec.targets), config, source, gen)


def spread_reference(config: Any, draw: int) -> dict[str, float]:
    """The reference loop (``learning_curves.run_reference``) with noise generator ``draw``:
    its last epoch's record."""
    record = run_reference(config, noise_seed=draw)[-1]
    return {k: v for k, v in record.items() if k != "epoch"}


def statistics(values: list[float]) -> dict[str, float]:
    """Mean, sample standard deviation (0 for one value), min and max of ``values``."""
    v = np.asarray(values, np.float64)
    sd = float(v.std(ddof=1)) if len(v) > 1 else 0.0
    return {"mean": float(v.mean()), "sd": sd, "min": float(v.min()), "max": float(v.max())}


def mean_difference(a: list[float], b: list[float]) -> tuple[float, float]:
    """mean(a) − mean(b) and its standard error sqrt(var(a)/n_a + var(b)/n_b) (sample
    variances; each list needs two values or more)."""
    x, y = np.asarray(a, np.float64), np.asarray(b, np.float64)
    se = np.sqrt(x.var(ddof=1) / len(x) + y.var(ddof=1) / len(y))
    return float(x.mean() - y.mean()), float(se)


def tables(result: dict[str, Any]) -> str:
    """Markdown: the divergence per step, then each side's spread over draws."""
    lines = [
        "| step | " + " | ".join(f"{p} (max / median)" for p in PAIRS) + " |",
        "|---|---|---|---|",
    ]
    for row in result["divergence"]:
        cells = [f"{row[p][0]:.2g} / {row[p][1]:.2g}" for p in PAIRS]
        lines.append(f"| {row['step']} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "| side | draws | test error % mean ± sd (range) | test exec. rate mean ± sd (range) "
        "| train CE mean |",
        "|---|---|---|---|---|",
    ]
    for side in SIDES:
        draws = result["spread"].get(side, {})
        if not draws:
            continue
        cells = []
        for key, fmt in (("test_error", ".1f"), ("test_rate", ".3f")):
            s = statistics([d[key] for d in draws.values()])
            cells.append(f"{s['mean']:{fmt}} ± {s['sd']:{fmt}} ({s['min']:{fmt}}–{s['max']:{fmt}})")
        ce = statistics([d["train_ce"] for d in draws.values()])["mean"]
        lines.append(f"| {side} | {len(draws)} | " + " | ".join(cells) + f" | {ce:.3g} |")
    ours, theirs = (list(result["spread"].get(side, {}).values()) for side in SIDES)
    if len(ours) > 1 and len(theirs) > 1:
        cells = []
        for key, fmt in (("test_error", ".1f"), ("test_rate", ".3f")):
            diff, se = mean_difference([d[key] for d in ours], [d[key] for d in theirs])
            cells.append(f"{key.replace('_', ' ')} {diff:+{fmt}} ± {se:{fmt}}")
        lines.append(
            "\nDifference of the means, ours − reference (± its standard error): "
            + ", ".join(cells)
            + "."
        )
    crossed = [
        d for d in result["spread"].get("aig-jax", {}).values() if "reference_eval_test_rate" in d
    ]
    if crossed:
        error = max(abs(d["reference_eval_test_error"] - d["test_error"]) for d in crossed)
        rate = max(abs(d["reference_eval_test_rate"] - d["test_rate"]) for d in crossed)
        lines.append(
            f"\nOur trained weights evaluated by the reference model ({len(crossed)} draws): "
            f"test error within {error:.1f} points of ours, execution rate within {rate:.3f}."
        )
    return "\n".join(lines)


def plot(result: dict[str, Any], path: str) -> None:
    """Left: the median relative difference of each pair against step (log scale). Right: each
    draw's test execution rate against its test error, one colour per side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    for pair in PAIRS:
        rows = result["divergence"]
        left.semilogy([r["step"] for r in rows], [r[pair][1] for r in rows], marker="o", label=pair)
    left.set(title="median relative parameter difference", xlabel="step")
    left.xaxis.set_major_locator(MaxNLocator(integer=True))
    left.legend(fontsize=7)
    for side, colour in zip(SIDES, ("tab:blue", "tab:orange"), strict=True):
        draws = list(result["spread"].get(side, {}).values())
        right.scatter([d["test_error"] for d in draws], [d["test_rate"] for d in draws],
                      color=colour, label=side)  # fmt: skip
    epochs = result["args"]["epochs"]
    right.set(title=f"after {epochs} epoch(s), one point per noise draw",
              xlabel="test error %", ylabel="test execution rate")  # fmt: skip
    right.legend(fontsize=7)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _earlier(path: str, args: argparse.Namespace) -> dict[str, Any]:
    """What ``path`` holds for the same depth, seed, epochs and steps (else nothing)."""
    if not os.path.exists(path):
        return {}
    earlier = json.loads(Path(path).read_text())
    same = ("depth", "seed", "epochs", "target", "batch_size", "data_dir")
    if any(earlier["args"].get(k) != getattr(args, k) for k in same):
        return {}
    return earlier


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser("python -m bench.sensitivity", description=__doc__.split("\n")[0])
    p.add_argument("--depth", type=int, default=110)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=8, help="divergence: steps side by side")
    p.add_argument("--draws", type=int, default=6, help="spread: Gumbel-noise draws per side")
    p.add_argument("--epochs", type=int, default=1, help="spread: epochs per draw")
    add_recipe_arguments(p)
    p.add_argument("--out", default="bench/results/sensitivity-cpu.json")
    p.add_argument("--plot", default="docs/images/sensitivity.png")
    args = p.parse_args(argv)
    run_header = header(p, args, argv)
    earlier = _earlier(args.out, args)
    result: dict[str, Any] = {
        **run_header,
        "divergence": earlier.get("divergence", []),
        "spread": {side: earlier.get("spread", {}).get(side, {}) for side in SIDES},
    }

    def save() -> None:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1))

    config = make_config(args.depth, args.seed, args.epochs, args)
    if len(result["divergence"]) < args.steps:
        print(f"ConvNet-AIG {args.depth}: divergence over {args.steps} steps", flush=True)
        result["divergence"] = divergence(config, args.steps)
        save()
    result["divergence"] = result["divergence"][: args.steps]
    for side, run in zip(SIDES, (spread_ours, spread_reference), strict=True):
        for draw in range(args.draws):
            if str(draw) in result["spread"][side]:
                continue
            print(f"ConvNet-AIG {args.depth}: {side}, noise draw {draw}", flush=True)
            start = time.perf_counter()
            record = run(config, draw)
            record["seconds"] = round(time.perf_counter() - start, 1)
            result["spread"][side][str(draw)] = record
            save()
        measured = result["spread"][side]
        result["spread"][side] = {str(d): measured[str(d)] for d in range(args.draws)}
    print(tables(result))
    plot(result, args.plot)
    print(f"wrote {args.out} and {args.plot}")
    return result


if __name__ == "__main__":
    main()
