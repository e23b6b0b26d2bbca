"""A few images of a dataset split written as PNG files, to try an exported model on."""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

from aig_jax.data.sources import make_source


def write_samples(
    dataset_cfg: Any,
    out_dir: str,
    count: int,
    *,
    split: str | None = None,
    class_names: Sequence[str] | None = None,
) -> list[str]:
    """Write the first ``count`` images of ``split`` (default the evaluation split) as they
    are stored (raw pixels, before any transform) to ``out_dir``/``<split><index>_<label>.png``;
    returns the paths. The label is its class name when ``class_names`` are given."""
    split = split or dataset_cfg.eval_split
    source = make_source(dataset_cfg, split)
    images, labels = source.read(np.arange(min(count, len(source))))
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for i, (image, label) in enumerate(zip(images, labels, strict=True)):
        name = str(label) if class_names is None else class_names[int(label)]
        path = os.path.join(out_dir, f"{split}{i:04d}_{re.sub(r'[^A-Za-z0-9-]', '-', name)}.png")
        Image.fromarray(np.asarray(image, np.uint8)).save(path)
        paths.append(path)
    return paths
