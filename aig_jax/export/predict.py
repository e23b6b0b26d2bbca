"""Classify image files with an exported model, one image at a time (the skipping program).

    python -m aig_jax.export.predict model.aig digit.png cat.jpg ...

Prints per image its top-5 classes with their probabilities, the residual blocks it executed
(e.g. "31/54") and the multiply-accumulates it cost. An image of another size than the model's
is brought to it as the evaluation transform does (ImageNet-style models: shorter side resized,
centre crop; others: resized), with a note. A missing or unreadable file, a corrupt, truncated
or too new artefact, or one not exported for this platform stops it with one ``error:`` line.
"""

from __future__ import annotations

import argparse
import os
import sys
import types

import numpy as np
from PIL import Image, UnidentifiedImageError

from aig_jax.data.preprocess import eval_transform
from aig_jax.errors import exit_on_user_error
from aig_jax.export import ExportError
from aig_jax.export.runtime import ArtefactError, Exported


def load_image(path: str, size: int, preprocess: str) -> tuple[np.ndarray, str | None]:
    """The image file ``path`` as uint8 [size, size, 3] for a model evaluated with the
    transform ``preprocess``, and a note saying how it was resized (None if it was not)."""
    if not os.path.isfile(path):
        raise ExportError(f"no such image file: {path}")
    try:
        with Image.open(path) as image:
            pixels = np.asarray(image.convert("RGB"))
    except (UnidentifiedImageError, OSError) as err:
        raise ExportError(f"{path} is not a readable image: {err}") from None
    h, w, _ = pixels.shape
    if preprocess == "imagenet":  # resized and cropped like every evaluation image
        cfg = types.SimpleNamespace(preprocess=preprocess, image_size=size)
        out = eval_transform([pixels], cfg, normalised=False)[0]
        how = f"resized its shorter side to {round(size * 256 / 224)}, centre-cropped"
    elif (h, w) == (size, size):
        return pixels, None
    else:
        out = np.asarray(Image.fromarray(pixels).resize((size, size), Image.Resampling.BILINEAR))
        how = "resized it"
    note = None if (h, w) == (size, size) else f"{path} is {w}×{h}: {how} to {size}×{size}"
    return out, note


def describe(model: Exported, logits: np.ndarray, decisions: np.ndarray, macs: float) -> str:
    """One image's result: top-5 classes with probabilities, blocks executed, GMACs."""
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    names = model.class_names or [str(k) for k in range(len(logits))]
    top = np.argsort(-logits, kind="stable")[:5]
    classes = ", ".join(f"{names[k]} {probs[k]:.1%}" for k in top)
    return f"{classes} | blocks {int(decisions.sum())}/{len(decisions)} | {macs / 1e9:.4g} GMACs"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m aig_jax.export.predict", description=__doc__)
    parser.add_argument("model", help="an artefact written by python -m aig_jax.export")
    parser.add_argument("images", nargs="+", help="image files (PNG, JPEG, ...)")
    parser.add_argument("--platform", help="cpu, cuda, rocm or tpu (default: this machine's)")
    args = parser.parse_args(argv)
    try:
        model = Exported.load(args.model, platform=args.platform)
    except ArtefactError as err:
        raise ExportError(str(err)) from None
    spec = model.manifest["input"]
    images = [load_image(p, model.image_size, spec["preprocess"]) for p in args.images]
    for path, (pixels, note) in zip(args.images, images, strict=True):
        if note:
            print(f"note: {note}", file=sys.stderr)
        out = model(pixels[None])
        print(f"{path}: {describe(model, out.logits[0], out.decisions[:, 0], out.macs[0])}")


if __name__ == "__main__":
    exit_on_user_error(main)()
