"""Host measurements: the input pipeline's images/s (CIFAR and ImageNet preprocessing, from
decoded pixels and from JPEG bytes) and the training loop of ``train.py`` end to end."""

from __future__ import annotations

import io
import os
import tempfile
import time
from typing import Any

import numpy as np
from PIL import Image

from aig_jax.data import make_source, train_iterator
from aig_jax.train.loop import train_and_evaluate
from aig_jax.train.metrics import read_metrics
from configs import default


class JpegSource:
    """Photograph-like images of ImageNet's most common size (500×375) stored as JPEG bytes
    (quality 90) and decoded with Pillow at every read, as the TFDS source decodes ImageNet;
    ``distinct`` different images repeat over ``num_examples``."""

    def __init__(self, num_examples: int, distinct: int = 32) -> None:
        self.num_examples = num_examples
        rng = np.random.default_rng(0)
        yy, xx = np.mgrid[0:375, 0:500].astype(np.float32)
        self._jpegs = []
        for i in range(distinct):
            # Smooth shading plus sensor-like noise: the entropy of a photograph, roughly.
            f = rng.uniform(10, 60, size=(3, 2))
            smooth = [np.sin(xx / f[c, 0] + i) * np.cos(yy / f[c, 1] - c) for c in range(3)]
            pixels = 128 + 90 * np.stack(smooth, -1) + rng.normal(0, 12, (375, 500, 3))
            buffer = io.BytesIO()
            Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(buffer, "JPEG", quality=90)
            self._jpegs.append(buffer.getvalue())

    def __len__(self) -> int:
        return self.num_examples

    def read(self, indices: np.ndarray) -> tuple[list[np.ndarray], np.ndarray]:
        """Decoded uint8 [375, 500, 3] images (a list) and labels int32 [n]."""
        jpegs = [self._jpegs[int(i) % len(self._jpegs)] for i in indices]
        images = [np.asarray(Image.open(io.BytesIO(j)).convert("RGB")) for j in jpegs]
        return images, (np.asarray(indices) % 10).astype(np.int32)


def bench_pipeline(
    kind: str, source_kind: str, size: int, batch: int, steps: int
) -> dict[str, Any]:
    """Host images/s of ``train_iterator`` with ``kind`` ("cifar" or "imagenet") augmentation
    over ``source_kind`` images: "synthetic" (decoded pixels of the output size) or "jpeg"
    (:class:`JpegSource`, decoding included); uint8 batches as the trainer reads them
    (normalised on the device), and batches normalised on the host.

    Each of the host's threads makes whole batches, and they start together, so batches come
    in rounds of one per thread: the first round (thread start-up) is left out, and at least
    ``steps`` batches are timed in whole rounds, since timing part of a round would count the
    round's other batches as free or as lost."""
    cfg = default.get_config().dataset
    cfg.source, cfg.image_size, cfg.num_examples, cfg.preprocess = "synthetic", size, 4096, kind
    if kind == "imagenet":
        cfg.mean, cfg.std = default.IMAGENET_MEAN, default.IMAGENET_STD
    source = JpegSource(4096) if source_kind == "jpeg" else make_source(cfg, "train")
    result: dict[str, Any] = {
        "preprocess": kind,
        "source": source_kind,
        "image_size": size,
        "batch": batch,
    }
    threads = os.cpu_count() or 1
    timed = -(-steps // threads) * threads
    result["batches_timed"] = timed
    for label, normalised in (("images_per_s", False), ("host_normalised_images_per_s", True)):
        batches = train_iterator(
            source,
            cfg,
            global_batch=batch,
            seed=0,
            num_steps=threads + timed,
            num_threads=threads,
            normalised=normalised,
        )
        for _ in range(threads):  # the first round
            next(batches)
        start = time.perf_counter()
        for _ in batches:
            pass
        result[label] = batch * timed / (time.perf_counter() - start)
    return result


def bench_loop(name: str, size: int, batch: int, dtype: str, steps: int) -> dict[str, Any]:
    """The training loop of ``train.py`` (input pipeline, prefetching, logging) over synthetic
    data: images/s and input-wait share of its second logging interval of ``steps`` steps, the
    first one holding the compilation. Evaluation and checkpointing are left out by the loop's
    own timing."""
    config = default.get_config()
    config.model, config.dtype, config.batch_size = name, dtype, batch
    config.num_train_steps, config.log_every_steps = 2 * steps, steps
    config.evals = {"argmax": {"type": "classification", "mode": "argmax"}}
    config.eval_limit, config.eval_batch_size = batch, batch
    config.checkpoint_every_steps = 2 * steps
    config.data_threads = os.cpu_count() or 1
    config.progress, config.tensorboard = False, False
    ds = config.dataset
    ds.source, ds.image_size, ds.num_examples = "synthetic", size, 2 * steps * batch
    if size > 32:
        ds.preprocess, ds.mean, ds.std = "imagenet", default.IMAGENET_MEAN, default.IMAGENET_STD
    with tempfile.TemporaryDirectory(prefix="aig-jax-bench-loop-") as workdir:
        train_and_evaluate(config, workdir)
        last = read_metrics(workdir, "train")[-1]
    return {
        "model": name,
        "image_size": size,
        "batch": batch,
        "images_per_s": last["images_per_sec"],
        "input_wait_fraction": last["input_wait_fraction"],
    }
