"""Per-block target execution rates.

A schedule maps (number of blocks L, target rate t) to L rates in [0, 1]. Blocks whose rate is
below 1 are gated and pulled towards their rate by :func:`aig_jax.train.losses.target_rate_loss`;
a block whose rate is 1 is left out of that loss and keeps its gate or has none
(:data:`GATE_RATE_ONE_BLOCKS`). Forks add schedules with ``SCHEDULES.register``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from aig_jax.registry import Registry

Schedule = Callable[[int, float], list[float]]
SCHEDULES: Registry[Schedule] = Registry("target-rate schedule")


def _fixed_length(name: str, expected: int, num_blocks: int) -> None:
    if num_blocks != expected:
        raise ValueError(f"schedule {name!r} is for {expected} blocks, the model has {num_blocks}")


@SCHEDULES.decorator("uniform")
def uniform(num_blocks: int, t: float) -> list[float]:
    """Every block gated with target ``t`` (the CIFAR recipe)."""
    return [t] * num_blocks


@SCHEDULES.decorator("ungated")
def ungated(num_blocks: int, t: float) -> list[float]:
    """No block gated: the plain ResNet."""
    del t
    return [1.0] * num_blocks


@SCHEDULES.decorator("resnet50_reference")
def resnet50_reference(num_blocks: int, t: float) -> list[float]:
    """The reference's ResNet-50 schedule: ``[1, 1, 0.8, 1, t, t, t, 1, t×5, 1, 0.7, 1]``."""
    _fixed_length("resnet50_reference", 16, num_blocks)
    return [1, 1, 0.8, 1, t, t, t, 1, t, t, t, t, t, 1, 0.7, 1]


@SCHEDULES.decorator("resnet101_reference")
def resnet101_reference(num_blocks: int, t: float) -> list[float]:
    """The reference's ResNet-101 schedule: eight ungated blocks, then ``t`` for the other 25."""
    _fixed_length("resnet101_reference", 33, num_blocks)
    return [1.0] * 8 + [t] * 25


def target_rates(
    schedule: str | Sequence[float], num_blocks: int, t: float = 1.0
) -> tuple[float, ...]:
    """Resolve a schedule name (with rate ``t``) or an explicit list into L validated rates.

    Raises ``ValueError`` for an unknown name, a list of the wrong length, or a rate outside
    [0, 1].
    """
    if not 0.0 <= t <= 1.0:
        raise ValueError(f"target rate t must lie in [0, 1], got {t}")
    if isinstance(schedule, str):
        rates = SCHEDULES.get(schedule)(num_blocks, t)
    else:
        rates = list(schedule)
    if len(rates) != num_blocks:
        raise ValueError(
            f"target-rate list has {len(rates)} entries but the model has {num_blocks} blocks"
        )
    for i, r in enumerate(rates):
        if not 0.0 <= float(r) <= 1.0:
            raise ValueError(f"target rate of block {i} must lie in [0, 1], got {r}")
    return tuple(float(r) for r in rates)


#: What becomes of the gate of a block with target rate 1: "keep" it (the reference: it samples
#: and is trained by the cross-entropy alone, the target-rate loss leaving the block out) or
#: "drop" it (the block always executes and has no gate parameters).
GATE_RATE_ONE_BLOCKS = ("keep", "drop")


def default_rate_one_blocks(rates: Sequence[float]) -> str:
    """The :data:`GATE_RATE_ONE_BLOCKS` choice of tools not told one: "keep", as the reference
    and the configs' default, unless no block has a rate below 1 (a plain ResNet): "drop"."""
    return "keep" if any(float(r) < 1.0 for r in rates) else "drop"


def gated_flags(rates: Sequence[float], rate_one_blocks: str) -> tuple[bool, ...]:
    """Which blocks carry a gate: every block with ``rate_one_blocks="keep"``, those whose
    target rate is below 1 with "drop" (see :data:`GATE_RATE_ONE_BLOCKS`)."""
    if rate_one_blocks not in GATE_RATE_ONE_BLOCKS:
        raise ValueError(
            f"gate_rate_one_blocks must be one of {GATE_RATE_ONE_BLOCKS}, got {rate_one_blocks!r}"
        )
    return tuple(rate_one_blocks == "keep" or float(r) < 1.0 for r in rates)
