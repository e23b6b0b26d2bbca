"""Export a trained ConvNet-AIG to one file that runs with jax and numpy alone.

    python -m aig_jax.export --workdir workdirs/tiny --out model.aig
    python -m aig_jax.export --checkpoint ckpt/aig110 --step 64000 --out aig110.aig \
        --platforms cpu,cuda --mode calibrated --dtype bfloat16

The artefact (see :mod:`aig_jax.export.artefact`) holds a batch-1 program that skips the
blocks an image does not execute, a batched program for any batch size, the weights, the input
spec (raw uint8 pixels, normalised inside), class names, per-block MACs and the gate
thresholds. ``--mode calibrated`` fits the thresholds on training images as ``eval.py`` does,
unless ``--thresholds`` gives them. ``--samples_dir`` also writes a few evaluation images as
PNG files to try the artefact on (``python -m aig_jax.export.predict``).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from aig_jax import cli
from aig_jax.checkpoint import resolve
from aig_jax.eval.evaluators import Calibration, EvalContext
from aig_jax.eval.restore import restore
from aig_jax.export import ExportError
from aig_jax.export.artefact import GATE_MODES, export_model
from aig_jax.export.programs import PLATFORMS, check_platforms
from aig_jax.export.samples import write_samples
from aig_jax.model.resnet import DTYPES
from aig_jax.sharding import make_mesh

#: Class names of the datasets that have them (``config.dataset.class_names`` wins).
CLASS_NAMES = {
    "cifar10": (
        "airplane",
        "automobile",
        "bird",
        "cat",
        "deer",
        "dog",
        "frog",
        "horse",
        "ship",
        "truck",
    ),
    "digits": tuple("0123456789"),
}

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config (default: the checkpoint's).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir (holds checkpoints/).")
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "A checkpoints dir or one step's dir.")
_STEP = flags.DEFINE_integer("step", None, "Step to export (default: the newest).")
_OUT = flags.DEFINE_string("out", None, "The artefact file to write, e.g. model.aig.")
_PLATFORMS = flags.DEFINE_list(
    "platforms", ["cpu", "cuda", "tpu"], f"Platforms to lower for, of {PLATFORMS}."
)
_MODE = flags.DEFINE_enum("mode", "argmax", GATE_MODES, "Test-time gate mode.")
_THRESHOLDS = flags.DEFINE_list("thresholds", None, "Calibrated thresholds, one per block.")
_CALIB = flags.DEFINE_integer("calibration_limit", 10_000, "Training images to calibrate on.")
_DTYPE = flags.DEFINE_enum("dtype", None, list(DTYPES), "Compute dtype (default: the model's).")
_CLASS_NAMES = flags.DEFINE_string(
    "class_names", None, "A text file of class names, one per line (default: the dataset's)."
)
_SAMPLES = flags.DEFINE_string("samples_dir", None, "Also write evaluation images here as PNG.")
_NUM_SAMPLES = flags.DEFINE_integer("num_samples", 4, "Images written to --samples_dir.")


def checkpoint_path(workdir: str | None, checkpoint: str | None, step: int | None) -> str:
    """The path :func:`~aig_jax.eval.restore.restore` reads: the workdir or checkpoint, or
    with ``step`` that step's directory."""
    path = workdir or checkpoint
    if path is None or (workdir is None) == (checkpoint is None):
        raise app.UsageError("give exactly one of --workdir and --checkpoint")
    if step is None:
        return path
    steps_dir, _ = resolve(path)
    if not os.path.isdir(os.path.join(steps_dir, str(step))):
        found = sorted(int(n) for n in os.listdir(steps_dir) if n.isdigit())
        if found:  # otherwise restore names what is missing
            raise ExportError(f"--step {step}: no such checkpoint in {steps_dir} (steps {found})")
    return os.path.join(steps_dir, str(step))


def class_names(path: str | None, dataset_cfg: Any, num_classes: int) -> list[str] | None:
    """The class names in the text file ``path`` (one per line), else
    ``dataset_cfg.class_names`` or the known names of its dataset, else None."""
    if path is not None:
        if not os.path.isfile(path):
            raise ExportError(f"--class_names {path}: no such file")
        with open(path) as f:
            names = [line.strip() for line in f if line.strip()]
        if len(names) != num_classes:
            raise ExportError(
                f"--class_names {path} names {len(names)} classes; the model has {num_classes}"
            )
        return names
    known = dataset_cfg.get("class_names") or CLASS_NAMES.get(dataset_cfg.get("name"))
    if known is None or len(known) != num_classes:
        return None
    return [str(n) for n in known]


def _thresholds(
    context: Callable[[], EvalContext], variables: Any, num_blocks: int
) -> tuple[np.ndarray | None, dict[str, Any] | None]:
    """The calibrated thresholds [L] and what the fit saw (or None for argmax)."""
    if _MODE.value == "argmax":
        if _THRESHOLDS.value:
            raise ExportError("--thresholds are for --mode calibrated")
        return None, None
    if _THRESHOLDS.value:
        try:
            given = np.asarray([float(t) for t in _THRESHOLDS.value], np.float32)
        except ValueError:
            raise ExportError(f"--thresholds must be numbers, got {_THRESHOLDS.value}") from None
        if given.shape != (num_blocks,):
            raise ExportError(f"--thresholds needs {num_blocks} values, got {len(given)}")
        return given, {"given": True}
    fit = Calibration(context(), limit=_CALIB.value).run(variables)
    return np.asarray(fit.pop("thresholds"), np.float32), fit


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if _OUT.value is None:
        raise app.UsageError("--out is required")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # Orbax logs every restore at INFO
    check_platforms(_PLATFORMS.value, "--platforms")  # before the restore, which takes time
    mesh = make_mesh(1)
    path = checkpoint_path(_WORKDIR.value, _CHECKPOINT.value, _STEP.value)
    restored = restore(path, mesh, _CONFIG.value)
    spec, config = restored.spec, restored.config
    model = spec.build(_DTYPE.value)
    context = functools.partial(
        EvalContext.create, model, spec, config.dataset, mesh,
        batch_size=config.eval_batch_size, progress=False,
    )  # fmt: skip
    names = class_names(_CLASS_NAMES.value, config.dataset, spec.num_classes)
    thresholds, calibration = _thresholds(context, restored.variables, len(spec.rates))
    manifest = export_model(
        _OUT.value,
        model,
        jax.device_get(restored.variables),
        image_size=config.dataset.image_size,
        preprocess=config.dataset.preprocess,
        mean=config.dataset.mean,
        std=config.dataset.std,
        gate_mode=_MODE.value,
        thresholds=thresholds,
        platforms=_PLATFORMS.value,
        class_names=names,
        about={
            "model": {**spec.to_json(), "dtype": _DTYPE.value or spec.dtype},
            "checkpoint": {"directory": restored.directory, "step": restored.step},
            "dataset": config.dataset.get("name"),
            "calibration": calibration,
        },
    )
    size = os.path.getsize(_OUT.value)
    print(
        f"wrote {_OUT.value} ({size / 1e6:.2f} MB): {spec.name} step {restored.step}, "
        f"{_MODE.value} gates, {len(manifest['blocks'])} blocks, batch-1 skipping and batched "
        f"programs for {', '.join(manifest['platforms'])}"
    )
    if _SAMPLES.value:
        paths = write_samples(config.dataset, _SAMPLES.value, _NUM_SAMPLES.value, class_names=names)
        print(f"wrote {len(paths)} {config.dataset.eval_split} images to {_SAMPLES.value}")


if __name__ == "__main__":
    cli.run(main)
