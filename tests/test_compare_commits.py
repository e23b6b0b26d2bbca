"""bench/compare_commits.py end to end: HEAD against HEAD with a tiny model."""

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _worktrees() -> str:
    """``git worktree list`` of the repository."""
    return subprocess.run(
        ["git", "worktree", "list", "--porcelain"],
        cwd=REPO,
        check=True,
        capture_output=True,
        text=True,
    ).stdout


def test_compare_head_with_itself(tmp_path: Path) -> None:
    """Both commits are measured (positive throughput and compile times, ratios), the JSON is
    written, and the temporary worktrees are gone afterwards."""
    before_trees = _worktrees()
    out = tmp_path / "compare.json"
    cmd = [
        sys.executable,
        str(REPO / "bench" / "compare_commits.py"),
        "--before",
        "HEAD",
        "--after",
        "HEAD",
        "--models",
        "resnet8_cifar:8:2",
        "--repeats",
        "1",
        "--iters",
        "1",
        "--out",
        str(out),
    ]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "after/before" in proc.stdout
    assert _worktrees() == before_trees

    report = json.loads(out.read_text())
    head = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=REPO, check=True, capture_output=True, text=True
    ).stdout.strip()
    assert {c: report["commits"][c]["sha"] for c in ("before", "after")} == {
        "before": head,
        "after": head,
    }
    assert report["commits"]["after"]["core_lines"]["total"] > 0
    assert [r["commit"] for r in report["runs"]] == ["before", "after"]
    for run in report["runs"]:
        result = run["models"]["resnet8_cifar"]
        for phase in ("train", "infer"):
            assert result[f"{phase}_img_s"] > 0
            assert result[f"{phase}_compile_s"] > 0
            assert result[f"{phase}_trace_lower_s"] > 0
    summary = report["summary"]["resnet8_cifar"]
    for key in ("train_img_s", "infer_img_s", "train_cpu_ms", "train_total_compile_s"):
        assert summary[key]["ratio"] > 0
        assert summary[key]["before"]["n"] == summary[key]["after"]["n"] == 1
