"""Two processes (``jax.distributed`` on localhost, 4 CPU devices each) train like one with 8."""

import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from aig_jax.train.loop import train_and_evaluate
from aig_jax.train.metrics import read_metrics
from tests.conftest import HANG_GUARD_S, REPO
from tests.test_train import assert_trees_close, restore_state, small_config


def distributed_config():
    """Three steps on 8 devices, batch 16 (2 images per device), evaluation at the end."""
    return small_config(num_devices=0, num_train_steps=3, eval_limit=40)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


#: How late process 1 finishes compiling its first program: more than gloo's 30 s.
LATE_S = 35


@pytest.mark.slow
def test_two_processes_end_with_the_parameters_of_one(tmp_path):
    """Also when one process compiles much more slowly than the other."""
    workdir = str(tmp_path / "two")
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": REPO}
    worker = os.path.join(REPO, "tests", "distributed_worker.py")
    logs = [tmp_path / f"process{i}.log" for i in range(2)]
    procs = []
    for i, log in enumerate(logs):
        with open(log, "w") as out:  # a file, not a pipe: a full pipe would block the worker
            procs.append(
                subprocess.Popen(
                    [sys.executable, worker, str(i), str(port), workdir, str(LATE_S)],
                    env=env,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                )
            )
    deadline = time.monotonic() + HANG_GUARD_S  # a hang guard, not a speed requirement
    # Stop both as soon as one fails: the other would wait for it in a collective.
    while time.monotonic() < deadline and not all(p.poll() == 0 for p in procs):
        if any(p.poll() not in (None, 0) for p in procs):
            break
        time.sleep(0.5)
    for proc in procs:
        proc.kill()
        proc.wait()
    outputs = [log.read_text() for log in logs]
    failed = [
        f"process {i} (exit {proc.returncode}):\n{out[-3000:]}"
        for i, (proc, out) in enumerate(zip(procs, outputs, strict=True))
        if proc.returncode != 0
    ]
    assert not failed, "\n".join(failed)
    assert f"compiled {LATE_S} s late" in outputs[1]
    two_errors = [float(o.split("top1_error")[-1].split()[0]) for o in outputs]
    assert two_errors[0] == two_errors[1]  # every process sees the whole evaluation

    one = str(tmp_path / "one")
    results = train_and_evaluate(distributed_config(), one)
    assert results["argmax"]["num_examples"] == 40
    config = distributed_config()
    two_vars, two_opt, two_meta = restore_state(workdir, config)
    one_vars, one_opt, one_meta = restore_state(one, config)
    assert two_meta["step"] == one_meta["step"] == 3
    assert_trees_close(two_vars, one_vars, atol=2e-5)
    assert_trees_close(two_opt, one_opt, atol=2e-5)
    np.testing.assert_allclose(two_errors[0], results["argmax"]["top1_error"], atol=1e-6)
    two_losses = [m["loss"] for m in read_metrics(workdir, "train")]
    one_losses = [m["loss"] for m in read_metrics(one, "train")]
    np.testing.assert_allclose(two_losses, one_losses, rtol=1e-5)
