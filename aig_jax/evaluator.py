"""``evaluate_checkpoint``: the evaluation behind ``eval.py``.

Restores a checkpoint (its model spec and training config come from its metadata), evaluates
the whole split once per gate mode, fits calibrated thresholds on training images, analyses
the inference graphs of the first mode, optionally attacks the model and an ungated baseline,
and writes the report (JSON, Markdown, PNG plots) with :mod:`aig_jax.report`.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from aig_jax import calibration, checkpoint, gate_stats
from aig_jax.attacks import attack_split, jpeg, make_attack_step
from aig_jax.data import Source, eval_iterator, make_source, num_eval_batches
from aig_jax.data.sources import ArraySource
from aig_jax.evaluation import Predictions, predict, summarize
from aig_jax.flops import ModelCost, model_cost
from aig_jax.gates import check_gate_mode
from aig_jax.model_spec import ModelSpec
from aig_jax.report import analyse, write_report
from aig_jax.sharding import check_batch_size, compile_together, make_mesh, replicated
from aig_jax.steps import EvalStep, make_eval_step
from aig_jax.train_state import abstract_variables

#: ``factory(model, mesh) -> EvalStep``: :func:`make_eval_step` or a drop-in faster step.
EvalStepFactory = Callable[[nn.Module, jax.sharding.Mesh], EvalStep]


@dataclasses.dataclass(frozen=True)
class EvalOptions:
    """What to evaluate; the defaults are those of ``eval.py``."""

    modes: tuple[str, ...] = ("argmax", "sample", "open", "calibrated")
    samples: int = 5  # seeds of "sample" mode (mean ± std reported)
    limit: int | None = None  # evaluate only the first N examples
    batch_size: int | None = None  # default: config.eval_batch_size
    calibration_split: str | None = None  # default: config.dataset.train_split
    calibration_limit: int | None = 10_000  # training images the thresholds are fitted on
    seed: int = 0
    attack: bool = False
    epsilons: tuple[float, ...] = (1.0, 2.0, 4.0, 8.0)  # pixels of the 0–255 image
    attack_steps: int = 1  # 1: FGSM; more: BIM/PGD
    attack_mode: str = "argmax"  # gate mode of the attacked gated model
    jpeg_quality: int = 75
    grid_size: int = 8  # images per row of the fewest/most-blocks grid
    progress: bool = True


@dataclasses.dataclass(frozen=True)
class Restored:
    """A model restored from a checkpoint, with the config it is evaluated under."""

    spec: ModelSpec
    model: nn.Module
    variables: dict[str, Any]
    config: Any
    directory: str
    step: int


def check_classes(source: Source, spec: ModelSpec, where: str) -> None:
    """Raise ``ValueError`` unless ``source`` has the model's number of classes."""
    if source.num_classes != spec.num_classes:
        raise ValueError(
            f"{where} has {source.num_classes} classes but the checkpoint's model "
            f"{spec.name} predicts {spec.num_classes}"
        )


def restore(path: str, mesh: jax.sharding.Mesh, config: Any | None = None) -> Restored:
    """Restore the checkpoint at ``path`` (workdir, checkpoints dir or one step's dir).

    Without ``config`` the training config stored in the checkpoint is used. Raises
    :class:`~aig_jax.checkpoint.CheckpointError` when there is no checkpoint or ``config``
    describes another model, and ``ValueError`` when its dataset has another class count.
    """
    meta, directory, step = checkpoint.read_meta(path)
    if "model" not in meta:
        raise checkpoint.CheckpointError(f"checkpoint {directory}/{step} has no model spec")
    spec = ModelSpec.from_json(meta["model"])
    if config is None:
        config = ml_collections.ConfigDict(meta.get("config") or {})
    else:
        classes = config.dataset.num_classes
        if classes != spec.num_classes:
            raise ValueError(
                f"dataset {config.dataset.name!r} has config.dataset.num_classes = {classes} "
                f"but the checkpoint's model {spec.name} predicts {spec.num_classes} classes"
            )
        problem = ModelSpec.from_config(config).mismatch(spec)
        if problem:
            raise checkpoint.CheckpointError(
                f"the checkpoint in {directory} does not match the config: {problem}"
            )
    model = spec.build(scan_blocks=config.get("scan_blocks", False))
    size = config.dataset.image_size
    like = jax.tree.map(
        lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=replicated(mesh)),
        abstract_variables(model, (size, size, 3)),
    )
    variables = checkpoint.load_variables(directory, step, like)
    return Restored(spec, model, variables, config, directory, step)


@dataclasses.dataclass
class _Evaluator:
    """The per-run constants of one model's evaluation."""

    restored: Restored
    eval_step: EvalStep
    eval_step_factory: EvalStepFactory
    mesh: jax.sharding.Mesh
    source: Source
    batch: int
    options: EvalOptions

    def predict(
        self,
        mode: str,
        *,
        source: Source | None = None,
        dataset: Any = None,
        limit: int | None = None,
        seed: int = 0,
        thresholds: np.ndarray | None = None,
        desc: str = "",
    ) -> Predictions:
        """Predictions of one pass over ``source`` (default: the evaluation split)."""
        source = self.source if source is None else source
        limit = self.options.limit if limit is None else limit
        dataset = self.restored.config.dataset if dataset is None else dataset
        return predict(
            self.eval_step,
            self.restored.variables,
            eval_iterator(source, dataset, global_batch=self.batch, limit=limit),
            self.mesh,
            gate_mode=mode,
            key=jax.random.key(self.options.seed + seed),
            thresholds=thresholds,
            num_layers=len(self.restored.spec.rates),
            total=num_eval_batches(len(source), self.batch, limit),
            desc=desc or f"eval {mode}",
            progress=self.options.progress,
        )

    def calibrate(self) -> tuple[np.ndarray, dict[str, Any]]:
        """Thresholds [L] fitted on training images so that each block's deterministic rate
        equals its sampled rate there, plus what the fit saw."""
        config = self.restored.config
        split = self.options.calibration_split or config.dataset.train_split
        source = make_source(config.dataset, split)
        preds = self.predict(
            "sample",
            source=source,
            limit=self.options.calibration_limit or len(source),
            seed=1_000,
            desc=f"calibrate on {split}",
        )
        sampled = gate_stats.layer_rates(preds.gates)
        thresholds = calibration.fit_thresholds(preds.probs, sampled)
        info = {
            "split": split,
            "num_examples": len(preds.labels),
            "thresholds": thresholds.tolist(),
            "sampled_rates": sampled.tolist(),
            "calibrated_rates": calibration.rates_under(preds.probs, thresholds).tolist(),
            "argmax_rates": calibration.rates_under(
                preds.probs, np.full_like(thresholds, 0.5)
            ).tolist(),
        }
        return thresholds, info

    def robustness(self, mode: str, thresholds: np.ndarray | None) -> dict[str, Any]:
        """Accuracy (%) and per-block rates under attack at ε = 0 and each option epsilon,
        on the attacked images and on their JPEG-compressed versions.

        ε = 0 goes through the same attack and rounding (a no-op on uint8 pixels), so the
        clean row is computed exactly like the attacked ones. The attacked split is held in
        host memory as uint8 (N·S·S·3 bytes; use ``limit`` on large splits).
        """
        opts, config = self.options, self.restored.config
        ds = config.dataset
        step = compile_together(
            make_attack_step(
                self.restored.model,
                self.mesh,
                tuple(ds.mean),
                tuple(ds.std),
                gate_mode=mode,
                steps=opts.attack_steps,
            ),
            "attack_step",
        )
        thr = jnp.full((len(self.restored.spec.rates),), 0.5) if thresholds is None else thresholds
        plain = ml_collections.ConfigDict(ds.to_dict())
        plain.preprocess = "none"  # the attacked pixels are already cropped to image_size
        count = min(opts.limit or len(self.source), len(self.source))
        result: dict[str, Any] = {"gate_mode": mode, "epsilons": [0.0, *opts.epsilons]}
        for name in ("accuracy", "accuracy_jpeg", "layer_rates", "layer_rates_jpeg"):
            result[name] = []
        for eps in result["epsilons"]:
            pixels, labels = attack_split(
                step,
                self.restored.variables,
                eval_iterator(
                    self.source, ds, global_batch=self.batch, limit=opts.limit, normalised=False
                ),
                self.mesh,
                epsilon=eps,
                key=jax.random.key(opts.seed + 2_000),
                thresholds=jnp.asarray(thr),
                num_examples=count,
                total=num_eval_batches(len(self.source), self.batch, opts.limit),
                desc=f"attack ε={eps:g}",
                progress=opts.progress,
            )
            for suffix, images in (("", pixels), ("_jpeg", jpeg(pixels, opts.jpeg_quality))):
                preds = self.predict(
                    mode,
                    source=ArraySource(images, labels, self.restored.spec.num_classes),
                    dataset=plain,
                    thresholds=thresholds,
                    desc=f"classify ε={eps:g}{suffix}",
                )
                result["accuracy" + suffix].append(float(100 * preds.correct.mean()))
                result["layer_rates" + suffix].append(gate_stats.layer_rates(preds.gates).tolist())
        return result


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


def _evaluate_modes(
    run: _Evaluator, cost: ModelCost, modes: tuple[str, ...], thresholds: np.ndarray | None
) -> tuple[dict[str, Any], Predictions, dict[str, np.ndarray]]:
    """Summaries per mode (mean ± std over seeds for "sample"), the first mode's predictions,
    and realised GMACs per image [N] per mode (first seed)."""
    summaries: dict[str, Any] = {}
    gmacs: dict[str, np.ndarray] = {}
    firsts: list[Predictions] = []
    for mode in modes:
        seeds = run.options.samples if mode == "sample" else 1
        runs = [run.predict(mode, seed=s, thresholds=thresholds) for s in range(seeds)]
        found = [summarize(p, cost, run.restored.spec.num_classes) for p in runs]
        summaries[mode] = _seed_statistics(found) if mode == "sample" else found[0]
        gmacs[mode] = np.asarray(cost.realised_macs(runs[0].gates.T)) / 1e9
        firsts.append(runs[0])
    return summaries, firsts[0], gmacs


def _evaluate_baseline(path: str, run: _Evaluator) -> tuple[_Evaluator, dict[str, Any]]:
    """The baseline checkpoint's evaluator (on ``run``'s data) and its summary."""
    base = restore(path, run.mesh)
    check_classes(
        run.source, base.spec, f"dataset split {run.restored.config.dataset.eval_split!r}"
    )
    base = dataclasses.replace(base, config=run.restored.config)
    base_run = dataclasses.replace(
        run,
        restored=base,
        eval_step=compile_together(run.eval_step_factory(base.model, run.mesh), "eval_step"),
    )
    cost = model_cost(base.model, base.config.dataset.image_size)
    summary = {
        "checkpoint": {"directory": base.directory, "step": base.step},
        "model": base.spec.to_json(),
        **summarize(base_run.predict("open", desc="eval baseline"), cost, base.spec.num_classes),
    }
    return base_run, summary


def evaluate_checkpoint(
    path: str,
    output_dir: str | None = None,
    *,
    config: Any | None = None,
    baseline: str | None = None,
    options: EvalOptions | None = None,
    eval_step_factory: EvalStepFactory = make_eval_step,
) -> dict[str, Any]:
    """Evaluate the checkpoint at ``path`` and write the report to ``output_dir``.

    ``output_dir`` defaults to ``report/`` next to the ``checkpoints`` directory. ``config``
    (default: the one in the checkpoint) names the dataset; ``baseline`` is an ungated
    checkpoint evaluated alongside. ``eval_step_factory`` builds the inference step (same
    signature as :func:`~aig_jax.steps.make_eval_step`). Returns the report dict.
    """
    options = options or EvalOptions()
    for mode in (*options.modes, options.attack_mode):
        check_gate_mode(mode)
    if not options.modes:
        raise ValueError("no gate mode to evaluate")
    if options.samples < 1:
        raise ValueError(f"samples must be >= 1, got {options.samples}")
    mesh = make_mesh((config.get("num_devices") or None) if config is not None else None)
    restored = restore(path, mesh, config)
    config = restored.config
    batch = options.batch_size or config.eval_batch_size
    check_batch_size(batch, mesh)
    source = make_source(config.dataset, config.dataset.eval_split)
    check_classes(source, restored.spec, f"dataset split {config.dataset.eval_split!r}")
    cost = model_cost(restored.model, config.dataset.image_size)
    run = _Evaluator(
        restored,
        compile_together(eval_step_factory(restored.model, mesh), "eval_step"),
        eval_step_factory,
        mesh,
        source,
        batch,
        options,
    )
    gated = any(restored.spec.gated)
    modes = options.modes if gated else ("argmax",)  # without gates every mode is the same
    thresholds, calib = None, None
    if gated and (
        "calibrated" in modes or (options.attack and options.attack_mode == "calibrated")
    ):
        thresholds, calib = run.calibrate()
    summaries, primary, per_image_gmacs = _evaluate_modes(run, cost, modes, thresholds)
    report: dict[str, Any] = {
        "checkpoint": {"directory": restored.directory, "step": restored.step},
        "model": restored.spec.to_json(),
        "dataset": {
            "source": config.dataset.source,
            "name": config.dataset.get("name"),
            "split": config.dataset.eval_split,
            "num_examples": len(primary.labels),
            "image_size": config.dataset.image_size,
        },
        "blocks": [
            {
                "name": b.name,
                "gated": b.gated,
                "downsampling": b.downsampling,
                "branch_gmacs": b.branch_macs / 1e9,
            }
            for b in cost.blocks
        ],
        "modes": summaries,
        "calibration": calib,
    }
    base_run = None
    if baseline is not None:
        base_run, report["baseline"] = _evaluate_baseline(baseline, run)
    if options.attack:
        mode = options.attack_mode if gated else "argmax"
        report["attack"] = {
            "steps": options.attack_steps,
            "jpeg_quality": options.jpeg_quality,
            "gated": run.robustness(mode, thresholds),
        }
        if base_run is not None:
            report["attack"]["baseline"] = base_run.robustness("open", None)
    output_dir = output_dir or os.path.join(os.path.dirname(restored.directory), "report")
    report["output_dir"] = os.path.abspath(output_dir)
    if jax.process_index() == 0:
        report["analysis"] = analyse(
            report,
            primary,
            modes[0],
            per_image_gmacs,
            source,
            config,
            output_dir,
            options.grid_size,
        )
        write_report(report, output_dir)
    return report
