"""Per-example predictions and gate decisions over a whole split, and their summary.

:func:`predict` runs the jit-compiled eval step over padded, masked batches, so every example
is seen exactly once whatever the batch size; :func:`summarize` turns the predictions into the
numbers the paper reports (errors, execution rates, realised MACs).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from aig_jax.errors import NonFiniteError
from aig_jax.eval import gate_stats
from aig_jax.eval.step import EvalStep
from aig_jax.model.flops import ModelCost
from aig_jax.sharding import shard_batch


@dataclasses.dataclass
class Predictions:
    """Host arrays over the N evaluated examples, in dataset order."""

    index: np.ndarray  # [N] example index in the split
    labels: np.ndarray  # [N]
    top: np.ndarray  # [N, k] classes by decreasing logit
    confidence: np.ndarray  # [N] max softmax probability
    loss: np.ndarray  # [N] cross-entropy
    gates: np.ndarray  # [N, L] decisions
    probs: np.ndarray  # [N, L] p(execute)
    images_per_sec: float = math.nan  # measured after the first batch (compilation excluded)

    @property
    def correct(self) -> np.ndarray:
        """[N] bool: top-1 prediction equals the label."""
        return self.top[:, 0] == self.labels


def predict(
    eval_step: EvalStep,
    variables: Mapping[str, Any],
    batches: Iterable[Mapping[str, np.ndarray]],
    mesh: jax.sharding.Mesh,
    *,
    gate_mode: str = "argmax",
    key: jax.Array | None = None,
    thresholds: np.ndarray | None = None,
    num_layers: int,
    total: int | None = None,
    desc: str = "eval",
    progress: bool = True,
) -> Predictions:
    """Evaluate every batch (each process's share with ``mask`` and ``index``) in one mode.

    ``key`` seeds "sample" mode (batch i uses ``fold_in(key, i)``); ``thresholds`` [L] are
    required for "calibrated". Returns the predictions of the unmasked examples, with the
    measured images/s of every batch after the first (NaN with a single batch). Raises
    :class:`~aig_jax.errors.NonFiniteError` when an example's outputs are not finite.
    """
    key = jax.random.key(0) if key is None else key
    thr = jnp.full((num_layers,), 0.5) if thresholds is None else jnp.asarray(thresholds)
    outputs: list[dict[str, np.ndarray]] = []
    pending = None
    show = progress and jax.process_index() == 0
    start = math.nan  # when the first batch (and its compilation) is done
    for i, batch in enumerate(tqdm(batches, total=total, desc=desc, disable=not show)):
        batch = shard_batch(batch, mesh)
        out = eval_step(variables, batch, jax.random.fold_in(key, i), gate_mode, thr)
        if pending is not None:  # fetch the previous batch while this one computes
            outputs.append(jax.device_get(pending))
            if i == 1:
                start = time.perf_counter()
        pending = out
    if pending is not None:
        outputs.append(jax.device_get(pending))
    timed = sum(int(np.sum(o["mask"])) for o in outputs[1:])
    seconds = time.perf_counter() - start
    if not outputs:
        raise ValueError("the evaluation split yielded no batches")
    cat = {
        k: np.concatenate(
            [np.asarray(o[k]) for o in outputs], axis=-1 if k in ("gates", "probs") else 0
        )
        for k in outputs[0]
    }
    keep = cat["mask"].astype(bool)
    _check_finite(cat, keep, gate_mode)
    return Predictions(
        index=cat["index"][keep],
        labels=cat["label"][keep],
        top=cat["top"][keep],
        confidence=cat["confidence"][keep],
        loss=cat["loss"][keep],
        gates=cat["gates"][:, keep].T,
        probs=cat["probs"][:, keep].T,
        images_per_sec=timed / seconds if timed else math.nan,
    )


def _check_finite(outputs: Mapping[str, np.ndarray], keep: np.ndarray, gate_mode: str) -> None:
    """Raise :class:`~aig_jax.errors.NonFiniteError` when the kept examples' losses,
    confidences or gate decisions and probabilities [L, N] hold NaN or infinity: every number
    summarised from them would be meaningless (a NaN decision counts as billions of blocks)."""
    finite = np.isfinite(outputs["loss"]) & np.isfinite(outputs["confidence"])
    for name in ("gates", "probs"):
        finite &= np.isfinite(outputs[name]).all(axis=0)
    bad = int(np.sum(keep & ~finite))
    if bad:
        raise NonFiniteError(
            f"the model's outputs are not finite (NaN or infinite logits or gate probabilities) "
            f"for {bad} of {int(keep.sum())} images in gate mode {gate_mode!r}; nothing is "
            "reported"
        )


def summarize(preds: Predictions, cost: ModelCost, num_classes: int) -> dict[str, Any]:
    """Errors (%), mean loss, per-block execution rates and realised MACs of ``preds``.

    ``realised_gmacs`` is the mean over images; ``macs_saving`` is relative to executing every
    block of the same model.
    """
    macs = np.asarray(cost.realised_macs(preds.gates.T))
    top5 = (preds.top == preds.labels[:, None]).any(axis=1)
    rates = gate_stats.layer_rates(preds.gates)
    return {
        "num_examples": len(preds.labels),
        "top1_error": float(100.0 * (1.0 - preds.correct.mean())),
        "top5_error": float(100.0 * (1.0 - top5.mean())),
        "loss": float(preds.loss.mean(dtype=np.float64)),  # huge losses overflow a float32 sum
        "layer_rates": [float(r) for r in rates],
        "mean_executed_blocks": float(gate_stats.executed_counts(preds.gates).mean()),
        "realised_gmacs": float(macs.mean() / 1e9),
        "realised_gmacs_std": float(macs.std() / 1e9),
        "full_gmacs": float(cost.macs / 1e9),
        "macs_saving": float(1.0 - macs.mean() / cost.macs),
        "images_per_sec": float(preds.images_per_sec),
        "num_classes": int(num_classes),
    }
