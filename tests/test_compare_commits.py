"""bench.compare_commits: the figures it summarises, and HEAD against itself end to end."""

import json
import os
import subprocess
import sys

import pytest

from bench import compare_commits as cc
from tests.conftest import HANG_GUARD_S, REPO


def test_flatten_names_list_items_by_model_and_keeps_numbers_only():
    tree = {
        "device": "cpu",
        "models": [{"model": "m", "image_size": 16, "batch": 4, "gated": {"a": 2, "ok": True}}],
        "loop": [{"x": 1.5}],
    }
    assert cc.flatten(tree) == {
        "models/m:16:4/image_size": 16.0,
        "models/m:16:4/batch": 4.0,
        "models/m:16:4/gated/a": 2.0,
        "loop/0/x": 1.5,
    }


def test_summary_is_median_and_range_per_commit_and_the_ratio_of_medians():
    runs = [
        {"commit": c, "results": {"m": {"train_images_per_s": v, "other": 1}}}
        for c, v in (("before", 10.0), ("after", 30.0), ("before", 20.0), ("after", 20.0),
                     ("before", 90.0), ("after", 25.0))
    ]  # fmt: skip
    summary = cc.summarise(runs, r"images_per_s")
    assert list(summary) == ["m/train_images_per_s"]
    entry = summary["m/train_images_per_s"]
    assert entry["before"] == {"median": 20.0, "min": 10.0, "max": 90.0, "n": 3}
    assert entry["after"] == {"median": 25.0, "min": 20.0, "max": 30.0, "n": 3}
    assert entry["ratio"] == pytest.approx(1.25)


def _worktrees() -> str:
    run = ["git", "worktree", "list", "--porcelain"]
    return subprocess.run(run, cwd=REPO, check=True, capture_output=True, text=True).stdout


def test_head_against_itself_runs_the_same_bench_on_both_and_cleans_up(tmp_path):
    before = _worktrees()
    out = tmp_path / "compare.json"
    cmd = [sys.executable, "-m", "bench.compare_commits", "--before", "HEAD", "--repeats", "1",
           "--out", str(out), "--", "--tiny", "--sections", "compile_cache"]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device
    run = {"cwd": REPO, "env": env, "capture_output": True, "text": True}
    proc = subprocess.run(cmd, **run, timeout=HANG_GUARD_S)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _worktrees() == before
    report = json.loads(out.read_text())
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True)
    assert {c["sha"] for c in report["commits"].values()} == {head.stdout.strip()}
    assert [r["commit"] for r in report["runs"]] == ["before", "after"]
    assert set(report["summary"]) == {
        "compile_cache/cold_compile_s",
        "compile_cache/warm_compile_s",
    }
    assert all(e["ratio"] > 0 for e in report["summary"].values())
    assert "compile_cache/cold_compile_s" in proc.stdout
