"""Evaluate a ConvNet-AIG checkpoint: every gate mode, the report, optional attacks.

    python eval.py --workdir workdirs/aig110 [--modes argmax,sample,open,calibrated] \
        [--baseline workdirs/resnet110] [--attack --epsilons 1,2,4,8] [--limit 1000] [--fast]
    python eval.py --checkpoint converted/aig50 --config configs/imagenet_resnet50_aig.py \
        --config.dataset.data_dir /data/tfds

The model and the training config come from the checkpoint; ``--config`` replaces the config
(e.g. to point at the data), and must describe the same model. The report (``report.json``,
``report.md``, PNG plots) goes to ``--output`` (default ``report/`` beside ``checkpoints/``).
"""

import sys

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from aig_jax.checkpoint import CheckpointError
from aig_jax.compilation_cache import DEFAULT_DIR, use_compilation_cache
from aig_jax.evaluator import EvalOptions, evaluate_checkpoint
from aig_jax.gates import GATE_MODES
from aig_jax.skip_inference import make_fast_eval_step
from aig_jax.steps import make_eval_step

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config (default: the checkpoint's).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir (holds checkpoints/).")
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "A checkpoints dir or one step's dir.")
_OUTPUT = flags.DEFINE_string("output", None, "Report directory (default: <workdir>/report).")
_BASELINE = flags.DEFINE_string("baseline", None, "Ungated baseline checkpoint to compare.")
_MODES = flags.DEFINE_list("modes", list(EvalOptions.modes), f"Gate modes, of {GATE_MODES}.")
_SAMPLES = flags.DEFINE_integer("samples", EvalOptions.samples, "Seeds of 'sample' mode.")
_LIMIT = flags.DEFINE_integer("limit", None, "Evaluate only the first N examples.")
_BATCH = flags.DEFINE_integer("batch_size", None, "Global eval batch (default: the config's).")
_CALIB = flags.DEFINE_integer(
    "calibration_limit", EvalOptions.calibration_limit, "Training images to calibrate on."
)
_SEED = flags.DEFINE_integer("seed", 0, "Seed of sampled gates and attacks.")
_ATTACK = flags.DEFINE_bool("attack", False, "Run the FGSM (or BIM) robustness evaluation.")
_EPSILONS = flags.DEFINE_list(
    "epsilons", [f"{e:g}" for e in EvalOptions.epsilons], "Attack ε, pixels of the 0–255 image."
)
_STEPS = flags.DEFINE_integer("attack_steps", 1, "1: FGSM; more: iterative BIM/PGD.")
_ATTACK_MODE = flags.DEFINE_string("attack_mode", "argmax", "Gate mode of the attacked model.")
_JPEG = flags.DEFINE_integer("jpeg_quality", EvalOptions.jpeg_quality, "JPEG defence quality.")
_MULTIHOST = flags.DEFINE_bool("multihost", False, "Call jax.distributed.initialize().")
_CACHE = flags.DEFINE_string(
    "compilation_cache", DEFAULT_DIR, "Directory of compiled programs ('' turns it off)."
)
_FAST = flags.DEFINE_bool(
    "fast",
    False,
    "Skip the blocks whose gate is 0 (lax.cond on CPU or at batch 1, a Pallas kernel on "
    "accelerators at CIFAR sizes) instead of masking them; same outputs.",
)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if (_WORKDIR.value is None) == (_CHECKPOINT.value is None):
        raise app.UsageError("give exactly one of --workdir and --checkpoint")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # Orbax logs every restore at INFO
    if _MULTIHOST.value:
        jax.distributed.initialize()
    use_compilation_cache(_CACHE.value)
    options = EvalOptions(
        modes=tuple(_MODES.value),
        samples=_SAMPLES.value,
        limit=_LIMIT.value,
        batch_size=_BATCH.value,
        calibration_limit=_CALIB.value,
        seed=_SEED.value,
        attack=_ATTACK.value,
        epsilons=tuple(float(e) for e in _EPSILONS.value),
        attack_steps=_STEPS.value,
        attack_mode=_ATTACK_MODE.value,
        jpeg_quality=_JPEG.value,
    )
    try:
        report = evaluate_checkpoint(
            _WORKDIR.value or _CHECKPOINT.value,
            _OUTPUT.value,
            config=_CONFIG.value,
            baseline=_BASELINE.value,
            options=options,
            eval_step_factory=make_fast_eval_step if _FAST.value else make_eval_step,
        )
    except (CheckpointError, ValueError, FileNotFoundError) as err:
        sys.exit(f"error: {err}")
    rows = dict(report["modes"])
    if "baseline" in report:
        rows["baseline"] = report["baseline"]
    for mode, s in rows.items():
        std = s.get("seed_std", {})
        spread = f" ± {std['top1_error']:.2f}" if std else ""
        print(
            f"[{mode}] top-1 error {s['top1_error']:.2f}%{spread}  top-5 error "
            f"{s['top5_error']:.2f}%  {s['realised_gmacs']:.4f} GMACs/image "
            f"({100 * s['macs_saving']:.1f}% saved)  {s['mean_executed_blocks']:.2f} blocks  "
            f"{s['images_per_sec']:.0f} images/s"
        )
    for who, result in report.get("attack", {}).items():
        if isinstance(result, dict):
            pairs = zip(
                result["epsilons"], result["accuracy"], result["accuracy_jpeg"], strict=True
            )
            print(f"[attack {who}] ε: accuracy / with JPEG: " + ", ".join(
                f"{e:g}: {a:.1f}/{j:.1f}" for e, a, j in pairs
            ))  # fmt: skip
    print(f"report: {report.get('output_dir', '')}")


if __name__ == "__main__":
    app.run(main)
