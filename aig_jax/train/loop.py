"""``train_and_evaluate``: the training loop behind ``train.py``.

One jit-compiled step over a ``('data',)`` mesh; one run per workdir (a lock file); auto-resume
from the newest checkpoint in the workdir; a checkpoint every ``checkpoint_every_steps``, at the
end, and on SIGTERM/SIGINT; metrics fetched from the device once per logging interval and before
each evaluation and save, where the steps' ``finite`` flags are checked (so a diverged state is
never saved, see ``config.on_nonfinite``); every ``eval_every_epochs`` the evaluators that
``config.evals`` lists for training (:mod:`aig_jax.eval.suite`), with per-block and per-class
gate execution rates.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from tqdm.auto import tqdm

from aig_jax import checkpoint
from aig_jax.data import make_source, steps_per_epoch, train_iterator
from aig_jax.errors import NonFiniteError
from aig_jax.eval.evaluators import EvalContext
from aig_jax.eval.suite import Evaluators
from aig_jax.model.spec import ModelSpec
from aig_jax.sharding import (
    check_batch_size,
    compile_together,
    make_mesh,
    prefetch_to_mesh,
    replicated,
    replicated_like,
)
from aig_jax.train import workdir as workdir_lock
from aig_jax.train.config_checks import validate_config
from aig_jax.train.metrics import LoopTimer, MetricsWriter, mean_metrics
from aig_jax.train.optim import learning_rate_schedule, make_optimizer
from aig_jax.train.signals import StopOnSignal
from aig_jax.train.state import TrainState, create_train_state
from aig_jax.train.step import make_train_step


def _initial_state(
    init: Callable[[], TrainState], saved: checkpoint.Saved | None, mesh: jax.sharding.Mesh
) -> TrainState:
    """The state to train from: ``saved`` (a resumed run's, or ``init_from``'s variables with
    a fresh optimiser state), else ``init()``, replicated over ``mesh``."""
    if saved is not None and saved.opt_state is not None:
        step = jax.device_put(jnp.asarray(saved.step, jnp.int32), replicated(mesh))
        return TrainState(step, **saved.variables, opt_state=saved.opt_state)
    state = jax.jit(init, out_shardings=replicated(mesh))()
    if saved is None:
        return state
    return state.replace(**saved.variables)


def _check_finite(
    fetched: list[dict[str, np.ndarray]], last_step: int, config: Any, ckpt: checkpoint.Checkpointer
) -> None:
    """Raise :class:`NonFiniteError` naming the first step of ``fetched`` (the metrics of the
    steps up to ``last_step``) whose loss, gradients or update were not finite."""
    for i, m in enumerate(fetched):
        if m["finite"]:
            continue
        step = last_step - len(fetched) + 1 + i
        if not np.isfinite(m["loss"]):
            what = f"loss is {m['loss']}"
        elif not np.isfinite(m["grad_norm"]):
            what = f"gradient norm is {m['grad_norm']} (loss {m['loss']:.4g})"
        else:
            what = f"the update made the model state non-finite (loss {m['loss']:.4g})"
        ckpt.wait_until_finished()
        kept = ckpt.latest_step()
        saved = (
            "no checkpoint was saved" if kept is None else f"the newest checkpoint is step {kept}"
        )
        raise NonFiniteError(
            f"{what} at step {step}; {saved}; lower config.learning_rate (now "
            f"{config.learning_rate:g}) or set config.on_nonfinite=skip_step to skip such steps"
        )


def _evaluate(
    evaluators: Evaluators,
    variables: Any,
    step: int,
    workdir: str,
    writer: MetricsWriter,
    skip: bool,
) -> dict[str, Any]:
    """Run the training evaluators on ``variables``; log each result, and each classification's
    class × block execution rates in ``<workdir>/gates``. Outputs that are not finite stop the
    run, or with ``skip`` (``on_nonfinite="skip_step"``) leave this evaluation out."""
    gates = os.path.join(workdir, "gates")
    try:
        results = evaluators.run(variables, os.path.join(gates, f"step{step}"))
    except NonFiniteError as err:  # a finite state whose outputs are not
        if not skip:
            raise NonFiniteError(f"evaluation at step {step}: {err}") from None
        logging.warning("evaluation at step %d left out: %s", step, err)
        return {}
    for name, result in results.items():
        writer.write(step, "eval", {"evaluator": name, **result})
    if writer.enabled:
        evaluators.save_class_layer_rates(gates, step)
    return results


def train_and_evaluate(config: Any, workdir: str) -> dict[str, Any]:
    """Train the model of ``config`` in ``workdir``, resuming if it holds a checkpoint.

    Everything that can be checked without compiling (the config, the data, the workdir and
    its lock, the checkpoint to resume from) is checked first. Returns the last evaluation's
    result per evaluator run during training (``{name: {...}}``), empty when the workdir had
    finished already. Raises :class:`NonFiniteError` at the first non-finite step under
    ``config.on_nonfinite="stop"``, having saved nothing after it.
    """
    validate_config(config)
    workdir = os.path.abspath(workdir)
    train_source = make_source(config.dataset, config.dataset.train_split)
    spe = steps_per_epoch(len(train_source), config.batch_size)
    total = config.num_train_steps if config.num_train_steps > 0 else round(config.num_epochs * spe)
    eval_every = max(1, round(config.eval_every_epochs * spe))
    size = config.dataset.image_size
    skip = config.on_nonfinite == "skip_step"
    spec = ModelSpec.from_config(config)
    model = spec.build()
    meta = {"model": spec.to_json(), "config": config.to_dict()}  # of every checkpoint
    schedule = learning_rate_schedule(config, spe)
    tx = make_optimizer(config, schedule)
    step_fn = make_train_step(
        model,
        tx,
        spec.targets,
        target_weight=config.target_weight,
        normalize=config.target_loss_normalize,
        learning_rate=schedule,
        pixel_stats=(config.dataset.mean, config.dataset.std),
        on_nonfinite=config.on_nonfinite,
    )
    init = functools.partial(create_train_state, model, tx, (size, size, 3), config.seed)
    mesh = make_mesh(config.num_devices or None)
    check_batch_size(config.batch_size, mesh)
    evaluators = Evaluators(
        EvalContext.create(
            model, spec, config.dataset, mesh, batch_size=config.eval_batch_size,
            limit=config.eval_limit, seed=config.seed + 7, progress=config.progress,
        ),
        config.evals,
        during_training=True,
    )  # fmt: skip
    results: dict[str, Any] = {}
    with contextlib.ExitStack() as cleanup:
        stop = cleanup.enter_context(StopOnSignal())
        cleanup.enter_context(workdir_lock.hold(workdir))
        like = replicated_like(jax.eval_shape(init), mesh)  # restored arrays take its shardings
        saved = checkpoint.restore_or_init(
            os.path.join(workdir, "checkpoints"), like.variables, like.opt_state, spec,
            init_from=config.init_from, final_step=total, fallback=True,
        )  # fmt: skip
        if saved is not None and saved.step == total:
            if jax.process_index() == 0:
                print(f"nothing to do: step {total} of {total}; eval.py --workdir {workdir} to "
                      "evaluate")  # fmt: skip
            return results
        ckpt = checkpoint.Checkpointer(
            os.path.join(workdir, "checkpoints"), max_to_keep=config.keep_checkpoints
        )
        cleanup.callback(ckpt.close)  # waits for the saves in flight, also after an error
        writer = MetricsWriter(workdir, tensorboard=config.tensorboard)
        cleanup.callback(writer.close)
        cleanup.enter_context(jax.set_mesh(mesh))
        state = _initial_state(init, saved, mesh)
        start = int(state.step)
        writer.drop_after(start)  # the records of steps this run replays
        timer = LoopTimer(start)
        train_step = compile_together(step_fn, "train_step")
        key = jax.device_put(jax.random.key(config.seed), replicated(mesh))
        logging.info(
            "%s: %d blocks (%d gated), %d steps (%d per epoch), batch %d on %d devices",
            spec.name, len(spec.rates), sum(spec.gated), total, spe, config.batch_size,
            mesh.devices.size,
        )  # fmt: skip
        pending: list[dict[str, jax.Array]] = []
        step = start
        show = jax.process_index() == 0 and config.progress
        bar = cleanup.enter_context(
            tqdm(total=total, initial=start, desc="train", unit="step", disable=not show)
        )
        batches = prefetch_to_mesh(
            train_iterator(
                train_source, config.dataset, global_batch=config.batch_size, seed=config.seed,
                start_step=start, num_steps=total - start, num_threads=config.data_threads,
                normalised=False,  # uint8 to the device, normalised there by the train step
            ),
            mesh,
        )  # fmt: skip
        cleanup.callback(batches.close)  # stops the prefetching thread when the loop ends early
        while (batch := timer.wait_for(batches)) is not None:
            state, metrics = train_step(state, batch, key)
            pending.append(metrics)
            step += 1
            bar.update(1)
            stopping = stop.requested  # read once: a signal from now on is seen next step
            log = step % config.log_every_steps == 0 or step == total or stopping
            evaluate = step % eval_every == 0 or step == total
            save = step % config.checkpoint_every_steps == 0 or step == total or stopping
            if log or evaluate or save:
                fetched = jax.device_get(pending)  # waits for the steps so far
                pending = fetched  # host copies: the next log does not fetch them again
                if not skip:  # nothing after a non-finite step is evaluated or saved
                    _check_finite(fetched, step, config, ckpt)
            if log:
                summary = {**mean_metrics(fetched, skip), **timer.lap(step, config.batch_size)}
                pending = []
                summary["epoch"] = step / spe
                writer.write(step, "train", summary)
                bar.set_postfix(
                    loss=f"{summary['loss']:.3f}",
                    acc=f"{summary['accuracy']:.3f}",
                    exec=f"{np.mean(summary['gate_rates']):.2f}",
                    img_s=f"{summary['images_per_sec']:.0f}",
                )
            with timer.paused():
                if evaluate:
                    results = _evaluate(evaluators, state.variables, step, workdir, writer, skip)
                if save:
                    ckpt.save(step, state.variables, state.opt_state, {**meta, "epoch": step / spe})
            if stopping:
                break
    if stop.requested:
        logging.warning("stopped at step %d; rerun the same command to resume", step)
    return results
