"""The train step's fusion barriers between residual blocks (on by default on the CPU).

The barrier is the identity on values and gradients, so two steps with and without it, from the
same state, batches and key, give the same gate decisions exactly and the same metrics,
parameters, BatchNorm statistics and momentum to float32 rounding (the two programs fuse
differently); amplified most by the gates' small, cancelling gradients, the rounding stays within
1e-4 of each tensor's largest magnitude after two steps. And the compiled CPU program keeps one
barrier after each block in the forward pass and one before it in the backward pass: without the
step's compile options, XLA:CPU removes barriers before it fuses, and they would separate nothing.
"""

import jax
import numpy as np
import pytest

from aig_jax.model.resnet import build_model
from aig_jax.train.optim import learning_rate_schedule, make_optimizer
from aig_jax.train.state import create_train_state
from aig_jax.train.step import make_train_step
from configs import default

BATCH, SIZE = 8, 8


def _setup(fusion_barriers):
    config = default.get_config()
    model = build_model("resnet8_cifar")
    tx = make_optimizer(config, learning_rate_schedule(config, 10))
    targets = np.full(model.num_blocks, 0.6)
    step = make_train_step(
        model, tx, targets, target_weight=2.0, donate=False, fusion_barriers=fusion_barriers
    )
    return model, step, create_train_state(model, tx, (SIZE, SIZE, 3), seed=0)


def _batches(n):
    rng = np.random.default_rng(0)
    return [
        {
            "image": rng.normal(size=(BATCH, SIZE, SIZE, 3)).astype(np.float32),
            "label": rng.integers(0, 10, BATCH).astype(np.int32),
        }
        for _ in range(n)
    ]


def test_steps_with_fusion_barriers_equal_plain_steps():
    runs = []
    for barriers in (True, False):
        _, step, state = _setup(barriers)
        metrics = []
        for batch in _batches(2):
            state, m = step(state, batch, jax.random.key(3))
            metrics.append(m)
        runs.append(jax.device_get((state, metrics)))
    (with_state, with_metrics), (plain_state, plain_metrics) = runs
    for a, b in zip(with_metrics, plain_metrics, strict=True):
        np.testing.assert_array_equal(a["gate_rates"], b["gate_rates"])
        for name in ("loss", "ce", "target_loss", "grad_norm"):
            np.testing.assert_allclose(a[name], b[name], rtol=1e-5, err_msg=name)
    leaves = jax.tree_util.tree_leaves_with_path
    for (path, a), (_, b) in zip(leaves(with_state), leaves(plain_state), strict=True):
        # of each tensor's largest magnitude, at least 0.01 (gate fc1 biases stay near 0)
        scale = max(float(np.abs(b).max()), 1e-2)
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-4 * scale, err_msg=str(path))


@pytest.mark.parametrize("fusion_barriers, per_block", [(None, 2), (False, 0)])
def test_cpu_program_keeps_a_barrier_per_block_each_way(fusion_barriers, per_block):
    assert jax.default_backend() == "cpu"
    model, step, state = _setup(fusion_barriers)
    compiled = step.lower(state, _batches(1)[0], jax.random.key(3)).compile()
    assert compiled.as_text().count(" opt-barrier(") == per_block * model.num_blocks
