"""Evaluators: each measures one aspect of a model, ``evaluator.run(variables) -> metrics``.

In big_vision's spirit, an evaluator is built with what it needs and then run on variables (a
checkpoint's, or the training state's). They share an :class:`EvalContext`: the model, the
dataset config and evaluation split, the mesh, the batch size and the jit-compiled eval step.

- :class:`Classification`: errors, per-block execution rates and realised MACs in one gate
  mode (mean ± std over seeds for "sample");
- :class:`Calibration`: per-block thresholds fitted on training images, for "calibrated";
- :class:`GateStatistics`: which classes use which blocks, executed blocks against
  difficulty, the images that use the fewest and the most blocks, with plots;
- :class:`Attack`: FGSM (or BIM) accuracy and execution rates, with and without JPEG.

A config lists the evaluators to run in ``config.evals``; :mod:`aig_jax.eval.suite` builds and
runs that list, for the training loop and for ``eval.py``.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from aig_jax.data import Source, eval_iterator, eval_transform, make_source, num_eval_batches
from aig_jax.data.sources import ArraySource
from aig_jax.errors import ConfigError, DataError
from aig_jax.eval import calibration, gate_stats, plots
from aig_jax.eval.attacks import attack_split, jpeg, make_attack_step
from aig_jax.eval.predict import Predictions, predict, summarize
from aig_jax.eval.step import EvalStep, make_eval_step
from aig_jax.model.flops import ModelCost, model_cost
from aig_jax.model.gates import check_gate_mode
from aig_jax.model.spec import ModelSpec
from aig_jax.sharding import check_batch_size, compile_together

#: ``factory(model, mesh) -> EvalStep``: :func:`make_eval_step` or a drop-in faster step.
EvalStepFactory = Callable[[nn.Module, jax.sharding.Mesh], EvalStep]


def check_classes(source: Source, spec: ModelSpec, where: str) -> None:
    """Raise :class:`ConfigError` (a ``ValueError``) unless ``source`` has the model's number
    of classes."""
    if source.num_classes != spec.num_classes:
        raise ConfigError(
            f"{where} has {source.num_classes} classes but the checkpoint's model "
            f"{spec.name} predicts {spec.num_classes}"
        )


@dataclasses.dataclass(frozen=True)
class EvalContext:
    """What every evaluator of one model shares. Build it with :meth:`create`."""

    model: nn.Module
    spec: ModelSpec
    dataset: Any  # the dataset config: sources, splits, preprocessing, class names
    mesh: jax.sharding.Mesh
    eval_step: EvalStep
    source: Source  # the evaluation split
    cost: ModelCost
    batch_size: int  # global
    limit: int | None = None  # evaluate only the first ``limit`` examples
    seed: int = 0  # of sampled gates and attacks
    progress: bool = True

    @classmethod
    def create(
        cls,
        model: nn.Module,
        spec: ModelSpec,
        dataset: Any,
        mesh: jax.sharding.Mesh,
        *,
        batch_size: int,
        limit: int | None = None,
        seed: int = 0,
        progress: bool = True,
        eval_step_factory: EvalStepFactory = make_eval_step,
    ) -> EvalContext:
        """Check the split ``dataset.eval_split`` (not empty, the model's classes) and the
        global ``batch_size``, and compile nothing yet."""
        source = make_source(dataset, dataset.eval_split)
        if len(source) == 0:
            raise DataError(
                f"evaluation split {dataset.eval_split!r} of dataset {dataset.get('name')!r} "
                f"(source {dataset.source!r}) is empty"
            )
        check_classes(source, spec, f"dataset split {dataset.eval_split!r}")
        cost = model_cost(model, dataset.image_size)
        check_batch_size(batch_size, mesh)
        step = compile_together(eval_step_factory(model, mesh), "eval_step")
        return cls(
            model, spec, dataset, mesh, step, source, cost, batch_size, limit, seed, progress
        )

    @property
    def num_examples(self) -> int:
        """How many examples of the evaluation split are evaluated."""
        return min(self.limit or len(self.source), len(self.source))

    def predict(
        self,
        variables: Any,
        mode: str,
        *,
        source: Source | None = None,
        dataset: Any = None,
        limit: int | None = None,
        seed: int = 0,
        thresholds: np.ndarray | None = None,
        desc: str = "",
    ) -> Predictions:
        """Predictions of one pass over ``source`` (default: the evaluation split, with
        ``dataset`` preprocessing, default the context's) in gate mode ``mode``."""
        source = self.source if source is None else source
        limit = self.limit if limit is None else limit
        dataset = self.dataset if dataset is None else dataset
        return predict(
            self.eval_step,
            variables,
            eval_iterator(source, dataset, global_batch=self.batch_size, limit=limit),
            self.mesh,
            gate_mode=mode,
            key=jax.random.key(self.seed + seed),
            thresholds=thresholds,
            num_layers=len(self.spec.rates),
            total=num_eval_batches(len(source), self.batch_size, limit),
            desc=desc or f"eval {mode}",
            progress=self.progress,
        )


def _needs_thresholds(mode: str, thresholds: np.ndarray | None) -> None:
    check_gate_mode(mode)
    if mode == "calibrated" and thresholds is None:
        raise ValueError("gate mode 'calibrated' needs thresholds: run Calibration first")


def _seed_statistics(summaries: list[dict[str, Any]]) -> dict[str, Any]:
    """The first seed's summary with scalars and layer rates replaced by their mean over seeds,
    and their standard deviations under ``seed_std``."""
    out = dict(summaries[0])
    out["seed_std"] = {}
    for key, value in summaries[0].items():
        if isinstance(value, float) or key == "layer_rates":
            values = np.asarray([s[key] for s in summaries], np.float64)
            mean, std = values.mean(axis=0), values.std(axis=0)
            out[key] = mean.tolist() if values.ndim > 1 else float(mean)
            out["seed_std"][key] = std.tolist() if values.ndim > 1 else float(std)
    out["seeds"] = len(summaries)
    return out


class Classification:
    """Top-1/top-5 errors, loss, per-block execution rates and realised MACs in one gate mode.

    In mode "sample" the split is evaluated with ``seeds`` noise seeds and the summary holds
    their means, with standard deviations under ``seed_std``. After :meth:`run`,
    ``predictions`` holds the (first seed's) per-example predictions.
    """

    def __init__(
        self,
        ctx: EvalContext,
        mode: str,
        *,
        seeds: int = 1,
        thresholds: np.ndarray | None = None,
    ) -> None:
        _needs_thresholds(mode, thresholds)
        if seeds < 1:
            raise ValueError(f"seeds must be >= 1, got {seeds}")
        self.ctx, self.mode, self.thresholds = ctx, mode, thresholds
        self.seeds = seeds if mode == "sample" else 1
        self.predictions: Predictions | None = None

    def run(self, variables: Any) -> dict[str, Any]:
        """``gate_mode`` and the summary (see :func:`aig_jax.eval.predict.summarize`)."""
        runs = [
            self.ctx.predict(variables, self.mode, seed=s, thresholds=self.thresholds)
            for s in range(self.seeds)
        ]
        self.predictions = runs[0]
        summaries = [summarize(p, self.ctx.cost, self.ctx.spec.num_classes) for p in runs]
        summary = _seed_statistics(summaries) if self.mode == "sample" else summaries[0]
        return {"gate_mode": self.mode, **summary}


class Calibration:
    """Thresholds [L] fitted on ``limit`` training images (split ``split``, default the
    dataset's train split) so that each block's deterministic rate equals its sampled rate."""

    def __init__(self, ctx: EvalContext, *, split: str | None = None, limit: int = 10_000):
        self.ctx = ctx
        self.split = split or ctx.dataset.train_split
        self.limit = limit

    def run(self, variables: Any) -> dict[str, Any]:
        """``thresholds`` [L] and what the fit saw: split, examples, sampled, calibrated and
        argmax rates [L] on those images."""
        source = make_source(self.ctx.dataset, self.split)
        preds = self.ctx.predict(
            variables,
            "sample",
            source=source,
            limit=self.limit or len(source),
            seed=1_000,
            desc=f"calibrate on {self.split}",
        )
        sampled = gate_stats.layer_rates(preds.gates)
        thresholds = calibration.fit_thresholds(preds.probs, sampled)
        argmax = np.full_like(thresholds, 0.5)
        return {
            "split": self.split,
            "num_examples": len(preds.labels),
            "thresholds": thresholds.tolist(),
            "sampled_rates": sampled.tolist(),
            "calibrated_rates": calibration.rates_under(preds.probs, thresholds).tolist(),
            "argmax_rates": calibration.rates_under(preds.probs, argmax).tolist(),
        }


def class_layer_plot(
    ctx: EvalContext,
    matrix: np.ndarray,
    path: str,
    title: str,
    *,
    class_names: list[str] | None = None,
) -> None:
    """Draw the class × block execution rates ``matrix`` [K, L] of the context's model as a
    heatmap (PNG at ``path``), its blocks named and the ungated ones marked."""
    plots.class_layer_heatmap(
        matrix,
        path,
        class_names=class_names,
        block_names=[b.name for b in ctx.cost.blocks],
        ungated=[not b.gated for b in ctx.cost.blocks],
        title=title,
    )


def _nan_to_none(values: np.ndarray) -> list[float | None]:
    return [None if math.isnan(v) else float(v) for v in np.asarray(values, np.float64)]


class GateStatistics:
    """The inference graphs of one gate mode: per-class execution rates (classes clustered by
    their gate patterns), the classes that use each block most and least, executed blocks
    against accuracy and confidence, and the images that use the fewest and the most blocks.

    :meth:`run` also draws them as PNGs in ``output_dir`` (file names under ``plots``); every
    process must run it, process 0 draws.
    """

    def __init__(
        self,
        ctx: EvalContext,
        mode: str,
        output_dir: str,
        *,
        thresholds: np.ndarray | None = None,
        grid_size: int = 8,
    ) -> None:
        _needs_thresholds(mode, thresholds)
        self.ctx, self.mode, self.output_dir = ctx, mode, output_dir
        self.thresholds, self.grid_size = thresholds, grid_size

    def run(self, variables: Any) -> dict[str, Any]:
        """The statistics (JSON-ready) with the names of the plots written."""
        ctx, mode = self.ctx, self.mode
        preds = ctx.predict(variables, mode, thresholds=self.thresholds)
        num_classes = ctx.spec.num_classes
        labels = ctx.dataset.get("class_names")
        classes = [str(n) for n in labels] if labels else [str(k) for k in range(num_classes)]
        matrix = gate_stats.class_layer_rates(preds.gates, preds.labels, num_classes)
        order = gate_stats.cluster_order(matrix)
        most, least = gate_stats.top_classes_per_layer(matrix, k=min(3, num_classes))
        executed = gate_stats.executed_counts(preds.gates)
        difficulty = gate_stats.by_executed_count(preds.gates, preds.correct, preds.confidence)
        rank = np.lexsort((-preds.confidence, executed))  # fewest blocks first, confident first
        k = min(self.grid_size, len(rank))
        picks = {"fewest blocks": rank[:k], "most blocks": rank[::-1][:k]}
        files = {
            "class_layer": f"class_layer_{mode}.png",
            "executed_histogram": f"executed_histogram_{mode}.png",
            "gmacs_histogram": f"gmacs_histogram_{mode}.png",
            "difficulty": f"difficulty_{mode}.png",
            "extreme_images": f"fewest_most_blocks_{mode}.png",
        }
        if jax.process_index() == 0:  # every process predicts; one draws
            path = {k: os.path.join(self.output_dir, v) for k, v in files.items()}
            self._draw(path, preds, classes, matrix, order, executed, difficulty, picks)
        return {
            "gate_mode": mode,
            "class_names": classes,
            "class_order": order.tolist(),
            "class_layer_rates": [_nan_to_none(row) for row in matrix],
            "most_used_by": most.tolist(),
            "least_used_by": least.tolist(),
            "executed_histogram": gate_stats.executed_histogram(preds.gates).tolist(),
            "by_executed_blocks": {
                "count": difficulty["count"].tolist(),
                "accuracy": _nan_to_none(difficulty["accuracy"]),
                "confidence": _nan_to_none(difficulty["confidence"]),
            },
            "fewest_blocks_examples": preds.index[picks["fewest blocks"]].tolist(),
            "most_blocks_examples": preds.index[picks["most blocks"]].tolist(),
            "plots": files,
        }

    def _draw(
        self,
        path: dict[str, str],
        preds: Predictions,
        classes: list[str],
        matrix: np.ndarray,
        order: np.ndarray,
        executed: np.ndarray,
        difficulty: dict[str, np.ndarray],
        picks: dict[str, np.ndarray],
    ) -> None:
        """The plots of :meth:`run` (PNG files at ``path``)."""
        ctx, mode = self.ctx, self.mode
        os.makedirs(self.output_dir, exist_ok=True)
        class_layer_plot(
            ctx,
            matrix[order],
            path["class_layer"],
            f"execution rate per class and block ({mode} gates; classes clustered)",
            class_names=[classes[k] for k in order],
        )
        plots.histograms(
            {mode: executed},
            path["executed_histogram"],
            bins=[n - 0.5 for n in range(len(ctx.cost.blocks) + 2)],
            xlabel="executed blocks",
            title="blocks executed per image",
        )
        plots.histograms(
            {mode: np.asarray(ctx.cost.realised_macs(preds.gates.T)) / 1e9},
            path["gmacs_histogram"],
            bins=40,
            xlabel="realised GMACs per image",
            title="computation per image",
            reference=("every block", ctx.cost.macs / 1e9),
        )
        plots.difficulty(
            executed, preds.confidence, preds.correct, difficulty["accuracy"], path["difficulty"]
        )
        rows, captions = {}, {}
        for label, pick in picks.items():
            images, _ = ctx.source.read(preds.index[pick])
            rows[label] = eval_transform(images, ctx.dataset, normalised=False)
            captions[label] = [
                f"{executed[i]} blk, {classes[preds.labels[i]]}→{classes[preds.top[i, 0]]}"
                for i in pick
            ]
        plots.image_grid(rows, captions, path["extreme_images"], title=f"{mode} gates")


class Attack:
    """Accuracy (%) and per-block execution rates under an L∞ sign-gradient attack, at ε = 0
    and each of ``epsilons`` (pixels of the 0–255 image), on the attacked images and on their
    JPEG-compressed versions (quality ``jpeg_quality``).

    ``steps`` 1 is FGSM, more is BIM/PGD. ε = 0 goes through the same attack and rounding (a
    no-op on uint8 pixels), so the clean row is computed exactly like the attacked ones. The
    attacked split is held in host memory as uint8 (N·S·S·3 bytes; use a ``limit`` on large
    splits).
    """

    def __init__(
        self,
        ctx: EvalContext,
        mode: str,
        *,
        epsilons: tuple[float, ...] = (1.0, 2.0, 4.0, 8.0),
        steps: int = 1,
        jpeg_quality: int = 75,
        thresholds: np.ndarray | None = None,
    ) -> None:
        _needs_thresholds(mode, thresholds)
        if not 1 <= jpeg_quality <= 100:
            raise ConfigError(f"JPEG quality must be in [1, 100], got {jpeg_quality}")
        self.ctx, self.mode, self.thresholds = ctx, mode, thresholds
        self.epsilons, self.steps, self.jpeg_quality = tuple(epsilons), steps, jpeg_quality

    def run(self, variables: Any) -> dict[str, Any]:
        """``epsilons`` (0 first), ``accuracy`` and ``accuracy_jpeg`` [E], ``layer_rates`` and
        ``layer_rates_jpeg`` [E][L], and the attack's settings."""
        ctx = self.ctx
        ds = ctx.dataset
        step = compile_together(
            make_attack_step(
                ctx.model,
                ctx.mesh,
                tuple(ds.mean),
                tuple(ds.std),
                gate_mode=self.mode,
                steps=self.steps,
            ),
            "attack_step",
        )
        num_layers = len(ctx.spec.rates)
        thr = jnp.full((num_layers,), 0.5) if self.thresholds is None else self.thresholds
        plain = ml_collections.ConfigDict(ds.to_dict())
        plain.preprocess = "none"  # the attacked pixels are already cropped to image_size
        result: dict[str, Any] = {
            "gate_mode": self.mode,
            "steps": self.steps,
            "jpeg_quality": self.jpeg_quality,
            "epsilons": [0.0, *self.epsilons],
        }
        for name in ("accuracy", "accuracy_jpeg", "layer_rates", "layer_rates_jpeg"):
            result[name] = []
        for eps in result["epsilons"]:
            pixels, labels = attack_split(
                step,
                variables,
                eval_iterator(
                    ctx.source, ds, global_batch=ctx.batch_size, limit=ctx.limit, normalised=False
                ),
                ctx.mesh,
                epsilon=eps,
                key=jax.random.key(ctx.seed + 2_000),
                thresholds=jnp.asarray(thr),
                num_examples=ctx.num_examples,
                total=num_eval_batches(len(ctx.source), ctx.batch_size, ctx.limit),
                desc=f"attack ε={eps:g}",
                progress=ctx.progress,
            )
            for suffix, images in (("", pixels), ("_jpeg", jpeg(pixels, self.jpeg_quality))):
                preds = ctx.predict(
                    variables,
                    self.mode,
                    source=ArraySource(images, labels, ctx.spec.num_classes),
                    dataset=plain,
                    thresholds=self.thresholds,
                    desc=f"classify ε={eps:g}{suffix}",
                )
                result["accuracy" + suffix].append(float(100 * preds.correct.mean()))
                result["layer_rates" + suffix].append(gate_stats.layer_rates(preds.gates).tolist())
        return result
