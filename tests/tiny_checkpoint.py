"""A ConvNet-AIG 8 trained for a few dozen steps on the digits source, for evaluation tests."""

import fcntl
import os

import jax

from aig_jax.checkpoint import save_variables
from aig_jax.model.spec import ModelSpec
from aig_jax.train.loop import train_and_evaluate
from configs import tiny


def tiny_config(steps):
    """The tiny digits config, shortened to ``steps`` steps with one final evaluation."""
    config = tiny.get_config()
    config.num_train_steps = steps
    config.eval_every_epochs = 1000.0
    config.evals.sample.during_training = False  # eval.py still runs it
    config.progress = False
    config.tensorboard = False
    return config


def trained_tiny(tmp_path_factory, steps=100):
    """(workdir, config) of the gated tiny model trained for ``steps`` steps on one device.

    Trained once per test session: the pytest-xdist workers share the parent of their
    temporary directories, and a file lock lets the first one train while the others wait.
    """
    config = tiny_config(steps)
    config.num_devices = 1  # faster to compile; evaluation still shards over every device
    root = tmp_path_factory.getbasetemp().parent
    workdir = os.path.join(root, f"tiny_aig_{steps}")
    with open(os.path.join(root, f"tiny_aig_{steps}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not os.path.exists(os.path.join(workdir, "trained")):
            train_and_evaluate(config, workdir)
            open(os.path.join(workdir, "trained"), "w").close()
    return workdir, config


def without_gates(tree):
    """A variables collection ({block: {layer: ...}}) with every block's "gate" removed."""
    return {
        name: {k: v for k, v in sub.items() if k != "gate"} if isinstance(sub, dict) else sub
        for name, sub in tree.items()
    }


def save_ungated_copy(variables, directory, config):
    """Save the gated ``variables`` minus their gates as an ungated (target 1) checkpoint."""
    config = config.copy_and_resolve_references()
    config.target_rate = 1.0
    config.gate_rate_one_blocks = "drop"  # rate-1 blocks without gates: the plain ResNet
    spec = ModelSpec.from_config(config)
    host = jax.device_get({k: without_gates(v) for k, v in variables.items()})
    meta = {"model": spec.to_json(), "config": config.to_dict()}
    save_variables(str(directory), 0, host, meta)
