"""Evaluate a ConvNet-AIG checkpoint: the evaluators of its config, the report, optional attacks.

    python eval.py --workdir workdirs/aig110 [--modes argmax,sample,open,calibrated] \
        [--baseline workdirs/resnet110] [--attack --epsilons 1,2,4,8] [--limit 1000] [--fast]
    python eval.py --checkpoint converted/aig50 --config configs/imagenet_resnet50_aig.py \
        --config.dataset.data_dir /data/tfds

The model and the training config come from the checkpoint; ``--config`` replaces the config
(e.g. to point at the data), and must describe the same model. The evaluators are the config's
``config.evals``, all of them (``configs/default.py``'s when the config lists none), and the
flags override them: ``--modes`` replaces the classification evaluators, ``--samples`` sets the
seeds of sampled ones, ``--calibration_limit`` the calibration's images, ``--attack`` adds the
attack. The report (``report.json``, ``report.md``, PNG plots) goes to ``--output`` (default
``report/`` beside ``checkpoints/``).
"""

import os
from typing import Any

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from aig_jax import cli
from aig_jax.compilation_cache import DEFAULT_DIR, use_compilation_cache
from aig_jax.errors import ConfigError
from aig_jax.eval.evaluators import Attack, Classification, EvalContext
from aig_jax.eval.report import header, write_report
from aig_jax.eval.restore import restore
from aig_jax.eval.step import make_eval_step
from aig_jax.eval.suite import Evaluators, ordered
from aig_jax.inference.skipping import make_fast_eval_step
from aig_jax.model.gates import GATE_MODES, check_gate_mode
from aig_jax.sharding import make_mesh
from configs import default

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config (default: the checkpoint's).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir (holds checkpoints/).")
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "A checkpoints dir or one step's dir.")
_OUTPUT = flags.DEFINE_string("output", None, "Report directory (default: <workdir>/report).")
_BASELINE = flags.DEFINE_string("baseline", None, "Ungated baseline checkpoint to compare.")
_MODES = flags.DEFINE_list(
    "modes", None, f"Gate modes to classify in, of {GATE_MODES} (default: the config's)."
)
_SAMPLES = flags.DEFINE_integer("samples", 5, "Seeds of 'sample' mode (replaces the config's).")
_LIMIT = flags.DEFINE_integer("limit", None, "Evaluate only the first N examples.")
_BATCH = flags.DEFINE_integer("batch_size", None, "Global eval batch (default: the config's).")
_CALIB = flags.DEFINE_integer("calibration_limit", 10_000, "Training images to calibrate on.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of sampled gates and attacks.")
_ATTACK = flags.DEFINE_bool("attack", False, "Run the FGSM (or BIM) robustness evaluation.")
_EPSILONS = flags.DEFINE_list("epsilons", ["1", "2", "4", "8"], "Attack ε, pixels of 0–255.")
_STEPS = flags.DEFINE_integer("attack_steps", 1, "1: FGSM; more: iterative BIM/PGD.")
_ATTACK_MODE = flags.DEFINE_string("attack_mode", "argmax", "Gate mode of the attacked model.")
_JPEG = flags.DEFINE_integer("jpeg_quality", 75, "JPEG defence quality.")
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


def _evals(config: Any) -> dict[str, dict[str, Any]]:
    """The evaluators to run: the config's (``configs/default.py``'s when it lists none), with
    the flags' overrides."""
    listed = config.get("evals")
    evals = ordered(default.get_config().evals if listed is None else listed)
    if _MODES.value is not None:
        others = {n: e for n, e in evals.items() if e["type"] != "classification"}
        evals = {m: {"type": "classification", "mode": m} for m in _MODES.value} | others
    if _ATTACK.value:
        evals = {n: e for n, e in evals.items() if e["type"] != "attack"}
        evals["attack"] = {
            "type": "attack",
            "mode": _ATTACK_MODE.value,
            "epsilons": tuple(float(e) for e in _EPSILONS.value),
            "steps": _STEPS.value,
            "jpeg_quality": _JPEG.value,
        }
    if not any(e["type"] == "calibration" for e in evals.values()):
        evals["calibration"] = {"type": "calibration"}
    for entry in evals.values():
        if entry["type"] == "classification" and entry["mode"] == "sample":
            entry["seeds"] = _SAMPLES.value
        if entry["type"] == "calibration":
            entry["limit"] = _CALIB.value
    return evals


def evaluate() -> dict[str, Any]:
    """Run the evaluators and write the report; returns it."""
    for mode in (*(_MODES.value or ()), _ATTACK_MODE.value):
        check_gate_mode(mode)
    if _SAMPLES.value < 1:
        raise ConfigError(f"--samples must be >= 1, got {_SAMPLES.value}")
    config = _CONFIG.value
    mesh = make_mesh((config.num_devices or None) if config is not None else None)
    restored = restore(_WORKDIR.value or _CHECKPOINT.value, mesh, config)
    config = restored.config
    context = {
        "batch_size": _BATCH.value or config.eval_batch_size,
        "limit": _LIMIT.value,
        "seed": _SEED.value,
        "eval_step_factory": make_fast_eval_step if _FAST.value else make_eval_step,
    }
    ctx = EvalContext.create(restored.model, restored.spec, config.dataset, mesh, **context)
    evaluators = Evaluators(ctx, _evals(config))
    if not evaluators.names("classification"):
        raise ConfigError("config.evals has no classification evaluator to report: use --modes")
    output_dir = _OUTPUT.value or os.path.join(os.path.dirname(restored.directory), "report")
    results = evaluators.run(restored.variables, output_dir)
    report = header(ctx, restored.directory, restored.step, ctx.num_examples)
    report["modes"] = {n: results[n] for n in evaluators.names("classification")}
    report["calibration"] = results[evaluators.calibration] if evaluators.calibration else None
    base = base_ctx = None
    if _BASELINE.value:
        base = restore(_BASELINE.value, mesh)
        base_ctx = EvalContext.create(base.model, base.spec, config.dataset, mesh, **context)
        report["baseline"] = {
            "checkpoint": {"directory": base.directory, "step": base.step},
            "model": base.spec.to_json(),
            **Classification(base_ctx, "open").run(base.variables),
        }
    for name in evaluators.names("attack"):
        report["attack"] = {"gated": results[name]}
        if base is not None and base_ctx is not None:
            options = {
                k: v for k, v in evaluators.entries[name].items() if k not in ("type", "mode")
            }
            report["attack"]["baseline"] = Attack(base_ctx, "open", **options).run(base.variables)
    report["output_dir"] = os.path.abspath(output_dir)
    for name in evaluators.names("gate_statistics"):
        report["analysis"] = results[name]
    known = ("classification", "calibration", "attack", "gate_statistics")
    others = {n: r for n, r in results.items() if evaluators.entries[n]["type"] not in known}
    if others:  # a fork's evaluator types
        report["other_evaluators"] = others
    if jax.process_index() == 0:
        write_report(report, output_dir)
    return report


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
    report = evaluate()
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
        pairs = zip(result["epsilons"], result["accuracy"], result["accuracy_jpeg"], strict=True)
        print(f"[attack {who}] ε: accuracy / with JPEG: " + ", ".join(
            f"{e:g}: {a:.1f}/{j:.1f}" for e, a, j in pairs
        ))  # fmt: skip
    print(f"report: {report['output_dir']}")


if __name__ == "__main__":
    cli.run(main)
