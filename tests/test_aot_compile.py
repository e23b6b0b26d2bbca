"""bench/aot_compile.py end to end on this host's CPU (GPU targets need JAX's CUDA plugin, which
the tests do not install; tests/test_launches.py covers how a GPU program's kernels are read)."""

import json
import os
import subprocess
import sys

import pytest

from bench import aot_compile
from tests.conftest import HANG_GUARD_S

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*args):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    return subprocess.run(
        [sys.executable, "-m", "bench.aot_compile", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=HANG_GUARD_S,
    )


def test_cpu_target_writes_compile_times_and_kernels(tmp_path):
    out = tmp_path / "aot.json"
    args = ("--target", "cpu", "--tiny", "--variants", "gated", "ungated", "--repeats", "2")
    proc = _run(*args, "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    header = proc.stdout.splitlines()[1].split()
    assert header[5:] == ["compiled", "kernels"], header
    row = proc.stdout.splitlines()[2].split()
    assert row[-2] == "n/a" and int(row[-1]) > 0  # no PTX on a CPU
    assert str(out) in proc.stdout
    results = json.loads(out.read_text())
    assert results["target"] == "cpu" and results["host_cpus"] == os.cpu_count()
    (model,) = results["models"]
    assert model["model"] == "resnet8_cifar" and set(model) >= {"gated", "ungated"}
    for tag in ("gated", "ungated"):
        runs = model[tag]["compile_s_runs"]
        assert len(runs) == 2 and min(runs) > 0 and model[tag]["trace_s"] > 0
        assert model[tag]["compile_s"] == pytest.approx(sum(runs) / 2)  # the median of two
    assert model["gated"]["launches"] > 0 and model["ungated"]["launches"] > 0
    assert "compiled_kernels" not in model["gated"]  # XLA:CPU writes no PTX


def test_an_unknown_target_is_named():
    proc = _run("--target", "tpu9", "--tiny")
    assert proc.returncode == 2
    assert "unknown target 'tpu9'" in proc.stderr and "h100" in proc.stderr


def test_a_missing_cuda_plugin_is_a_clear_error(monkeypatch):
    from jax.experimental import topologies

    def no_plugin(*args, **kwargs):
        raise NotImplementedError("topology not implemented for cuda")

    monkeypatch.setattr(topologies, "get_topology_desc", no_plugin)
    with pytest.raises(RuntimeError, match=r"jax-cuda12-plugin\[with-cuda\]==\d"):
        aot_compile.target_devices("h100")
