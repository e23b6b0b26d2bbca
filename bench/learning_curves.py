"""Learning curves of our trainer against a PyTorch loop that follows the reference recipe.

    python -m bench.learning_curves [--depths 20 110] [--seeds 0 1] [--epochs 10 5] \
        [--data_dir ../shared/data/cifar10/mini] [--out bench/results/learning-curves-cpu.json] \
        [--plot docs/images/learning_curves.png]

For each depth (ConvNet-AIG ``resnet{depth}_cifar``, every block gated at t = 0.7) and seed,
both sides start from the same weights (ours, at the config's initialisation, loaded into the
reference architecture built in PyTorch: :mod:`tests.torch_reference`) and see the same batches
in the same order (our deterministic loader, augmented once, fed to both). Ours is
``train.py``'s loop (:func:`aig_jax.train.loop.train_and_evaluate`); theirs is the reference
``train.py``'s step (cross-entropy + λ·target-rate loss, SGD with momentum and weight decay on
every parameter) with its own Gumbel noise. After every epoch both are evaluated on the test
split with sampled gates (the reference's test-time gates): test error and the mean execution
rate over blocks, plus the epoch's mean training cross-entropy and execution rate. Prints a
table, writes JSON (after every run, so an interrupted run keeps what it measured; each run's
wall time, compiles included) and plots test error and execution rate against epoch, both
sides, every seed. Runs already in ``--out`` with the same depth, seed, side and epochs are
kept, so an interrupted or extended invocation only trains what is missing.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np

from aig_jax.data import make_source
from aig_jax.data.loader import eval_iterator, steps_per_epoch, train_iterator
from aig_jax.model.spec import ModelSpec
from aig_jax.model.variables import init_variables
from aig_jax.train.loop import train_and_evaluate
from aig_jax.train.metrics import read_metrics
from bench.table import write_json
from configs import default

MINI = Path(__file__).resolve().parents[2] / "shared/data/cifar10/mini"
SIDES = ("aig-jax", "reference")


def make_config(depth: int, seed: int, epochs: int, data_dir: str) -> Any:
    """The reference CIFAR recipe (SGD 0.1, momentum 0.9, wd 5e-4, λ = 2, t = 0.7) at batch
    128 on ``data_dir``, evaluated with sampled gates after every epoch; ``epochs`` (short: the
    learning rate stays 0.1, the reference decays it from epoch 150)."""
    c = default.get_config()
    c.model = f"resnet{depth}_cifar"
    c.target_rate = 0.7
    c.dataset.source = "npz"
    c.dataset.data_dir = data_dir
    c.batch_size = 128
    c.eval_batch_size = 500
    c.num_epochs = float(epochs)
    c.eval_every_epochs = 1.0
    c.evals = {"sample": {"type": "classification", "mode": "sample"}}
    c.seed = seed
    c.data_threads = 2
    c.log_every_steps = 1  # per-step records, grouped into epochs here
    c.checkpoint_every_steps = 10**9  # the final step only
    c.tensorboard = False
    c.progress = False
    return c


def run_ours(config: Any) -> list[dict[str, float]]:
    """Train with ``train.py``'s loop in a temporary workdir; one record per epoch."""
    with tempfile.TemporaryDirectory() as workdir:
        train_and_evaluate(config, workdir)
        train = read_metrics(workdir, "train")
        evals = read_metrics(workdir, "eval")
    out = []
    for e, ev in enumerate(evals, 1):
        records = [r for r in train if e - 1 < r["epoch"] <= e]
        ce, rates = [r["ce"] for r in records], [np.mean(r["gate_rates"]) for r in records]
        out.append(_epoch(e, ev["top1_error"], np.mean(ev["layer_rates"]), ce, rates))
    return out


def _epoch(
    epoch: int, test_error: float, test_rate: float, ce: list[float], rates: list[float]
) -> dict[str, float]:
    """One epoch's record: test error (%) and execution rate, and the means of the training
    steps' cross-entropies ``ce`` and execution ``rates``."""
    return {
        "epoch": epoch,
        "test_error": float(test_error),
        "test_rate": float(test_rate),
        "train_ce": float(np.mean(ce)),
        "train_rate": float(np.mean(rates)),
    }


def torch_images(torch: Any, image: np.ndarray) -> Any:
    """Images [B, H, W, C] as the torch tensor [B, C, H, W] the reference model reads."""
    return torch.from_numpy(np.ascontiguousarray(image.transpose(0, 3, 1, 2)))


def evaluate_torch(
    torch: Any, net: Any, blocks: int, config: Any, source: Any, gen: Any
) -> tuple[float, float]:
    """Test error (%) and mean execution rate of ``net`` (``blocks`` residual blocks) with
    sampled gates, BatchNorm in evaluation mode, over the whole test split."""
    from tests.torch_reference import torch_gumbel_noise

    net.eval()
    wrong, rates, count = 0, [], 0
    with torch.no_grad():
        for batch in eval_iterator(source, config.dataset, global_batch=500, num_threads=2):
            n = int(batch["mask"].sum())
            x = torch_images(torch, batch["image"][:n])
            noise = torch_gumbel_noise((blocks, n, 2), gen)
            logits, gates, _ = net(x, "sample", noise=noise)
            wrong += int((logits.argmax(1).numpy() != batch["label"][:n]).sum())
            rates.append(gates.sum(1).numpy())
            count += n
    return 100.0 * wrong / count, float(np.sum(rates, axis=0).mean() / count)


def run_reference(config: Any) -> list[dict[str, float]]:
    """The reference training loop in PyTorch from our initial weights on our batches; its
    Gumbel noise is drawn from a generator seeded with the config's seed."""
    import torch

    from tests import torch_reference as ref

    torch.manual_seed(config.seed)
    gen = torch.Generator().manual_seed(config.seed)
    spec = ModelSpec.from_config(config)
    model = spec.build()
    targets = [float(t) for t in spec.targets]
    net = ref.TorchResNet(False, model.stage_sizes, model.widths, "cifar", spec.num_classes)
    ref.load_variables(net, init_variables(model, (32, 32, 3), config.seed), model)
    optimizer = ref.make_optimizer(
        net, lr=config.learning_rate, momentum=config.momentum, weight_decay=config.weight_decay
    )
    train_source = make_source(config.dataset, config.dataset.train_split)
    test_source = make_source(config.dataset, config.dataset.eval_split)
    spe = steps_per_epoch(len(train_source), config.batch_size)
    batches = train_iterator(
        train_source, config.dataset, global_batch=config.batch_size, seed=config.seed,
        num_steps=int(config.num_epochs) * spe, num_threads=2,
    )  # fmt: skip
    out = []
    for epoch in range(1, int(config.num_epochs) + 1):
        ref.set_learning_rate(optimizer, ref.learning_rate(epoch, lr=config.learning_rate))
        ce, rate = [], []
        for _ in range(spe):
            batch = next(batches)
            x = torch_images(torch, batch["image"])
            noise = ref.torch_gumbel_noise((len(spec.targets), x.shape[0], 2), gen)
            parts = ref.train_step(
                net, optimizer, x, torch.from_numpy(batch["label"]).long(), targets,
                noise, lossfact=config.target_weight,
            )  # fmt: skip
            ce.append(float(parts["ce"]))
            rate.append(float(parts["gates"].mean()))
        error, test_rate = evaluate_torch(torch, net, len(spec.targets), config, test_source, gen)
        out.append(_epoch(epoch, error, test_rate, ce, rate))
    return out


def table(runs: list[dict[str, Any]]) -> str:
    """Markdown: per depth and epoch, each side's test error and rates (mean over seeds)."""
    lines = [
        "| model | epoch | test error % ours | reference | test exec. rate ours | reference "
        "| train CE ours | reference |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for depth in sorted({r["depth"] for r in runs}):

        def mean(side: str, epoch: int, key: str, depth: int = depth) -> str:
            vals = [
                r["epochs"][epoch - 1][key]
                for r in runs
                if r["depth"] == depth and r["side"] == side and len(r["epochs"]) >= epoch
            ]
            return f"{np.mean(vals):.3g}" if vals else "–"

        epochs = max(len(r["epochs"]) for r in runs if r["depth"] == depth)
        for e in range(1, epochs + 1):
            cells = [
                mean(side, e, key)
                for key in ("test_error", "test_rate", "train_ce")
                for side in SIDES
            ]
            lines.append(f"| ConvNet-AIG {depth} | {e} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(runs: list[dict[str, Any]], path: str) -> None:
    """Test error and test execution rate against epoch: one row per depth, both sides (colour)
    and every seed (one line each)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    depths = sorted({r["depth"] for r in runs})
    fig, axes = plt.subplots(len(depths), 2, figsize=(9, 3.2 * len(depths)), squeeze=False)
    colours = dict(zip(SIDES, ("tab:blue", "tab:orange"), strict=True))
    for row, depth in zip(axes, depths, strict=True):
        for r in (r for r in runs if r["depth"] == depth):
            epochs = [e["epoch"] for e in r["epochs"]]
            for ax, key in zip(row, ("test_error", "test_rate"), strict=True):
                label = f"{r['side']} seed {r['seed']}"
                ax.plot(epochs, [e[key] for e in r["epochs"]], color=colours[r["side"]],
                        marker="o", ms=3, alpha=0.8, label=label)  # fmt: skip
        row[0].set(title=f"ConvNet-AIG {depth}: test error", xlabel="epoch", ylabel="%")
        row[1].set(title=f"ConvNet-AIG {depth}: execution rate (test)", xlabel="epoch")
        row[1].legend(fontsize=7)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _earlier_runs(path: str) -> dict[tuple[int, int, str, int], dict[str, Any]]:
    """The runs already in ``path`` (an earlier or interrupted invocation), by (depth, seed,
    side, epochs): a rerun keeps them instead of training them again."""
    if not os.path.exists(path):
        return {}
    runs = json.loads(Path(path).read_text())["runs"]
    return {(r["depth"], r["seed"], r["side"], len(r["epochs"])): r for r in runs}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(
        "python -m bench.learning_curves", description=__doc__.split("\n")[0]
    )
    p.add_argument("--depths", type=int, nargs="+", default=[20, 110])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument(
        "--epochs", type=int, nargs="+", default=[10, 5], help="per depth (the last one repeats)"
    )
    p.add_argument("--data_dir", default=str(MINI))
    p.add_argument("--out", default="bench/results/learning-curves-cpu.json")
    p.add_argument("--plot", default="docs/images/learning_curves.png")
    args = p.parse_args(argv)
    if not os.path.isdir(args.data_dir):
        p.error(f"--data_dir {args.data_dir} does not exist (CIFAR-10 as *_train/test.npz)")
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    result: dict[str, Any] = {
        "command": " ".join(["python -m bench.learning_curves", *(argv or sys.argv[1:])]),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "device": f"{platform.processor() or platform.machine()} CPU ×{os.cpu_count()}",
        "jax": jax.__version__,
        "torch": torch.__version__,
        "args": vars(args),
        "runs": [],
    }
    done = _earlier_runs(args.out)
    for i, depth in enumerate(args.depths):
        epochs = args.epochs[min(i, len(args.epochs) - 1)]
        for seed in args.seeds:
            config = make_config(depth, seed, epochs, args.data_dir)
            for side, run in zip(SIDES, (run_ours, run_reference), strict=True):
                key = (depth, seed, side, epochs)
                if key in done:
                    print(f"ConvNet-AIG {depth}, seed {seed}: {side} (kept from {args.out})")
                    entry = done[key]
                else:
                    print(f"ConvNet-AIG {depth}, seed {seed}: {side}", flush=True)
                    start = time.perf_counter()
                    curve = run(config)
                    seconds = round(time.perf_counter() - start, 1)
                    entry = {"depth": depth, "seed": seed, "side": side, "seconds": seconds,
                             "epochs": curve}  # fmt: skip
                result["runs"].append(entry)
                write_json(args.out, result)
    print(table(result["runs"]))
    plot(result["runs"], args.plot)
    print(f"wrote {args.out} and {args.plot}")
    return result


if __name__ == "__main__":
    main()
