"""Per-block parameter and MAC table of a registered model.

Usage::

    python -m aig_jax.summary resnet50 --schedule resnet50_reference --t 0.5
    python -m aig_jax.summary resnet110_cifar --gated --json
    python -m aig_jax.summary resnet110_cifar --target-rates 0.7
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

from aig_jax.model.flops import ModelCost, model_cost
from aig_jax.model.resnet import DEFAULT_NUM_CLASSES, MODELS, build_model, num_blocks
from aig_jax.model.schedules import (
    GATE_RATE_ONE_BLOCKS,
    default_rate_one_blocks,
    gated_flags,
    target_rates,
)


def summarize(
    name: str,
    rates: Sequence[float],
    *,
    image_size: int,
    num_classes: int | None = None,
    gate_rate_one_blocks: str | None = None,
) -> dict[str, Any]:
    """Machine-readable summary: totals and one entry per block.

    Blocks of rate 1 keep their gates or not as ``gate_rate_one_blocks`` says (default
    :func:`~aig_jax.model.schedules.default_rate_one_blocks` of ``rates``).

    Keys: ``model``, ``image_size``, ``params``, ``gate_params``, ``macs`` (all blocks run),
    ``expected_macs`` (blocks run at their target rates), ``blocks`` (list of dicts).
    """
    rate_one = gate_rate_one_blocks or default_rate_one_blocks(rates)
    model = build_model(name, num_classes=num_classes, gated=gated_flags(rates, rate_one))
    cost: ModelCost = model_cost(model, image_size)
    blocks = []
    expected = float(cost.fixed_macs)
    for info, block, rate in zip(model.block_infos(), cost.blocks, rates, strict=True):
        expected += rate * block.branch_macs
        blocks.append(
            {
                "name": block.name,
                "stage": info.stage,
                "in_features": info.in_features,
                "out_features": info.out_features,
                "strides": info.strides,
                "downsampling": block.downsampling,
                "gated": block.gated,
                "target_rate": rate,
                "params": block.params,
                "gate_params": block.gate_params,
                "macs": block.macs,
                "branch_macs": block.branch_macs,
            }
        )
    return {
        "model": name,
        "image_size": image_size,
        "num_classes": model.num_classes,
        "params": cost.params,
        "gate_params": cost.gate_params,
        "macs": cost.macs,
        "fixed_macs": cost.fixed_macs,
        "expected_macs": expected,
        "blocks": blocks,
    }


def format_table(summary: dict[str, Any]) -> str:
    """The summary as an aligned text table with totals."""
    head = f"{'#':>3} {'block':<16} {'in→out':>11} {'s':>1} {'gate':>4} {'target':>6} "
    head += f"{'params':>11} {'MMACs':>9}"
    lines = [head, "-" * len(head)]
    for i, b in enumerate(summary["blocks"]):
        gate = "yes" if b["gated"] else "-"
        io = f"{b['in_features']}→{b['out_features']}"
        lines.append(
            f"{i:>3} {b['name']:<16} {io:>11} {b['strides']:>1} {gate:>4} "
            f"{b['target_rate']:>6.2f} {b['params']:>11,} {b['macs'] / 1e6:>9.2f}"
        )
    lines.append("-" * len(head))
    lines.append(
        f"{summary['model']} at {summary['image_size']}², {summary['num_classes']} classes: "
        f"{summary['params']:,} params ({summary['gate_params']:,} in gates), "
        f"{summary['macs'] / 1e9:.3f} GMACs with every block, "
        f"{summary['expected_macs'] / 1e9:.3f} GMACs at the target rates"
    )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit status."""
    parser = argparse.ArgumentParser(
        prog="python -m aig_jax.summary", description="Per-block params and MACs of a model."
    )
    parser.add_argument("model", help=f"one of {MODELS.names()}")
    parser.add_argument(
        "--gated", action="store_true", help="gate every block, target --t (default 0.5)"
    )
    parser.add_argument("--t", type=float, default=None, help="target rate t for schedules")
    parser.add_argument("--schedule", default=None, help="a schedule name, e.g. uniform")
    parser.add_argument(
        "--target-rates", type=float, nargs="+", default=None, help="one rate or one per block"
    )
    parser.add_argument(
        "--gate-rate-one-blocks",
        choices=GATE_RATE_ONE_BLOCKS,
        help="keep the gates of rate-1 blocks (default, as the configs) or drop them (the "
        "default when no block has a rate below 1)",
    )
    parser.add_argument("--image-size", type=int, default=None, help="default 32 / 224")
    parser.add_argument("--num-classes", type=int, default=None)
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)
    try:
        n = num_blocks(args.model)
        if args.target_rates is not None:
            given = args.target_rates
            rates = target_rates(given * n if len(given) == 1 else given, n)
        elif args.schedule is not None:
            rates = target_rates(args.schedule, n, 1.0 if args.t is None else args.t)
        elif args.gated:
            rates = target_rates("uniform", n, 0.5 if args.t is None else args.t)
        else:
            rates = target_rates("ungated", n)
        cifar = DEFAULT_NUM_CLASSES.get(args.model) == 10
        size = args.image_size or (32 if cifar else 224)
        summary = summarize(
            args.model,
            rates,
            image_size=size,
            num_classes=args.num_classes,
            gate_rate_one_blocks=args.gate_rate_one_blocks,
        )
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=1) if args.json else format_table(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
