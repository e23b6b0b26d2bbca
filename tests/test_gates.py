import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from aig_jax.model.blocks import BatchNorm
from aig_jax.model.gates import (
    GumbelGate,
    decide,
    gumbel_noise,
    straight_through_gumbel,
    straight_through_threshold,
)


def test_gumbel_noise_matches_reference_formula():
    key = jax.random.key(3)
    u = np.asarray(jax.random.uniform(key, (1000,), jnp.float32), np.float64)
    expected = -np.log(1e-10 - np.log(u + 1e-10))
    np.testing.assert_allclose(gumbel_noise(key, (1000,)), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("ways", [2, 3])
def test_straight_through_forward_is_exactly_one_hot(ways):
    logits = jax.random.normal(jax.random.key(0), (512, ways)) * 3
    y = straight_through_gumbel(logits, gumbel_noise(jax.random.key(1), logits.shape))
    values = np.unique(np.asarray(y))
    assert set(values.tolist()) <= {0.0, 1.0}
    np.testing.assert_array_equal(np.asarray(y).sum(-1), 1.0)
    # The hard sample is the argmax of the perturbed logits.
    perturbed = logits + gumbel_noise(jax.random.key(1), logits.shape)
    np.testing.assert_array_equal(np.argmax(y, -1), np.argmax(perturbed, -1))


@pytest.mark.parametrize("tau", [1.0, 0.5])
@pytest.mark.parametrize("ways", [2, 3])
def test_straight_through_gradient_is_the_softmax_gradient(tau, ways):
    logits = jax.random.normal(jax.random.key(0), (16, ways))
    weights = jax.random.normal(jax.random.key(2), (16, ways))
    key = jax.random.key(5)

    def hard(lg):
        return jnp.sum(weights * straight_through_gumbel(lg, gumbel_noise(key, lg.shape), tau))

    def soft(lg):
        return jnp.sum(weights * jax.nn.softmax((lg + gumbel_noise(key, lg.shape)) / tau, -1))

    np.testing.assert_allclose(jax.grad(hard)(logits), jax.grad(soft)(logits), rtol=1e-5, atol=1e-6)
    assert np.abs(np.asarray(jax.grad(hard)(logits))).sum() > 0


def test_sampling_frequency_matches_softmax_probability():
    n = 40_000
    logits = jnp.tile(jnp.array([[0.3, 1.1]]), (n, 1))
    y = straight_through_gumbel(logits, gumbel_noise(jax.random.key(7), logits.shape))
    freq = float(jnp.mean(y[:, 1]))
    p = float(jax.nn.softmax(jnp.array([0.3, 1.1]))[1])
    sigma = np.sqrt(p * (1 - p) / n)
    assert abs(freq - p) < 4 * sigma, (freq, p)


def test_threshold_decision_is_hard_with_prob_gradient():
    p = jnp.array([0.2, 0.5, 0.51, 0.9])
    np.testing.assert_array_equal(straight_through_threshold(p, 0.5), [0, 0, 1, 1])
    g = jax.grad(lambda q: jnp.sum(jnp.arange(4.0) * straight_through_threshold(q, 0.5)))(p)
    np.testing.assert_array_equal(g, jnp.arange(4.0))


def _gate(train):
    return GumbelGate(norm=functools.partial(BatchNorm, use_running_average=not train))


def _init_gate(x, rngs):
    return _gate(True).init(rngs, x, train=True, mode="argmax")


def test_initial_open_rate_is_about_87_percent(rngs):
    x = jax.random.normal(jax.random.key(4), (4096, 4, 4, 8))
    variables = _init_gate(x, rngs)
    out, _ = _gate(True).apply(
        variables,
        x,
        train=True,
        mode="sample",
        rngs={"gumbel": jax.random.key(9)},
        mutable=["batch_stats"],
    )
    expected = float(jax.nn.sigmoid(1.9))  # fc2 bias (0.1, 2.0), near-zero weights
    assert abs(expected - 0.8699) < 1e-3
    assert abs(float(out.decision.mean()) - expected) < 0.02
    np.testing.assert_allclose(out.prob, expected, atol=0.01)


def test_modes(rngs):
    x = jax.random.normal(jax.random.key(4), (64, 4, 4, 8))
    variables = _init_gate(x, rngs)
    params = jax.tree.map(lambda a: a, variables)
    # Make p(execute) depend on the input so that the thresholds matter.
    params["params"]["fc2"]["kernel"] = jax.random.normal(jax.random.key(1), (16, 2))
    gate = _gate(False)
    outs = {
        m: gate.apply(params, x, train=False, mode=m, threshold=0.8, rngs=rngs)
        for m in ("argmax", "open", "calibrated", "sample")
    }
    prob = np.asarray(outs["argmax"].prob)
    assert 0 < (prob > 0.5).mean() < 1
    np.testing.assert_array_equal(outs["argmax"].decision, (prob > 0.5).astype(np.float32))
    np.testing.assert_array_equal(outs["calibrated"].decision, (prob > 0.8).astype(np.float32))
    np.testing.assert_array_equal(outs["open"].decision, 1.0)
    assert set(np.unique(outs["sample"].decision).tolist()) <= {0.0, 1.0}
    # argmax is deterministic; sampling is not (with another key).
    again = gate.apply(params, x, train=False, mode="sample", rngs={"gumbel": jax.random.key(99)})
    assert not np.array_equal(again.decision, outs["sample"].decision)


def test_a_sample_is_the_argmax_of_logits_plus_noise():
    logits = jax.random.normal(jax.random.key(1), (64, 2))
    prob = np.asarray(jax.nn.softmax(logits)[:, 1])
    argmax = decide(logits, "argmax", tau=1.0, threshold=0.5)
    np.testing.assert_allclose(argmax.prob, prob, rtol=1e-6)
    # Equal noise for both ways: p(execute) > 0.5 decides; a large noise on one way forces it.
    tie = decide(logits, "sample", tau=1.0, threshold=0.5, noise=jnp.zeros((64, 2)))
    np.testing.assert_array_equal(tie.decision, argmax.decision)
    for way in (0, 1):
        forced = jnp.zeros((64, 2)).at[:, way].set(100.0)
        out = decide(logits, "sample", tau=1.0, threshold=0.5, noise=forced)
        np.testing.assert_array_equal(out.decision, float(way))


def test_gate_stays_float32_under_bf16(rngs):
    x = jax.random.normal(jax.random.key(4), (8, 4, 4, 8)).astype(jnp.bfloat16)
    variables = _init_gate(x, rngs)
    out = _gate(False).apply(variables, x, train=False, mode="argmax")
    assert out.decision.dtype == jnp.float32 and out.prob.dtype == jnp.float32


def test_unknown_mode_and_missing_noise(rngs):
    x = jnp.ones((2, 4, 4, 8))
    variables = _init_gate(x, rngs)
    with pytest.raises(ValueError, match="unknown gate mode 'stochastic'"):
        _gate(False).apply(variables, x, train=False, mode="stochastic")
    with pytest.raises(ValueError, match=r"gate mode 'sample' needs Gumbel noise"):
        decide(jnp.zeros((2, 2)), "sample", tau=1.0, threshold=0.5)
    with pytest.raises(Exception, match="gumbel"):  # Flax: no "gumbel" rng was given
        _gate(False).apply(variables, x, train=False, mode="sample")
