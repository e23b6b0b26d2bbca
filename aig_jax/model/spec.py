"""Everything needed to rebuild a model: stored in every checkpoint and derived from a config.

A :class:`ModelSpec` is the bridge between configs, checkpoints, evaluation and conversion:
``ModelSpec.from_config(config).build()`` gives the model that trains, and the same spec read
back from a checkpoint's metadata rebuilds it for evaluation, wherever it was trained.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import numpy as np

from aig_jax.model.resnet import build_model, num_blocks
from aig_jax.model.schedules import gated_flags, target_rates

#: (gate_rate_one_blocks, init) of a stored spec that names neither.
SPEC_WITHOUT_FIELDS = ("drop", "he_normal")


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """A registered model plus its per-block target rates.

    ``gate_rate_one_blocks`` says whether blocks of rate 1 keep their gate ("keep", the
    reference) or have none ("drop"); ``init`` is the initialisation scheme ("reference" or
    "he_normal"), which only matters when the model is created. The defaults are the configs'
    (``configs/default.py``) and :func:`build_model`'s.
    """

    name: str
    num_classes: int
    rates: tuple[float, ...]
    gate: str = "gumbel"
    gate_options: tuple[tuple[str, Any], ...] = ()
    dtype: str = "float32"
    gate_rate_one_blocks: str = "keep"
    init: str = "reference"

    @classmethod
    def from_config(cls, config: Any) -> ModelSpec:
        """Resolve ``config.model``, ``config.target_schedule``/``target_rate``/``target_rates``.

        An explicit ``config.target_rates`` list wins over the named schedule. Raises
        ``ValueError`` naming the fields when the rates do not fit the model.
        """
        schedule = list(config.target_rates) if config.target_rates else config.target_schedule
        try:
            rates = target_rates(schedule, num_blocks(config.model), float(config.target_rate))
        except ValueError as err:
            raise ValueError(f"config.target_rates/target_schedule: {err}") from err
        return cls(
            name=config.model,
            num_classes=int(config.dataset.num_classes),
            rates=rates,
            gate=config.gate,
            gate_options=tuple(sorted(dict(config.gate_options).items())),
            dtype=config.dtype,
            gate_rate_one_blocks=config.gate_rate_one_blocks,
            init=config.init,
        )

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ModelSpec:
        """Inverse of :meth:`to_json`.

        A spec without ``gate_rate_one_blocks`` or ``init`` describes a model whose rate-1
        blocks have no gate, initialised He-normal: those are what its checkpoint holds.
        """
        return cls(
            name=data["name"],
            num_classes=int(data["num_classes"]),
            rates=tuple(float(r) for r in data["rates"]),
            gate=data.get("gate", "gumbel"),
            gate_options=tuple(sorted(dict(data.get("gate_options", {})).items())),
            dtype=data.get("dtype", "float32"),
            gate_rate_one_blocks=data.get("gate_rate_one_blocks", SPEC_WITHOUT_FIELDS[0]),
            init=data.get("init", SPEC_WITHOUT_FIELDS[1]),
        )

    def to_json(self) -> dict[str, Any]:
        """A JSON-serialisable dict."""
        return {
            "name": self.name,
            "num_classes": self.num_classes,
            "rates": list(self.rates),
            "gate": self.gate,
            "gate_options": dict(self.gate_options),
            "dtype": self.dtype,
            "gate_rate_one_blocks": self.gate_rate_one_blocks,
            "init": self.init,
        }

    @property
    def gated(self) -> tuple[bool, ...]:
        """One flag per block: gated where the target rate is below 1, or everywhere when
        ``gate_rate_one_blocks`` is "keep"."""
        return gated_flags(self.rates, self.gate_rate_one_blocks)

    @property
    def targets(self) -> np.ndarray:
        """[L] float32 target rates, for the target-rate loss."""
        return np.asarray(self.rates, np.float32)

    def build(self, dtype: str | None = None) -> nn.Module:
        """The Flax model (optionally with another compute dtype, e.g. for evaluation)."""
        return build_model(
            self.name,
            num_classes=self.num_classes,
            gated=self.gated,
            gate=self.gate,
            gate_options=dict(self.gate_options),
            dtype=dtype or self.dtype,
            init=self.init,
        )

    def mismatch(self, other: ModelSpec) -> str | None:
        """Why ``other``'s weights cannot be loaded into this model, or None if they can.

        Weights are compatible when the architecture, class count, gate and set of gated
        blocks agree; target rates, compute dtype and initialisation may differ.
        """
        for field in ("name", "num_classes", "gate", "gated"):
            mine, theirs = getattr(self, field), getattr(other, field)
            if mine != theirs:
                return f"{field} differs: {theirs!r} in the checkpoint, {mine!r} in the config"
        return None
