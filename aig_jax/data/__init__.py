"""Input pipeline: image sources, host-side preprocessing and deterministic batch iterators."""

from aig_jax.data.loader import eval_iterator, num_eval_batches, steps_per_epoch, train_iterator
from aig_jax.data.preprocess import eval_transform, train_transform
from aig_jax.data.sources import SOURCES, Source, make_source

__all__ = [
    "SOURCES",
    "Source",
    "eval_iterator",
    "eval_transform",
    "make_source",
    "num_eval_batches",
    "steps_per_epoch",
    "train_iterator",
    "train_transform",
]
