"""Adversarial examples in 0–255 pixel space and the JPEG-compression defence.

Attacks are untargeted L∞ sign-gradient attacks on the cross-entropy: FGSM (one step of size
ε) and its iterative form BIM/PGD (several smaller steps, projected back onto the ε-ball).
They work on the pixels (uint8 images as floats, ε in pixel units of the 0–255 image, as in
the paper), normalise inside the differentiated function exactly as the input pipeline does,
and clip to [0, 255]. Gradients flow through the gates' straight-through estimators, so the
attacker sees the gated network as it is trained. The attacked images are then rounded to
uint8: they are valid 8-bit images, which JPEG compression needs anyway.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from aig_jax.data.preprocess import PIXEL_MAX, normalise_pixels
from aig_jax.model.resnet import ModelOutput
from aig_jax.sharding import batch_sharded, shard_batch

LossFn = Callable[[jax.Array, jax.Array], jax.Array]
AttackStep = Callable[..., jax.Array]


def sign_gradient_attack(
    loss_fn: LossFn,
    pixels: jax.Array,
    key: jax.Array,
    epsilon: jax.Array | float,
    *,
    steps: int = 1,
    step_size: jax.Array | float | None = None,
) -> jax.Array:
    """Maximise ``loss_fn`` within the L∞ ball of radius ``epsilon`` around ``pixels``.

    Args:
      loss_fn: ``loss_fn(pixels, key) -> scalar`` to increase (e.g. summed cross-entropy).
      pixels: [B, H, W, C] float images in [0, 255].
      key: PRNG key, folded with the step number for stochastic models.
      epsilon: radius in pixel units.
      steps: 1 is FGSM; more is BIM/PGD (iterated steps, each projected on the ball).
      step_size: per-step size; default ``epsilon`` for FGSM, else ``2.5 · epsilon / steps``.

    Returns:
      [B, H, W, C] float32 adversarial images with ``|x_adv - x| ≤ epsilon`` and values in
      [0, 255].
    """
    if steps < 1:
        raise ValueError(f"attack steps must be >= 1, got {steps}")
    x0 = pixels.astype(jnp.float32)
    eps = jnp.asarray(epsilon, jnp.float32)
    if step_size is None:
        alpha = eps if steps == 1 else 2.5 * eps / steps
    else:
        alpha = jnp.asarray(step_size, jnp.float32)
    grad_fn = jax.grad(loss_fn)

    def body(i: int | jax.Array, x: jax.Array) -> jax.Array:
        g = grad_fn(x, jax.random.fold_in(key, i))
        x = x + alpha * jnp.sign(g)
        x = jnp.clip(x, x0 - eps, x0 + eps)
        return jnp.clip(x, 0.0, PIXEL_MAX)

    return jax.lax.fori_loop(0, steps, body, x0)


def make_attack_step(
    model: nn.Module,
    mesh: jax.sharding.Mesh,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    *,
    gate_mode: str = "argmax",
    steps: int = 1,
    step_size: float | None = None,
) -> AttackStep:
    """Build ``step(variables, batch, key, epsilon, thresholds) -> adversarial pixels``.

    ``batch["image"]`` holds uint8 (or float) pixels [B, H, W, 3] sharded over ``data``;
    ``mean``/``std`` are the dataset's normalisation on the 0–1 scale. The model runs in
    evaluation mode (running BatchNorm statistics) with ``gate_mode`` gates (``thresholds`` [L]
    for "calibrated"); the loss is the cross-entropy summed over the batch, so each image's
    gradient is its own. Returns float32 [B, H, W, 3] pixels, sharded like the batch.
    """

    def step(
        variables: Mapping[str, Any],
        batch: Mapping[str, jax.Array],
        key: jax.Array,
        epsilon: jax.Array,
        thresholds: jax.Array,
    ) -> jax.Array:
        labels = batch["label"]

        def loss_fn(x: jax.Array, k: jax.Array) -> jax.Array:
            out: ModelOutput = model.apply(  # type: ignore[assignment]  # no mutable collections
                variables,
                normalise_pixels(x, mean, std),
                train=False,
                gate_mode=gate_mode,
                thresholds=thresholds,
                rngs={"gumbel": k},
            )
            log_probs = jax.nn.log_softmax(out.logits)
            one_hot = jax.nn.one_hot(labels, log_probs.shape[-1], dtype=log_probs.dtype)
            return -jnp.sum(one_hot * log_probs)  # dense gradient: keeps the batch sharding

        return sign_gradient_attack(
            loss_fn, batch["image"], key, epsilon, steps=steps, step_size=step_size
        )

    return jax.jit(step, out_shardings=batch_sharded(mesh))


def jpeg(images: np.ndarray, quality: int) -> np.ndarray:
    """JPEG-compress and decode each uint8 image of ``images`` [N, H, W, 3] at ``quality``.

    Returns uint8 [N, H, W, 3]. Quality is Pillow's 1 (smallest) … 95 (best; up to 100
    allowed, with chroma subsampling switched off at 100 so it is nearly lossless).
    """
    if not 1 <= quality <= 100:
        raise ValueError(f"JPEG quality must be in [1, 100], got {quality}")
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4:
        raise ValueError(f"expected uint8 [N, H, W, 3] images, got {images.dtype} {images.shape}")
    out = np.empty_like(images)
    subsampling = 0 if quality == 100 else -1  # -1: Pillow's default for the quality
    for i, image in enumerate(images):
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="JPEG", quality=quality, subsampling=subsampling)
        buffer.seek(0)
        out[i] = np.asarray(Image.open(buffer).convert("RGB"))
    return out


def _local_rows(x: jax.Array) -> np.ndarray:
    """This process's rows of a batch-sharded array, in order (all rows on one host)."""
    shards = {s.index[0].start or 0: s for s in x.addressable_shards}
    return np.concatenate([np.asarray(shards[k].data) for k in sorted(shards)])


def attack_split(
    attack_step: AttackStep,
    variables: Mapping[str, Any],
    batches: Iterable[Mapping[str, np.ndarray]],
    mesh: jax.sharding.Mesh,
    *,
    epsilon: float,
    key: jax.Array,
    thresholds: jax.Array,
    num_examples: int,
    total: int | None = None,
    desc: str = "attack",
    progress: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Attack every example of the uint8 eval batches (``eval_iterator(..., normalised=False)``).

    Returns (pixels uint8 [M, H, W, 3], labels int32 [M]) indexed by example index, M =
    ``num_examples``; this process's examples are filled in (others stay zero). Batch i uses
    ``fold_in(key, i)``.
    """
    pixels: np.ndarray | None = None
    labels = np.zeros(num_examples, np.int32)
    eps = jnp.float32(epsilon)
    show = progress and jax.process_index() == 0
    for i, batch in enumerate(tqdm(batches, total=total, desc=desc, disable=not show)):
        adv = attack_step(
            variables, shard_batch(batch, mesh), jax.random.fold_in(key, i), eps, thresholds
        )
        rows = np.clip(np.rint(_local_rows(adv)), 0, PIXEL_MAX).astype(np.uint8)
        if pixels is None:
            pixels = np.zeros((num_examples, *rows.shape[1:]), np.uint8)
        keep = np.asarray(batch["mask"], bool)
        index = np.asarray(batch["index"])[keep]
        pixels[index] = rows[keep]
        labels[index] = np.asarray(batch["label"])[keep]
    if pixels is None:
        raise ValueError("the evaluation split yielded no batches")
    return pixels, labels
