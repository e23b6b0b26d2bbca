"""The evaluators a config lists in ``config.evals``, built for one model and run on variables.

As in big_vision, a config names its evaluators: ``config.evals`` maps a name to a dict holding
the evaluator's ``type`` (a name in :data:`EVALUATORS`) and its options, e.g. ::

    {"argmax": {"type": "classification", "mode": "argmax"},
     "attack": {"type": "attack", "mode": "argmax", "epsilons": (2, 8)}}

The options are the keyword arguments of the evaluator classes of
:mod:`aig_jax.eval.evaluators`: ``classification`` (``mode``, ``seeds``), ``calibration``
(``limit``, ``split``), ``gate_statistics`` (``mode``, ``grid_size``) and ``attack`` (``mode``,
``epsilons``, ``steps``, ``jpeg_quality``). A ``mode`` left out is the first classification
entry's (argmax when there is none). ``during_training`` (default True) says whether the training
loop runs an entry every ``config.eval_every_epochs``; ``eval.py`` runs them all. The thresholds
of the "calibrated" mode come from the config's one ``calibration`` entry, fitted on the
variables being evaluated whenever an evaluator of the run uses that mode. A model without gates
is evaluated once, in argmax mode (every mode would agree).
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import numpy as np

from aig_jax.errors import ConfigError
from aig_jax.eval import gate_stats
from aig_jax.eval.evaluators import (
    Attack,
    Calibration,
    Classification,
    EvalContext,
    GateStatistics,
    class_layer_plot,
)
from aig_jax.model.gates import GATE_MODES
from aig_jax.registry import Registry


class Evaluator(Protocol):
    """What an evaluator type builds: ``run(variables)`` returns JSON-ready metrics."""

    def run(self, variables: Any) -> dict[str, Any]: ...


#: Evaluator types by name. A type is called as ``cls(ctx, **options)``, with ``thresholds``
#: (the calibrated mode's, else None) and ``output_dir`` (where to draw) when it takes them.
EVALUATORS: Registry[Callable[..., Evaluator]] = Registry("evaluator type")
EVALUATORS.register("classification", Classification)
EVALUATORS.register("calibration", Calibration)
EVALUATORS.register("gate_statistics", GateStatistics)
EVALUATORS.register("attack", Attack)

#: The entry key that keeps an evaluator out of the training loop when False.
DURING_TRAINING = "during_training"

#: Types of which a config lists at most one: the calibrated mode's thresholds, and the
#: report's analysis and attack sections.
ONE_OF = ("calibration", "gate_statistics", "attack")

#: The order in which reports list gate modes: deterministic, sampled, every block, calibrated.
MODE_ORDER = ("argmax", "sample", "open", "calibrated")

#: Arguments the suite supplies itself rather than the config.
_SUPPLIED = ("ctx", "thresholds", "output_dir")


def _options(kind: str) -> list[str]:
    """The option names of the evaluator type ``kind``: its keyword arguments."""
    params = inspect.signature(EVALUATORS.get(kind)).parameters
    return [n for n, p in params.items() if n not in _SUPPLIED and p.kind != p.VAR_KEYWORD]


def check_evals(evals: Any, where: str = "config.evals") -> None:
    """Raise :class:`ConfigError` naming the first entry of ``evals`` (name → entry) whose type,
    option names, gate mode or ``during_training`` is not valid, or the calibrated mode without
    a calibration entry. Option values are checked when :class:`Evaluators` builds them."""
    if not hasattr(evals, "items"):
        raise ConfigError(f"{where} = {evals!r}: expected a dict of evaluators by name")
    for name, entry in evals.items():
        at = f"{where}.{name}"
        if not hasattr(entry, "items"):
            raise ConfigError(f"{at} = {entry!r}: expected a dict with a 'type' and options")
        kind = entry.get("type")
        if kind not in EVALUATORS:
            raise ConfigError(f"{at}.type = {kind!r}: expected one of {EVALUATORS.names()}")
        for key in entry:
            if key not in ("type", DURING_TRAINING, *_options(kind)):
                raise ConfigError(
                    f"{at}.{key} is not an option of {kind!r} evaluators; expected one of "
                    f"{_options(kind)}"
                )
        if "mode" in entry and entry["mode"] not in GATE_MODES:
            raise ConfigError(f"{at}.mode = {entry['mode']!r}: expected one of {GATE_MODES}")
        if not isinstance(entry.get(DURING_TRAINING, True), bool):
            raise ConfigError(
                f"{at}.{DURING_TRAINING} = {entry[DURING_TRAINING]!r}: expected a bool"
            )
        if kind == "calibration" and DURING_TRAINING in entry:
            raise ConfigError(
                f"{at}.{DURING_TRAINING}: a calibration runs whenever an evaluator of the run "
                "uses the calibrated mode"
            )
    for kind in ONE_OF:
        names = [n for n, e in evals.items() if e["type"] == kind]
        if len(names) > 1:
            raise ConfigError(
                f"{where} lists {len(names)} {kind!r} evaluators {names}: one at most"
            )
    calibrated = [n for n, e in evals.items() if e.get("mode") == "calibrated"]
    if calibrated and not any(e["type"] == "calibration" for e in evals.values()):
        raise ConfigError(
            f"{where}.{calibrated[0]}.mode = 'calibrated' needs an evaluator of type "
            f"'calibration' in {where}"
        )


def ordered(evals: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """``evals`` as plain dicts in the order reports use: classification entries first, by
    :data:`MODE_ORDER` and then by name, the others after them in their given order (a
    ``ConfigDict`` lists its keys sorted)."""

    def key(item: tuple[str, dict[str, Any]]) -> tuple[int, int, str]:
        name, entry = item
        if entry.get("type") != "classification":
            return (1, 0, "")
        mode = entry.get("mode")
        return (0, MODE_ORDER.index(mode) if mode in MODE_ORDER else len(MODE_ORDER), name)

    return dict(sorted(_plain(evals).items(), key=key))


def _plain(evals: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """``evals`` (a dict or ``ConfigDict`` of entries) as a dict of plain dicts."""
    return {n: e.to_dict() if hasattr(e, "to_dict") else dict(e) for n, e in evals.items()}


def _ungated(entries: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The entries for a model without gates: one argmax classification in place of the
    classification entries, argmax for the others, no calibration."""
    out: dict[str, dict[str, Any]] = {}
    if any(e["type"] == "classification" for e in entries.values()):
        out["argmax"] = {"type": "classification", "mode": "argmax"}
    for name, entry in entries.items():
        if entry["type"] not in ("classification", "calibration"):
            out[name] = {**entry, "mode": "argmax"} if "mode" in entry else entry
    return out


class Evaluators:
    """The evaluators of one model that ``evals`` (name → entry, see the module) lists, run in
    its order (see :func:`ordered`).

    Built once: the entries are checked, and each evaluator is built once with its options so
    that a bad value stops the caller at start (:class:`ConfigError` naming the entry). With
    ``during_training`` only the entries the training loop runs are kept. :meth:`run` builds
    them anew on each call, with the thresholds fitted on the variables it evaluates.
    """

    def __init__(
        self, ctx: EvalContext, evals: Mapping[str, Any], *, during_training: bool = False
    ) -> None:
        check_evals(evals)
        entries = _plain(evals)
        if during_training:
            entries = {n: e for n, e in entries.items() if e.get(DURING_TRAINING, True)}
        for entry in entries.values():
            entry.pop(DURING_TRAINING, None)
        if not any(ctx.spec.gated):
            entries = _ungated(entries)
        first = next((e["mode"] for e in entries.values() if e["type"] == "classification"), None)
        for entry in entries.values():
            if "mode" in _options(entry["type"]) and "mode" not in entry:
                entry["mode"] = first or "argmax"
        self.ctx, self.entries = ctx, entries
        users = [e for e in entries.values() if e.get("mode") == "calibrated"]
        self.calibration = next(
            (n for n, e in entries.items() if users and e["type"] == "calibration"), None
        )
        placeholder = np.full((len(ctx.spec.rates),), 0.5, np.float32)
        for name in entries:
            try:
                self._build(name, placeholder, "")
            except (TypeError, ValueError) as err:
                raise ConfigError(f"config.evals.{name}: {err}") from None
        self.last: dict[str, Evaluator] = {}

    def names(self, kind: str) -> list[str]:
        """The names of the entries of type ``kind``, in order."""
        return [n for n, e in self.entries.items() if e["type"] == kind]

    def _build(self, name: str, thresholds: np.ndarray | None, output_dir: str) -> Evaluator:
        options = dict(self.entries[name])
        cls = EVALUATORS.get(options.pop("type"))
        params = inspect.signature(cls).parameters
        if "thresholds" in params and options.get("mode") == "calibrated":
            options["thresholds"] = thresholds
        if "output_dir" in params:
            options["output_dir"] = output_dir
        return cls(self.ctx, **options)

    def run(self, variables: Any, output_dir: str) -> dict[str, dict[str, Any]]:
        """Each evaluator's result by name, for ``variables``; the calibration first, and only
        when an evaluator uses the calibrated mode. Evaluators that draw write into
        ``output_dir``."""
        results: dict[str, dict[str, Any]] = {}
        thresholds = None
        if self.calibration is not None:
            results[self.calibration] = self._build(self.calibration, None, "").run(variables)
            thresholds = np.asarray(results[self.calibration]["thresholds"], np.float32)
        others = [n for n in self.entries if self.entries[n]["type"] != "calibration"]
        self.last = {n: self._build(n, thresholds, output_dir) for n in others}
        for name, evaluator in self.last.items():
            results[name] = evaluator.run(variables)
        return results

    def save_class_layer_rates(self, directory: str, step: int) -> None:
        """Save each classification of the last :meth:`run` as its class × block execution
        rates [K, L]: ``class_layer_<name>_step<step>.npy`` and a heatmap ``.png``."""
        os.makedirs(directory, exist_ok=True)
        for name, evaluator in self.last.items():
            if not isinstance(evaluator, Classification) or evaluator.predictions is None:
                continue
            preds = evaluator.predictions
            matrix = gate_stats.class_layer_rates(
                preds.gates, preds.labels, self.ctx.spec.num_classes
            )
            base = os.path.join(directory, f"class_layer_{name}_step{step}")
            np.save(base + ".npy", matrix)
            title = f"execution rate per class and block ({evaluator.mode} gates, step {step})"
            class_layer_plot(self.ctx, matrix, base + ".png", title)
