"""Convert PyTorch ConvNet-AIG / torchvision checkpoints to Orbax checkpoints, and back.

PyTorch → Orbax (``eval.py --checkpoint DST`` evaluates the result; training can start from it)::

  python -m aig_jax.convert model_best.pth.tar DST --model resnet110_cifar
  python -m aig_jax.convert resnet50.pth DST --model resnet50 --schedule resnet50_reference \\
      --target-rate 0.5        # torchvision weights, gates freshly initialised

Orbax → PyTorch (a reference-code state dict, saved as ``{"state_dict": ...}``)::

  python -m aig_jax.convert --to-torch DST converted.pth

The source naming (reference or torchvision) is detected from the head's key (``linear`` or
``fc``) unless ``--from`` is given; the number of classes is read from the head. Every block
is gated at the reference's default rate (0.6 for CIFAR models, 0.7 otherwise) unless a schedule
or rates say otherwise; blocks of rate 1 keep their gates as in the reference and the configs
(``--gate-rate-one-blocks drop`` leaves them ungated). Needs PyTorch: ``pip install -e .[torch]``.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping, Sequence

import numpy as np

from aig_jax.checkpoint import CheckpointError, load_variables, read_meta, save_variables
from aig_jax.errors import ConfigError, UserError, WorkdirError, exit_on_user_error
from aig_jax.interop.pytorch import (
    Converted,
    Naming,
    convert_reference_state_dict,
    convert_torchvision_state_dict,
    load_torch_state_dict,
    save_torch_state_dict,
    to_reference_state_dict,
)
from aig_jax.model.resnet import DEFAULT_NUM_CLASSES, ResNet, num_blocks
from aig_jax.model.schedules import (
    GATE_RATE_ONE_BLOCKS,
    default_rate_one_blocks,
    target_rates,
)
from aig_jax.model.spec import ModelSpec
from aig_jax.model.variables import abstract_variables


def default_target_rate(name: str) -> float:
    """The reference's default target rate t: 0.6 for CIFAR models, 0.7 for ImageNet ones."""
    return 0.6 if name.endswith("_cifar") else 0.7


def detect_naming(state_dict: Mapping[str, np.ndarray]) -> Naming:
    """The naming of ``state_dict`` from its head: ``linear`` reference, ``fc`` torchvision."""
    if "linear.weight" in state_dict:
        return "reference"
    if "fc.weight" in state_dict:
        return "torchvision"
    raise ConfigError(
        "cannot tell the naming: the state dict has neither 'linear.weight' (reference) nor "
        "'fc.weight' (torchvision); pass --from"
    )


def _rates(text: str) -> list[float]:
    try:
        return [float(r) for r in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated numbers such as 1,1,0.8, got {text!r}"
        ) from None


def to_orbax(
    src: str,
    dst: str,
    model: str,
    *,
    naming: Naming | None = None,
    schedule: str | Sequence[float] = "uniform",
    target_rate: float | None = None,
    seed: int = 0,
    gate_rate_one_blocks: str | None = None,
) -> tuple[ModelSpec, Converted]:
    """Convert the PyTorch file ``src`` into an Orbax checkpoint (step 0) in directory ``dst``.

    ``model`` is a registry name; ``schedule`` a schedule name or one rate per block, with
    rate ``target_rate`` (default :func:`default_target_rate`); blocks of rate 1 keep their gates
    (``gate_rate_one_blocks="keep"``, as the reference and the configs) or are ungated ("drop");
    the default is :func:`~aig_jax.model.schedules.default_rate_one_blocks` of the rates.
    ``naming`` defaults to :func:`detect_naming`. Returns the stored spec and the conversion.
    """
    if os.path.exists(dst) and os.listdir(dst):
        raise WorkdirError(f"{dst} is not empty; convert into a new directory")
    state_dict = load_torch_state_dict(src)
    naming = naming or detect_naming(state_dict)
    head = state_dict.get("linear.weight" if naming == "reference" else "fc.weight")
    t = default_target_rate(model) if target_rate is None else target_rate
    rates = target_rates(schedule, num_blocks(model), t)
    num_classes = DEFAULT_NUM_CLASSES[model] if head is None else int(head.shape[0])
    rate_one = gate_rate_one_blocks or default_rate_one_blocks(rates)
    spec = ModelSpec(model, num_classes, rates, gate_rate_one_blocks=rate_one)
    net = spec.build()
    if not isinstance(net, ResNet):
        raise ConfigError(
            f"model {model!r} is not an aig_jax.model.resnet.ResNet; it cannot be converted"
        )
    if naming == "reference":
        converted = convert_reference_state_dict(state_dict, net)
    else:
        converted = convert_torchvision_state_dict(state_dict, net, seed=seed)
    meta = {"model": spec.to_json(), "source": os.path.abspath(src), "converted_from": naming}
    save_variables(dst, 0, converted.variables, meta)
    return spec, converted


def to_torch(src: str, dst: str) -> tuple[ModelSpec, tuple[str, ...]]:
    """Write the Orbax checkpoint ``src`` (a workdir, checkpoints or step directory) to ``dst``.

    The file holds ``{"state_dict": ...}`` with reference keys (no ``module.`` prefix). Returns
    the checkpoint's spec and the blocks that were given an always-open gate (our ungated ones).
    """
    meta, directory, step = read_meta(src)
    if "model" not in meta:
        raise CheckpointError(f"checkpoint {directory} step {step} has no model spec in its meta")
    spec = ModelSpec.from_json(meta["model"])
    net = spec.build()
    if not isinstance(net, ResNet):
        raise ConfigError(f"model {spec.name!r} is not an aig_jax.model.resnet.ResNet")
    variables = load_variables(directory, step, abstract_variables(net))
    save_torch_state_dict(dst, to_reference_state_dict(variables, net))
    return spec, tuple(info.name for info in net.block_infos() if not info.gated)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m aig_jax.convert",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("src", help="PyTorch file (or, with --to-torch, an Orbax checkpoint)")
    parser.add_argument("dst", help="new Orbax checkpoint directory (or, with --to-torch, a file)")
    parser.add_argument("--to-torch", action="store_true", help="convert Orbax → PyTorch")
    parser.add_argument("--model", help="registry name, e.g. resnet110_cifar or resnet50")
    parser.add_argument(
        "--from", dest="naming", choices=["reference", "torchvision"], help="source naming"
    )
    parser.add_argument("--schedule", default="uniform", help="target-rate schedule name")
    parser.add_argument("--target-rate", type=float, help="t of the schedule")
    parser.add_argument(
        "--target-rates",
        type=_rates,
        help="one rate per block, e.g. 1,1,0.8,...; wins over --schedule",
    )
    parser.add_argument(
        "--gate-rate-one-blocks",
        choices=GATE_RATE_ONE_BLOCKS,
        help="keep the gates of rate-1 blocks (default, as the reference and the configs) or "
        "drop them (the default when no block has a rate below 1)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of fresh (torchvision) gates")
    return parser


def _run(args: argparse.Namespace) -> list[str]:
    """Do what the parsed command line asks; returns the lines to print."""
    if args.to_torch:
        spec, opened = to_torch(args.src, args.dst)
        lines = [f"wrote {spec.name} ({len(spec.rates)} blocks) to {args.dst}"]
        if opened:
            lines.append(f"always-open gates written for the ungated blocks {', '.join(opened)}")
        return lines
    spec, converted = to_orbax(
        args.src,
        args.dst,
        args.model,
        naming=args.naming,
        schedule=args.target_rates or args.schedule,
        target_rate=args.target_rate,
        seed=args.seed,
        gate_rate_one_blocks=args.gate_rate_one_blocks,
    )
    lines = [f"wrote {spec.name} ({len(spec.rates)} blocks, {sum(spec.gated)} gated) to {args.dst}"]
    if converted.dropped_gates:
        lines.append(
            "dropped the checkpoint's gates of the rate-1 blocks "
            f"{', '.join(converted.dropped_gates)}: they are ungated here and always execute"
        )
    if converted.initialised_gates:
        fresh = ", ".join(converted.initialised_gates)
        lines.append(f"initialised fresh gates (seed {args.seed}) in {fresh}")
    return lines


@exit_on_user_error
def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line ``argv`` (default ``sys.argv[1:]``); returns 0, or exits with one
    ``error: …`` line and status 2 on a bad input (see :func:`exit_on_user_error`)."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.to_torch and (args.model or args.target_rates or args.target_rate is not None):
        parser.error("--to-torch takes the model and its rates from the checkpoint")
    if not args.to_torch and args.model is None:
        parser.error("--model is required unless --to-torch is given")
    try:
        lines = _run(args)
    except (ImportError, OSError) as err:  # no PyTorch, or an unreadable file
        raise UserError(str(err)) from err
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
