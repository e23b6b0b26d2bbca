"""bench.device_check: the smoke run (every section at tiny sizes on the CPU), a cut, a resume,
the size check and how the CIFAR-10 runs are sized."""

import argparse
import json
import math
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from bench import device_check as dc
from tests.conftest import HANG_GUARD_S, REPO

MINI = dc.SHARED / "mini"
NO_MINI = f"real CIFAR-10 subset not found at {MINI}: the CIFAR-10 section is left out"


def _run(out: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device
    env.update(OUT=str(out), AIG_DEVICE_CHECK_WORK=str(out / "work"))
    cmd = [sys.executable, "-m", "bench.device_check", "--smoke", *args]
    proc = subprocess.run(
        cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=HANG_GUARD_S
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _numbers(tree, path=""):
    """(path, value) of every number in a JSON tree."""
    if isinstance(tree, dict):
        return [n for k, v in tree.items() for n in _numbers(v, f"{path}/{k}")]
    if isinstance(tree, list):
        return [n for i, v in enumerate(tree) for n in _numbers(v, f"{path}/{i}")]
    return [(path, tree)] if isinstance(tree, int | float) and not isinstance(tree, bool) else []


def test_smoke_runs_every_section_with_finite_figures(tmp_path):
    sections = ["speed", "loop", "skipping", "export"] + ["cifar10"] * MINI.is_dir()
    proc = _run(tmp_path, "--sections", *sections)
    results = json.loads((tmp_path / "device_check.json").read_text())
    assert results["jax_version"] and results["commit"] and results["device"] == "cpu"
    assert 0 < results["carried_mib"] < dc.LIMIT_MIB
    sections = results["sections"]
    for s in sections.values():
        assert s["status"] == "ok"
        assert s["seconds"] <= s["budget_s"] and s["estimate_s"] > 0
    (model,) = sections["speed"]["models"]
    for tag in ("gated", "ungated"):
        for side in (model[tag], model["reference"][tag]):
            assert side["train_images_per_s"] > 0 and side["infer_images_per_s"] > 0
        assert model[tag]["train_compile"]["compile_s"] > 0
    assert set(model["ratios"]) == {
        f"{s}_{v}" for s in ("train", "infer") for v in
        ("gated_over_ungated", "gated_over_reference", "ungated_over_reference")
    }  # fmt: skip
    (loop,) = sections["loop"]["loop"]
    keys = {"images_per_s", "bare_images_per_s", "over_bare_step", "input_wait_ms", "host_ms"}
    assert keys <= set(loop)
    (exported,) = sections["export"]["models"]
    assert exported["model"] == "resnet8_cifar" and exported["artefact_bytes"] > 0
    assert exported["rate_1.0"]["decisions_agree"] and exported["rate_0.5"]["decisions_agree"]
    (skipping,) = sections["skipping"]["skipping"]
    assert {"batch1_rate_0.5", "batch1_rate_1.0", "batch4_median"} <= set(skipping)
    numbers = _numbers(sections)
    assert all(math.isfinite(v) for _, v in numbers), [
        p for p, v in numbers if not math.isfinite(v)
    ]
    assert "speed     ok" in proc.stdout and "training loop resnet8_cifar" in proc.stdout
    assert (tmp_path / "device_check.txt").read_text().strip() in proc.stdout
    if not MINI.is_dir():
        pytest.skip(NO_MINI + " (every other section passed)")
    cifar = sections["cifar10"]
    assert set(cifar["runs"]) == {"aig110", "resnet110"}
    for name, run in cifar["runs"].items():
        assert run["step"] == run["total_steps"] == 3 and not run["cut"]
        assert 0 < run["packed_mib"] < 16 and (tmp_path / f"{name}.tar.gz").is_file()
    evaluation = cifar["evaluation"]
    assert set(evaluation["aig110"]) == {"argmax", "sample", "calibrated"}
    assert set(evaluation["resnet110"]) == {"open"}
    for modes in evaluation.values():
        for e in modes.values():
            assert 0 <= e["top1_error"] <= 100 and e["realised_gmacs"] > 0
    assert "cifar10 aig110: step 3 of 3" in proc.stdout and "next segment" not in proc.stdout


@pytest.mark.skipif(not MINI.is_dir(), reason=NO_MINI)
def test_resume_continues_a_packed_run_from_its_checkpoint(tmp_path):
    first = tmp_path / "first"
    _run(first, "--sections", "cifar10", "--models", "aig110")
    with tarfile.open(first / "aig110.tar.gz") as tar:
        tar.extractall(tmp_path / "run", filter="data")
    record = json.loads((tmp_path / "run/run.json").read_text())
    record["overrides"]["num_train_steps"] = 5  # two more steps than the smoke trained
    (tmp_path / "run/run.json").write_text(json.dumps(record))
    (tmp_path / "resume").mkdir()
    with tarfile.open(tmp_path / "resume/aig110.tar.gz", "w:gz") as tar:
        for item in ("checkpoints", "metrics.jsonl", "run.json"):
            tar.add(tmp_path / "run" / item, arcname=item)
    again = tmp_path / "again"
    proc = _run(again, "--sections", "cifar10", "--resume", str(tmp_path / "resume"))
    run = json.loads((again / "device_check.json").read_text())["sections"]["cifar10"]["runs"]
    assert list(run) == ["aig110"] and run["aig110"]["step"] == run["aig110"]["total_steps"] == 5
    with tarfile.open(again / "aig110.tar.gz") as tar:
        lines = tar.extractfile("metrics.jsonl").read().decode().splitlines()
    after = [r for r in map(json.loads, lines) if r["kind"] == "train"]
    before = (tmp_path / "run/metrics.jsonl").read_text().splitlines()
    assert [r["step"] for r in after] == [1, 2, 3, 4, 5]
    assert after[:3] == [r for r in map(json.loads, before) if r["kind"] == "train"]
    assert "aig110 calibrated: top-1 error" in proc.stdout


def test_a_section_that_overruns_is_cut_and_the_next_one_runs(tmp_path):
    proc = _run(tmp_path, "--sections", "loop", "export", "--budget", "loop=1")
    sections = json.loads((tmp_path / "device_check.json").read_text())["sections"]
    assert sections["loop"]["status"] == "cut" and sections["loop"]["budget_s"] == 1
    assert sections["export"]["status"] == "ok"
    assert "loop      cut" in proc.stdout


def test_a_call_over_the_size_limit_is_refused(monkeypatch):
    monkeypatch.setattr(dc, "carried_mib", lambda: 70.0)
    with pytest.raises(SystemExit, match=r"70.0 MiB, over 64 MiB"):
        dc.main(["--smoke", "--sections", "export"])


def test_cifar_runs_fill_the_budget_at_the_measured_speeds(tmp_path):
    measured = json.dumps({"aig110": 5000.0, "resnet110": 10000.0})  # 10 + 5 s per epoch
    args = argparse.Namespace(
        epochs=None, full_recipe=False, smoke=False, models=list(dc.RUNS), measured=measured
    )
    run = dc.new_run("aig110", args, dc.SIZES["full"], budget=dc.CIFAR_OVERHEAD_S + 10 * 15 + 14)
    o = run["overrides"]
    assert run["module"] == "configs.cifar10_resnet110_aig" and o["num_epochs"] == 10
    assert o["lr_boundaries_epochs"] == [5.0, 7.5] and o["dtype"] == "bfloat16"
    config = dc.cifar_config(json.loads(json.dumps(run)), tmp_path)  # as read back from a pack
    assert config.num_epochs == 10 and config.lr_boundaries_epochs == (5.0, 7.5)
    assert config.dataset.data_dir == str(tmp_path) and config.batch_size == 256
    assert (config.dataset.eval_split, config.eval_limit) == ("train", 1000)  # no test split
    (tmp_path / "cifar10_test.npz").touch()
    assert dc.cifar_config(run, tmp_path).dataset.eval_split == "test"
    args.full_recipe = True
    full = dc.new_run("resnet110", args, dc.SIZES["full"], 1.0)
    assert (
        full["overrides"]["num_epochs"] == 349 and "lr_boundaries_epochs" not in full["overrides"]
    )
    assert dc.cifar_config(full, tmp_path).lr_boundaries_epochs == (149, 249)
