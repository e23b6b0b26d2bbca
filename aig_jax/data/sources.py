"""Random-access image sources: ``source.read(indices) -> (images, labels)``.

A source is built from a dataset config and a split name by a builder registered in
:data:`SOURCES`; :func:`make_source` picks the builder named by ``dataset_cfg.source``. Sources
hold raw uint8 pixels; augmentation and normalisation live in :mod:`aig_jax.data.preprocess`.
Forks add sources with ``SOURCES.register("name", builder)``.
"""

from __future__ import annotations

import os
import re
import zipfile
import zlib
from collections.abc import Callable
from typing import Any, Protocol

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view
from PIL import Image

from aig_jax.errors import ConfigError, DataError
from aig_jax.registry import Registry

Images = np.ndarray | list[np.ndarray]


class Source(Protocol):
    """A finite, randomly addressable labelled image set."""

    num_classes: int

    def __len__(self) -> int: ...

    def read(self, indices: np.ndarray) -> tuple[Images, np.ndarray]:
        """Examples ``indices`` (int [n], each in [0, len)).

        Returns ``images``: uint8 [n, H, W, 3] for fixed-size sources, or a list of n uint8
        [h, w, 3] arrays for variable-size ones (ImageNet); and ``labels``: int32 [n].
        """
        ...


SOURCES: Registry[Callable[[Any, str], Source]] = Registry("dataset source")


def make_source(dataset_cfg: Any, split: str) -> Source:
    """The source ``dataset_cfg.source`` for ``split`` (e.g. "train", "test")."""
    return SOURCES.get(dataset_cfg.source)(dataset_cfg, split)


class ArraySource:
    """Examples held in memory: ``images`` uint8 [N, H, W, 3], ``labels`` int32 [N]."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, num_classes: int) -> None:
        self.images = images
        self.labels = labels
        self.num_classes = num_classes

    def __len__(self) -> int:
        return len(self.labels)

    def read(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``images[indices]`` uint8 [n, H, W, 3] and ``labels[indices]`` int32 [n]."""
        return self.images[indices], self.labels[indices]


def _check_labels(labels: np.ndarray, num_classes: int, where: str) -> np.ndarray:
    """``labels`` as int32 [N], or a :class:`DataError` naming ``where`` and the first bad
    label (labels must be integers: float class indices would be truncated)."""
    if labels.dtype.kind not in "iu":
        raise DataError(f"{where}: labels are {labels.dtype}, expected integer class indices")
    bad = (labels < 0) | (labels >= num_classes)
    if bad.any():
        raise DataError(f"{where}: label {labels[bad][0]} outside [0, {num_classes}) (num_classes)")
    return labels.astype(np.int32)


def _read_shard(path: str, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """One validated ``.npz`` shard: ``image`` uint8 [N, H, W, 3], ``label`` int32 [N]."""
    try:
        shard = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        raise DataError(f"{path} is not a readable .npz archive ({err})") from None
    if not isinstance(shard, np.lib.npyio.NpzFile):
        raise DataError(f"{path} is a single .npy array, expected an .npz archive")
    with shard:
        if "image" not in shard or "label" not in shard:
            raise DataError(f"{path}: expected arrays 'image' and 'label', found {shard.files}")
        images, labels = shard["image"], shard["label"]
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise DataError(
            f"{path}: 'image' is {images.dtype} {list(images.shape)}, expected uint8 [N, H, W, 3]"
        )
    if labels.shape != (len(images),):
        raise DataError(
            f"{path}: 'label' has shape {list(labels.shape)}, expected [{len(images)}] "
            "(one label per image)"
        )
    return images, _check_labels(labels, num_classes, path)


@SOURCES.decorator("npz")
def npz_source(dataset_cfg: Any, split: str) -> Source:
    """All ``*_{split}.npz`` / ``*_{split}_NN.npz`` shards of ``dataset_cfg.data_dir``, in order.

    Shards hold ``image`` uint8 [N, H, W, 3] and ``label`` [N] (the format that
    ``python -m aig_jax.data.cifar_archive`` writes); they are concatenated in sorted file-name
    order.
    """
    data_dir = dataset_cfg.data_dir
    if data_dir is None or not os.path.isdir(data_dir):
        raise DataError(f"npz data_dir {data_dir!r} is not a directory")
    pattern = rf"(^|_){re.escape(split)}(_\d+)?\.npz$"
    names = sorted(n for n in os.listdir(data_dir) if re.search(pattern, n))
    if not names:
        raise DataError(f"no file in {data_dir!r} matches {pattern!r} (split {split!r})")
    shards = [_read_shard(os.path.join(data_dir, n), dataset_cfg.num_classes) for n in names]
    sizes = {images.shape[1:] for images, _ in shards}
    if len(sizes) > 1:
        raise DataError(f"shards {names} in {data_dir!r} mix image shapes {sorted(sizes)}")
    images = np.concatenate([images for images, _ in shards])
    labels = np.concatenate([labels for _, labels in shards])
    return ArraySource(images, labels, dataset_cfg.num_classes)


class TfdsSource:
    """A prepared TensorFlow Datasets split read through ArrayRecord (no TensorFlow needed)."""

    def __init__(self, name: str, split: str, data_dir: str | None, num_classes: int) -> None:
        import tensorflow_datasets as tfds

        try:
            self._data = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
        except (FileNotFoundError, NotImplementedError) as e:
            raise DataError(
                f"TFDS dataset {name!r} (split {split!r}) is not prepared as ArrayRecord under "
                f"data_dir {data_dir!r}; prepare it once with `tfds build {name} "
                f"--file_format=array_record --data_dir {data_dir or '~/tensorflow_datasets'}` "
                "(needs TensorFlow: pip install 'aig-jax[prepare]')"
            ) from e
        features = self._data.dataset_info.features
        tfds_classes = features["label"].num_classes
        if tfds_classes != num_classes:
            raise DataError(
                f"TFDS dataset {name!r} has {tfds_classes} classes, config num_classes is "
                f"{num_classes}"
            )
        self.num_classes = num_classes
        self.fixed_size = None not in features["image"].shape

    def __len__(self) -> int:
        return len(self._data)

    def read(self, indices: np.ndarray) -> tuple[Images, np.ndarray]:
        """Decoded records: uint8 [n, H, W, 3] (fixed-size datasets) or a list of n uint8
        [h, w, 3] arrays (variable-size ones), and labels int32 [n]."""
        records = [self._data[int(i)] for i in indices]
        images = [np.asarray(r["image"], np.uint8) for r in records]
        labels = np.array([r["label"] for r in records], np.int32)
        if self.fixed_size:
            return np.stack(images), labels
        return images, labels


@SOURCES.decorator("tfds")
def tfds_source(dataset_cfg: Any, split: str) -> Source:
    """TFDS ``dataset_cfg.name`` (e.g. "cifar10", "imagenet2012"), split ``split``."""
    return TfdsSource(dataset_cfg.name, split, dataset_cfg.data_dir, dataset_cfg.num_classes)


class SyntheticSource:
    """``num_examples`` random-looking uint8 [S, S, 3] images, labels ``index % num_classes``.

    Image ``i`` is the window at offset ``(i · 40503) mod 2¹⁶`` of one fixed random byte string
    (seeded by the split name), so it depends only on ``(split, i)`` and a batch is one
    vectorised gather; there are 65,536 distinct images, repeating with that period.
    """

    _PERIOD = 1 << 16

    def __init__(self, num_examples: int, image_size: int, num_classes: int, split: str) -> None:
        if num_examples <= 0:
            raise ConfigError(f"synthetic num_examples must be positive, got {num_examples}")
        self.num_examples = num_examples
        self.image_size = image_size
        self.num_classes = num_classes
        rng = np.random.default_rng(zlib.crc32(split.encode()))
        pixels = image_size * image_size * 3
        self._windows = sliding_window_view(
            rng.integers(0, 256, self._PERIOD + pixels, dtype=np.uint8), pixels
        )

    def __len__(self) -> int:
        return self.num_examples

    def read(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Images uint8 [n, S, S, 3] and labels int32 [n] for ``indices``."""
        indices = np.asarray(indices, np.int64)
        offsets = (indices * 40503) % self._PERIOD
        s = self.image_size
        images = self._windows[offsets].reshape(len(indices), s, s, 3)
        return images, (indices % self.num_classes).astype(np.int32)


@SOURCES.decorator("synthetic")
def synthetic_source(dataset_cfg: Any, split: str) -> Source:
    """``dataset_cfg.num_examples`` synthetic images of ``dataset_cfg.image_size``² (benchmarks)."""
    return SyntheticSource(
        dataset_cfg.num_examples, dataset_cfg.image_size, dataset_cfg.num_classes, split
    )


_DIGITS_SPLITS = ("train", "test")


@SOURCES.decorator("digits")
def digits_source(dataset_cfg: Any, split: str) -> Source:
    """scikit-learn's 1,797 8×8 handwritten digits as uint8 [N, S, S, 3] (S = ``image_size``).

    Pixel values 0–16 are scaled to 0–255, upsampled with PIL bilinear and replicated to three
    channels. "train"/"test" are a fixed stratified 80/20 split (1,437 / 360 examples).
    """
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as e:
        raise ImportError(
            "the 'digits' source needs scikit-learn: pip install 'aig-jax[demo]'"
        ) from e
    if split not in _DIGITS_SPLITS:
        raise ConfigError(f"digits split must be one of {_DIGITS_SPLITS}, got {split!r}")
    if dataset_cfg.num_classes != 10:
        raise ConfigError(f"digits has 10 classes, config num_classes is {dataset_cfg.num_classes}")
    digits = load_digits()
    labels = digits.target.astype(np.int32)
    train, test = train_test_split(
        np.arange(len(labels)), test_size=0.2, stratify=labels, random_state=0
    )
    keep = np.sort(train if split == "train" else test)
    size = dataset_cfg.get("image_size", 32)
    small = np.round(digits.images[keep] * (255 / 16)).astype(np.uint8)
    images = np.stack(
        [
            np.asarray(Image.fromarray(im).resize((size, size), Image.Resampling.BILINEAR))
            for im in small
        ]
    )
    return ArraySource(np.repeat(images[..., None], 3, axis=-1), labels[keep], 10)
