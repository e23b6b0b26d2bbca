"""FGSM/BIM in pixel space and the JPEG defence."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from aig_jax.data import eval_iterator, make_source
from aig_jax.data.sources import ArraySource
from aig_jax.eval import attacks
from aig_jax.eval.predict import predict
from aig_jax.eval.restore import restore
from aig_jax.eval.step import make_eval_step
from aig_jax.sharding import make_mesh, shard_batch
from tests.tiny_checkpoint import trained_tiny


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The restored tiny gated model, its mesh and its test split."""
    workdir, _ = trained_tiny(tmp_path_factory)
    mesh = make_mesh()
    restored = restore(workdir, mesh)
    return restored, mesh, make_source(restored.config.dataset, "test")


def test_fgsm_on_a_linear_loss_is_the_clipped_sign_step():
    w = jnp.array([[1.0, -2.0], [0.0, 3.0]])[None, :, :, None]  # gradient of the loss
    x = jnp.array([[254.5, 0.5], [7.0, 100.0]])[None, :, :, None]

    def loss(pixels, key):
        del key
        return jnp.sum(w * pixels)

    adv = attacks.sign_gradient_attack(loss, x, jax.random.key(0), 4.0)
    np.testing.assert_array_equal(adv[0, :, :, 0], [[255.0, 0.0], [7.0, 104.0]])
    bim = attacks.sign_gradient_attack(loss, x, jax.random.key(0), 4.0, steps=5, step_size=1.0)
    np.testing.assert_array_equal(bim, adv)  # a linear loss: same corner of the ball
    with pytest.raises(ValueError, match="steps must be >= 1, got 0"):
        attacks.sign_gradient_attack(loss, x, jax.random.key(0), 4.0, steps=0)


@pytest.mark.parametrize("steps", [1, 3])
def test_perturbation_is_epsilon_in_linf_and_stays_in_the_pixel_range(trained, steps):
    restored, mesh, source = trained
    ds = restored.config.dataset
    step = attacks.make_attack_step(restored.model, mesh, ds.mean, ds.std, steps=steps)
    batch = next(iter(eval_iterator(source, ds, global_batch=64, normalised=False)))
    assert batch["image"].dtype == np.uint8
    eps = 6.0
    adv = np.asarray(
        step(
            restored.variables,
            shard_batch(batch, mesh),
            jax.random.key(0),
            jnp.float32(eps),
            jnp.full(3, 0.5),
        )
    )
    x = batch["image"].astype(np.float32)
    delta = np.abs(adv - x).reshape(len(x), -1)
    np.testing.assert_allclose(delta.max(axis=1), eps, rtol=1e-6)  # every image moves by ε
    assert adv.min() >= 0 and adv.max() <= 255
    if steps == 1:  # FGSM: every pixel is exactly ε away unless clipping stops it
        room = np.where(adv > x, 255 - x, x).reshape(len(x), -1)
        moved = (delta > 0) | (room == 0)
        assert moved.mean() > 0.99


def test_accuracy_does_not_increase_with_epsilon(trained):
    restored, mesh, source = trained
    ds = restored.config.dataset
    step = attacks.make_attack_step(restored.model, mesh, ds.mean, ds.std)
    eval_step = make_eval_step(restored.model, mesh)
    plain = ds.copy_and_resolve_references()
    plain.preprocess = "none"
    accuracy = []
    for eps in (0.0, 4.0, 16.0, 64.0):
        pixels, labels = attacks.attack_split(
            step,
            restored.variables,
            eval_iterator(source, ds, global_batch=128, limit=256, normalised=False),
            mesh,
            epsilon=eps,
            key=jax.random.key(0),
            thresholds=jnp.full(3, 0.5),
            num_examples=256,
            progress=False,
        )
        preds = predict(
            eval_step,
            restored.variables,
            eval_iterator(ArraySource(pixels, labels, 10), plain, global_batch=128),
            mesh,
            num_layers=3,
            progress=False,
        )
        accuracy.append(preds.correct.mean())
    assert accuracy[0] > 0.5  # the model is trained (chance: 0.1)
    assert all(b <= a for a, b in itertools.pairwise(accuracy)), accuracy
    assert accuracy[-1] < accuracy[0] - 0.2


def test_jpeg_at_quality_100_is_nearly_the_identity_and_low_quality_is_not(trained):
    _, _, source = trained
    images, _ = source.read(np.arange(16))
    rng = np.random.default_rng(0)
    noisy = np.clip(images + rng.integers(-20, 21, images.shape), 0, 255).astype(np.uint8)
    for x in (images, noisy):
        best = attacks.jpeg(x, 100).astype(np.int64) - x
        worst = attacks.jpeg(x, 5).astype(np.int64) - x
        assert np.abs(best).mean() < 0.5 and np.abs(best).max() <= 8
        assert np.abs(worst).mean() > 3 * max(np.abs(best).mean(), 0.3)
    with pytest.raises(ValueError, match="quality must be in \\[1, 100\\], got 0"):
        attacks.jpeg(images, 0)
    with pytest.raises(ValueError, match="uint8"):
        attacks.jpeg(images.astype(np.float32), 90)
