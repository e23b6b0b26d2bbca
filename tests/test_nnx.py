"""The NNX path: the snippet of docs/extending.md, checked against our own Linen train step."""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from aig_jax.model import ModelSpec, init_variables
from aig_jax.train.optim import learning_rate_schedule, make_optimizer
from aig_jax.train.state import TrainState
from aig_jax.train.step import make_train_step
from configs import default

DOC = Path(__file__).resolve().parents[1] / "docs" / "extending.md"
STEPS_PER_EPOCH = 10
RTOL, ATOL = 1e-6, 1e-7  # two compilations of the same float32 arithmetic


def doc_snippet(heading: str) -> str:
    """The first ```python block after ``heading`` in docs/extending.md."""
    section = DOC.read_text().split(heading, 1)[1]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


def small_config():
    """ResNet-8 on 16×16 images, with a gate learning-rate factor so the optax mask matters."""
    config = default.get_config()
    config.model = "resnet8_cifar"
    config.dataset.image_size = 16
    config.gate_lr_factor = 0.1
    return config


def assert_trees_close(actual, expected):
    assert jax.tree.structure(actual) == jax.tree.structure(expected)
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(a, e, rtol=RTOL, atol=ATOL)


def test_documented_nnx_step_matches_linen_step():
    config = small_config()
    spec = ModelSpec.from_config(config)
    linen_model = spec.build()
    variables = init_variables(linen_model, (16, 16, 3), seed=0)
    batch = {
        "image": jax.random.normal(jax.random.key(7), (4, 16, 16, 3)),
        "label": jnp.asarray([0, 3, 5, 9], jnp.int32),
    }
    scope = {
        "config": config,
        "steps_per_epoch": STEPS_PER_EPOCH,
        "variables": variables,
        "batch": batch,
    }
    exec(doc_snippet("## A fork written in Flax NNX"), scope)
    model, optimizer, metrics = scope["model"], scope["optimizer"], scope["metrics"]

    # Our step with the noise the stream drew: fold_in(key, count) at the count before the
    # train step's call (the evaluation call after it advanced the count once more).
    gumbel = model.to_nnx__rngs.gumbel
    count = int(gumbel.count[...]) - 2
    tx = make_optimizer(config, learning_rate_schedule(config, STEPS_PER_EPOCH))
    ours = make_train_step(
        linen_model,
        tx,
        spec.targets,
        target_weight=config.target_weight,
        normalize=config.target_loss_normalize,
        donate=False,
    )
    state = TrainState(
        step=jnp.asarray(count, jnp.int32),
        params=variables["params"],
        batch_stats=variables["batch_stats"],
        opt_state=tx.init(variables["params"]),
    )
    new_state, expected = ours(state, batch, gumbel.key[...])

    np.testing.assert_array_equal(metrics["gate_rates"], expected["gate_rates"])
    for name in ("loss", "ce", "target_loss", "accuracy"):
        np.testing.assert_allclose(metrics[name], expected[name], rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(
        metrics["loss"],
        metrics["ce"] + config.target_weight * metrics["target_loss"],
        rtol=RTOL,
    )
    # Other noise gives another loss, so the equality above depends on the noise being ours.
    _, other = ours(state, batch, jax.random.key(99))
    assert abs(float(other["loss"]) - float(metrics["loss"])) > 1e-4

    batch_stats = nnx.to_pure_dict(nnx.state(model, nnx.BatchStat))
    before, after = (
        np.concatenate([np.ravel(x) for x in jax.tree.leaves(tree)])
        for tree in (variables["batch_stats"], batch_stats)
    )
    assert np.abs(after - before).max() > 1e-3  # the step updated the statistics
    assert_trees_close(batch_stats, new_state.batch_stats)
    assert_trees_close(nnx.to_pure_dict(nnx.state(model, nnx.Param)), new_state.params)
    assert int(optimizer.step[...]) == 1

    eval_logits = linen_model.apply(new_state.variables, batch["image"]).logits
    np.testing.assert_allclose(scope["logits"], eval_logits, rtol=RTOL, atol=ATOL)
