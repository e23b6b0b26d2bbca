"""Two commits' code measured by the same benchmark, alternately, in one run.

    python -m bench.compare_commits --before main --after HEAD --repeats 3 -- --small \
        --sections models --variants gated

Each commit is checked out into a temporary git worktree. Every repeat runs ``python -m
bench.speed`` with the arguments after ``--`` once per commit, alternating, each in a fresh
process that imports that commit's ``aig_jax`` and ``configs`` and this checkout's ``bench``
and ``tests`` (so both commits need the API the benchmark uses). Prints, for every figure both
runs hold whose name matches ``--keys``, the median (min–max) over repeats per commit and the
after/before ratio of the medians; writes the runs and this summary as JSON.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
COMMITS = ("before", "after")


def git(*args: str) -> str:
    """Stdout of ``git args`` in this repository, stripped; raises on failure."""
    run = subprocess.run(["git", *args], cwd=REPO, check=True, capture_output=True, text=True)
    return run.stdout.strip()


def flatten(tree: Any, prefix: str = "") -> dict[str, float]:
    """The numeric leaves of a JSON tree by ``/``-joined path; a list's items are named by
    their ``model`` and, where there is one, ``image_size`` and ``batch``, else by index."""
    if isinstance(tree, bool):
        return {}
    if isinstance(tree, int | float):
        return {prefix: float(tree)}
    if isinstance(tree, dict):
        items = tree.items()
    elif isinstance(tree, list):
        items = (
            (f"{t['model']}" + "".join(f":{t[k]}" for k in ("image_size", "batch") if k in t), t)
            if isinstance(t, dict) and "model" in t else (str(i), t)
            for i, t in enumerate(tree)
        )  # fmt: skip
    else:
        return {}
    return {k: v for key, t in items for k, v in flatten(t, f"{prefix}/{key}".lstrip("/")).items()}


def run_bench(overlay: Path, args: list[str], out: Path) -> dict[str, Any]:
    """One run of ``bench.speed args`` in ``overlay``; its JSON."""
    cmd = [sys.executable, "-m", "bench.speed", *args, "--out", str(out)]
    proc = subprocess.run(cmd, cwd=overlay, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} in {overlay} failed:\n{proc.stderr[-3000:]}")
    return dict(json.loads(out.read_text()))


def summarise(runs: list[dict[str, Any]], keys: str) -> dict[str, Any]:
    """Per figure matching ``keys`` in every run: median, min, max per commit, and the ratio."""
    flat = [(r["commit"], flatten(r["results"])) for r in runs]
    shared = set.intersection(*(set(f) for _, f in flat))
    summary = {}
    for key in sorted(k for k in shared if re.search(keys, k)):
        entry: dict[str, Any] = {}
        for c in COMMITS:
            v = [f[key] for commit, f in flat if commit == c]
            entry[c] = {"median": statistics.median(v), "min": min(v), "max": max(v), "n": len(v)}
        before = entry["before"]["median"]
        entry["ratio"] = entry["after"]["median"] / before if before else None
        summary[key] = entry
    return summary


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Measure both commits alternately, print the summary, write the JSON and return it."""
    parser = argparse.ArgumentParser(
        "python -m bench.compare_commits", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--before", required=True, help="git ref of the older commit")
    parser.add_argument("--after", default="HEAD", help="git ref of the newer commit")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--keys", default=r"images_per_s|compile_s$", help="figures (regex)")
    parser.add_argument("--out", default=str(REPO / "bench/results/compare.json"))
    parser.add_argument("bench_args", nargs="*", help="arguments of bench.speed (after --)")
    args = parser.parse_args(argv)
    refs = {"before": args.before, "after": args.after}
    shas = {c: git("rev-parse", "--verify", f"{refs[c]}^{{commit}}") for c in COMMITS}
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="aig-compare-") as tmp:
        added = []
        try:
            for c in COMMITS:
                tree, overlay = Path(tmp) / c, Path(tmp) / f"{c}-overlay"
                git("worktree", "add", "--detach", str(tree), shas[c])
                added.append(tree)
                overlay.mkdir()
                for name in ("aig_jax", "configs", "bench", "tests"):
                    base = tree if name in ("aig_jax", "configs") else REPO
                    (overlay / name).symlink_to(base / name)
            for r in range(args.repeats):
                for c in COMMITS:
                    print(f"repeat {r + 1}/{args.repeats}: {c} ({shas[c][:10]})", flush=True)
                    result = run_bench(
                        Path(tmp) / f"{c}-overlay", args.bench_args, Path(tmp) / "run.json"
                    )
                    runs.append({"repeat": r, "commit": c, "results": result})
        finally:
            for tree in added:  # also on errors and KeyboardInterrupt
                subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=REPO)
    report = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": " ".join(["python -m bench.compare_commits", *(argv or sys.argv[1:])]),
        "commits": {c: {"ref": refs[c], "sha": shas[c]} for c in COMMITS},
        "summary": summarise(runs, args.keys),
        "runs": runs,
    }
    device = runs[0]["results"]
    print(f"{device['device']}, jax {device['jax_version']}, {args.repeats} repeat(s); "
          + ", ".join(f"{c} {refs[c]} = {shas[c][:10]}" for c in COMMITS))  # fmt: skip
    for key, e in report["summary"].items():
        cells = [f"{e[c]['median']:.4g} ({e[c]['min']:.4g}–{e[c]['max']:.4g})" for c in COMMITS]
        ratio = "n/a" if e["ratio"] is None else f"{e['ratio']:.3f}"
        print(f"  {key:60} {cells[0]:>26} {cells[1]:>26} {ratio:>7}")
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {args.out}")
    return report


if __name__ == "__main__":
    main()
