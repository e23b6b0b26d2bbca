"""Host-side augmentation and normalisation: uint8 images in, float32 [n, S, S, 3] out.

``dataset_cfg.preprocess`` picks the recipe:

- "cifar": train = zero-pad ``crop_padding`` pixels, random S×S crop, random horizontal flip;
  eval = normalise only (images must already be S×S).
- "imagenet": train = RandomResizedCrop(S, scale=(0.08, 1), ratio=(3/4, 4/3)) as in
  torchvision, then flip; eval = resize the shorter side to round(S·256/224), centre crop S.
- "none": normalise only (images must already be S×S).

Every recipe ends with ``(x / 255 - mean) / std``. The random parameters of a batch are drawn
for the whole *global* batch from the generator passed in, and a process transforms only its
slice ``[offset, offset + n)``; so example j of a global batch is augmented identically
whatever the number of processes.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from numpy.lib.stride_tricks import sliding_window_view
from PIL import Image

from aig_jax.data.sources import Images

PREPROCESSORS = ("cifar", "imagenet", "none")
#: Pixel values span 0 … PIXEL_MAX (uint8 images).
PIXEL_MAX = 255.0
RRC_SCALE = (0.08, 1.0)
RRC_LOG_RATIO = (math.log(3 / 4), math.log(4 / 3))
RRC_ATTEMPTS = 10

Params = dict[str, np.ndarray]


def train_transform(
    images: Images,
    rng: np.random.Generator,
    cfg: Any,
    *,
    offset: int = 0,
    global_batch: int | None = None,
    normalised: bool = True,
) -> np.ndarray:
    """Augment and normalise ``images``, this process's slice of a global batch.

    ``images``: uint8 [n, H, W, 3] or a list of n uint8 [h, w, 3] arrays (imagenet recipe
    only), examples ``offset … offset + n - 1`` of a global batch of ``global_batch`` (default
    n). ``rng`` draws the random parameters of all ``global_batch`` examples, so the result
    does not depend on how the global batch is split. Returns float32 [n, S, S, 3], or with
    ``normalised=False`` the augmented uint8 pixels (normalised later, e.g. on the device).
    """
    n = len(images)
    total = n if global_batch is None else global_batch
    if offset < 0 or offset + n > total:
        raise ValueError(
            f"slice [{offset}, {offset + n}) of {n} images does not fit in a global batch of "
            f"{total}"
        )
    kind = _kind(cfg)
    if kind == "cifar":
        params = _slice(_cifar_params(rng, total, cfg), offset, n)
        pixels = _cifar_train(_fixed_size(images, cfg), params, cfg)
    elif kind == "imagenet":
        params = _slice(_imagenet_params(rng, total, cfg), offset, n)
        pixels = _imagenet_train(images, params, cfg.image_size)
    else:
        pixels = _fixed_size(images, cfg)
    return normalise(pixels, cfg) if normalised else pixels


def eval_transform(images: Images, cfg: Any, *, normalised: bool = True) -> np.ndarray:
    """Deterministic eval preprocessing of uint8 ``images`` (as for :func:`train_transform`).

    Returns float32 [n, S, S, 3], or with ``normalised=False`` the uint8 [n, S, S, 3] pixels
    before normalisation (what adversarial attacks and JPEG compression work on).
    """
    if _kind(cfg) == "imagenet":
        s = cfg.image_size
        pixels = np.stack([_resize_centre_crop(_rgb(im), s) for im in images])
    else:
        pixels = _fixed_size(images, cfg)
    return normalise(pixels, cfg) if normalised else pixels


def _kind(cfg: Any) -> str:
    kind: str = cfg.preprocess
    if kind not in PREPROCESSORS:
        raise ValueError(f"unknown preprocess {kind!r}; expected one of {PREPROCESSORS}")
    return kind


def _slice(params: Params, offset: int, n: int) -> Params:
    return {k: v[offset : offset + n] for k, v in params.items()}


def _fixed_size(images: Images, cfg: Any) -> np.ndarray:
    """``images`` as uint8 [n, S, S, 3], or a ``ValueError`` naming the shape found."""
    s = cfg.image_size
    if (
        not isinstance(images, np.ndarray)
        or images.dtype != np.uint8
        or images.shape[1:] != (s, s, 3)
    ):
        found = (
            f"{images.dtype} {list(images.shape)}"
            if isinstance(images, np.ndarray)
            else f"a list of {len(images)} arrays"
        )
        raise ValueError(
            f"preprocess {cfg.preprocess!r} needs uint8 [n, {s}, {s}, 3] images (image_size "
            f"{s}), got {found}; use preprocess 'imagenet' to resize other sizes"
        )
    return images


def _rgb(image: np.ndarray) -> np.ndarray:
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"expected a uint8 [h, w, 3] image, got {image.dtype} {list(image.shape)}")
    return image


def normalise(images: np.ndarray, cfg: Any) -> np.ndarray:
    """``(images / 255 - mean) / std`` per channel: [n, H, W, 3] pixels in 0–255 (uint8 or
    float) → float32 [n, H, W, 3]; ``cfg.mean``/``cfg.std`` are on the 0–1 scale."""
    mean = np.asarray(cfg.mean, np.float32)
    std = np.asarray(cfg.std, np.float32)
    if mean.shape != (3,) or std.shape != (3,) or not (std > 0).all():
        raise ValueError(
            f"mean and std must be 3 values (0–1 scale, std > 0), got {cfg.mean} and {cfg.std}"
        )
    n, h, w, _ = images.shape
    # Flat rows with the per-channel constants tiled along them: NumPy broadcasting over a
    # trailing axis of length 3 is several times slower.
    flat = images.reshape(n, h * w * 3).astype(np.float32)
    flat *= np.tile(1 / (255 * std), h * w)
    flat -= np.tile(mean / std, h * w)
    return flat.reshape(n, h, w, 3)


def normalise_pixels(pixels: jax.Array, mean: Any, std: Any) -> jax.Array:
    """:func:`normalise` traced, for the device: pixels [..., 3] in 0–255 (uint8 or float) →
    float32 [..., 3]; ``mean``/``std`` (3 values each) on the 0–1 scale."""
    scale = 1.0 / (PIXEL_MAX * jnp.asarray(std, jnp.float32))
    shift = jnp.asarray(mean, jnp.float32) / jnp.asarray(std, jnp.float32)
    return pixels.astype(jnp.float32) * scale - shift


def _hflip(images: np.ndarray, flip: np.ndarray) -> np.ndarray:
    """Mirror ``images[i]`` (uint8 [n, H, W, 3], modified in place) where ``flip[i]`` (bool [n])."""
    which = np.flatnonzero(flip)
    if which.size:
        _, h, w, _ = images.shape
        # Gathering the bytes in mirrored pixel order is much faster than copying
        # ``[:, :, ::-1]`` (a reversed walk over 3-byte pixels).
        mirror = (np.arange(w)[::-1, None] * 3 + np.arange(3)).ravel()
        rows = images[which].reshape(len(which), h, w * 3)
        images[which] = np.take(rows, mirror, axis=2).reshape(len(which), h, w, 3)
    return images


def _flip_draw(rng: np.random.Generator, total: int, cfg: Any) -> np.ndarray:
    return (rng.random(total) < 0.5) & bool(cfg.get("flip", True))


def _cifar_params(rng: np.random.Generator, total: int, cfg: Any) -> Params:
    """Crop offsets ``dy``, ``dx`` (int [total], in [0, 2·crop_padding]) and ``flip``."""
    pad = cfg.get("crop_padding", 4)
    if pad < 0:
        raise ValueError(f"crop_padding must be >= 0, got {pad}")
    dy, dx = rng.integers(0, 2 * pad + 1, size=(2, total))
    return {"dy": dy, "dx": dx, "flip": _flip_draw(rng, total, cfg)}


def _cifar_train(images: np.ndarray, params: Params, cfg: Any) -> np.ndarray:
    """Pad-and-crop plus flip of uint8 [n, S, S, 3], vectorised over the batch."""
    n, s = len(images), cfg.image_size
    pad = cfg.get("crop_padding", 4)
    padded = np.zeros((n, s + 2 * pad, s + 2 * pad, 3), np.uint8)
    padded[:, pad : pad + s, pad : pad + s] = images
    # windows[i, y, x] is the S×S×3 crop of image i at offset (y, x): one gather for the batch.
    windows = sliding_window_view(padded, (s, s, 3), axis=(1, 2, 3))[:, :, :, 0]
    crops = windows[np.arange(n), params["dy"], params["dx"]]
    return _hflip(crops, params["flip"])


def _imagenet_params(rng: np.random.Generator, total: int, cfg: Any) -> Params:
    """Uniform draws for RandomResizedCrop: ``scale``/``ratio`` [total, 10] (one per attempt),
    ``pos`` [total, 2] (crop corner as a fraction of the free range), and ``flip``."""
    return {
        "scale": rng.random((total, RRC_ATTEMPTS)),
        "ratio": rng.random((total, RRC_ATTEMPTS)),
        "pos": rng.random((total, 2)),
        "flip": _flip_draw(rng, total, cfg),
    }


def _crop_box(
    h: int, w: int, scale: np.ndarray, ratio: np.ndarray, pos: np.ndarray
) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop box ``(left, top, right, bottom)`` for an h×w image.

    ``scale``, ``ratio`` ([10] uniform draws) give the area fraction and log aspect ratio of
    each attempt; the first attempt that fits wins, placed at fraction ``pos`` ([2]) of the
    free range; if none fits, the largest centred crop with a ratio in range.
    """
    area = h * w * (RRC_SCALE[0] + (RRC_SCALE[1] - RRC_SCALE[0]) * scale)
    aspect = np.exp(RRC_LOG_RATIO[0] + (RRC_LOG_RATIO[1] - RRC_LOG_RATIO[0]) * ratio)
    widths = np.round(np.sqrt(area * aspect)).astype(int)
    heights = np.round(np.sqrt(area / aspect)).astype(int)
    fits = (widths > 0) & (widths <= w) & (heights > 0) & (heights <= h)
    if fits.any():
        k = int(np.argmax(fits))
        cw, ch = int(widths[k]), int(heights[k])
        top, left = int(pos[0] * (h - ch + 1)), int(pos[1] * (w - cw + 1))
    else:
        lo, hi = math.exp(RRC_LOG_RATIO[0]), math.exp(RRC_LOG_RATIO[1])
        cw, ch = w, h
        if w / h < lo:
            ch = round(w / lo)
        elif w / h > hi:
            cw = round(h * hi)
        top, left = (h - ch) // 2, (w - cw) // 2
    return left, top, left + cw, top + ch


def _imagenet_train(images: Images, params: Params, size: int) -> np.ndarray:
    """RandomResizedCrop to size×size (PIL bilinear) and flip, image by image → uint8."""
    out = np.empty((len(images), size, size, 3), np.uint8)
    for i, image in enumerate(images):
        h, w, _ = _rgb(image).shape
        box = _crop_box(h, w, params["scale"][i], params["ratio"][i], params["pos"][i])
        out[i] = np.asarray(
            Image.fromarray(image).resize((size, size), Image.Resampling.BILINEAR, box=box)
        )
    return _hflip(out, params["flip"])


def _resize_centre_crop(image: np.ndarray, size: int) -> np.ndarray:
    """Resize uint8 [h, w, 3] so the shorter side is round(size·256/224) (PIL bilinear, the
    longer side truncated as in torchvision), then the centre size×size crop → uint8."""
    h, w, _ = image.shape
    short = round(size * 256 / 224)
    nw, nh = (short, int(short * h / w)) if w <= h else (int(short * w / h), short)
    resized = np.asarray(Image.fromarray(image).resize((nw, nh), Image.Resampling.BILINEAR))
    top, left = round((nh - size) / 2), round((nw - size) / 2)
    return resized[top : top + size, left : left + size]
