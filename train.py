"""Train ConvNet-AIG (or a plain ResNet) from an ml_collections config.

    python train.py --config configs/cifar10_resnet110_aig.py --workdir workdirs/aig110 \
        [--config.target_rate=0.5] [--multihost [--coordinator_address=HOST:PORT
        --num_processes=N --process_id=I]]

Rerunning the same command resumes from the newest checkpoint in ``--workdir``. A bad config,
dataset or workdir, or a diverged run, ends with one ``error: …`` line and exit status 2.
"""

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from aig_jax import cli
from aig_jax.compilation_cache import DEFAULT_DIR, use_compilation_cache
from aig_jax.train.loop import train_and_evaluate

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config file.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints and metrics.")
_MULTIHOST = flags.DEFINE_bool(
    "multihost", False, "Call jax.distributed.initialize() (one process per host)."
)
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0 (auto-detected on TPU pods and SLURM)."
)
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes (--multihost).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index (--multihost).")
_CACHE = flags.DEFINE_string(
    "compilation_cache",
    DEFAULT_DIR,
    "Directory of compiled programs reused by later runs ('' turns it off; "
    "JAX_COMPILATION_CACHE_DIR wins).",
)
flags.mark_flags_as_required(["config", "workdir"])


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO; -v 0 shows it
    if _MULTIHOST.value:
        jax.distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    use_compilation_cache(_CACHE.value)
    logging.info(
        "JAX %s on %d %s devices", jax.__version__, jax.device_count(), jax.default_backend()
    )
    results = train_and_evaluate(_CONFIG.value, _WORKDIR.value)
    for name, summary in results.items():
        if "top1_error" not in summary:  # not a classification
            continue
        rates = " ".join(f"{r:.2f}" for r in summary["layer_rates"])
        print(
            f"[{name} gates] top-1 error {summary['top1_error']:.2f}%  "
            f"top-5 error {summary['top5_error']:.2f}%  "
            f"{summary['realised_gmacs']:.4f} GMACs/image "
            f"({100 * summary['macs_saving']:.1f}% saved)\n  execution rate per block: {rates}"
        )


if __name__ == "__main__":
    cli.run(main)
