import jax
import jax.numpy as jnp
import numpy as np
import pytest

from aig_jax.model.schedules import SCHEDULES, gated_flags, target_rates
from aig_jax.train.losses import cross_entropy, target_rate_loss, total_loss


def test_target_rate_loss_hand_computed():
    gates = jnp.array([[1, 0, 1, 1], [0, 0, 0, 1], [1, 1, 1, 1]], jnp.float32)  # rates .75 .25 1
    targets = jnp.array([0.5, 0.5, 0.7])
    expected = ((0.75 - 0.5) ** 2 + (0.25 - 0.5) ** 2 + (1 - 0.7) ** 2) / 3  # 0.07166...
    assert float(target_rate_loss(gates, targets)) == pytest.approx(expected, rel=1e-6)


def test_ungated_layers_are_excluded_and_normalisation():
    gates = jnp.array([[1, 0, 1, 1], [0, 0, 0, 1], [1, 1, 1, 1]], jnp.float32)
    targets = jnp.array([0.5, 1.0, 0.7])  # layer 1 is ungated: its rate 0.25 must not count
    gated_sum = (0.75 - 0.5) ** 2 + (1 - 0.7) ** 2
    assert float(target_rate_loss(gates, targets)) == pytest.approx(gated_sum / 2, rel=1e-6)
    assert float(target_rate_loss(gates, targets, normalize="all")) == pytest.approx(
        gated_sum / 3, rel=1e-6
    )
    assert float(target_rate_loss(gates, jnp.ones(3))) == 0.0


def test_target_rate_loss_gradient():
    gates = jnp.array([[1.0, 0.0], [1.0, 1.0]])
    targets = jnp.array([0.2, 0.5])
    g = jax.grad(target_rate_loss)(gates, targets)
    # d/dz_lb of mean_l (mean_b z - t)^2 = 2 (rate_l - t_l) / (B * L)
    expected = np.array([[2 * 0.3 / 4] * 2, [2 * 0.5 / 4] * 2])
    np.testing.assert_allclose(g, expected, rtol=1e-6)


def test_cross_entropy_and_total():
    logits = jnp.array([[2.0, 0.0], [0.0, 1.0]])
    labels = jnp.array([0, 0])
    ce = (np.log(1 + np.exp(-2.0)) + np.log(1 + np.exp(1.0))) / 2
    assert float(cross_entropy(logits, labels)) == pytest.approx(ce, rel=1e-6)
    gates = jnp.ones((2, 2))
    total, parts = total_loss(logits, labels, gates, jnp.array([0.5, 0.5]), target_weight=2.0)
    assert float(total) == pytest.approx(ce + 2 * 0.25, rel=1e-6)
    assert float(parts["target_loss"]) == pytest.approx(0.25)


def test_schedules():
    assert target_rates("uniform", 3, 0.7) == (0.7, 0.7, 0.7)
    r50 = target_rates("resnet50_reference", 16, 0.4)
    assert r50 == (1, 1, 0.8, 1, 0.4, 0.4, 0.4, 1, 0.4, 0.4, 0.4, 0.4, 0.4, 1, 0.7, 1)
    r101 = target_rates("resnet101_reference", 33, 0.3)
    assert r101[:8] == (1.0,) * 8 and r101[8:] == (0.3,) * 25
    assert gated_flags(r50, "drop").count(True) == 10
    assert "uniform" in SCHEDULES


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (([0.5, 0.5], 3), "target-rate list has 2 entries but the model has 3 blocks"),
        (([0.5, 1.2, 0.5], 3), r"target rate of block 1 must lie in \[0, 1\], got 1.2"),
        (("uniform", 3, -0.1), r"target rate t must lie in \[0, 1\], got -0.1"),
        (("resnet50_reference", 33, 0.5), "is for 16 blocks, the model has 33"),
        (("linear", 3, 0.5), "unknown target-rate schedule 'linear'"),
    ],
)
def test_schedule_errors(args, message):
    with pytest.raises(ValueError, match=message):
        target_rates(*args)


def test_loss_shape_errors():
    with pytest.raises(ValueError, match=r"gates must be \[L, B\] and targets \[L\]"):
        target_rate_loss(jnp.ones((3, 4)), jnp.ones(2))
