"""python -m bench.depth_scaling at its smallest: the documented rows, a profile, and the plain-JAX
reproduction whose barriers change the program but not the step."""

import math

import jax
import numpy as np
import pytest

pytest.importorskip("torch", reason="bench.depth_scaling runs the reference's PyTorch step")
from bench import depth_scaling

TINY = ["--depths", "8", "14", "--batch", "4", "--steps", "1", "--rounds", "1"]


def _finite_positive(value):
    return isinstance(value, float) and math.isfinite(value) and value > 0


def test_timings_have_both_variants_and_pytorch_at_every_depth(tmp_path, capsys):
    results = depth_scaling.main([*TINY, "--out", str(tmp_path / "d.json")])
    rows = {(r["depth"], r["side"]): r for r in results["rows"]}
    sides = ("ours barriers", "ours plain", "pytorch")
    assert set(rows) == {(d, s) for d in (8, 14) for s in sides}
    for (depth, side), row in rows.items():
        assert _finite_positive(row["images_per_s"]), (depth, side)
        assert (row["over_pytorch"] is None) == (side == "pytorch")
        assert (row["per_block_growth"] == 1.0) == (depth == 8)
    # ours over PyTorch is the ratio of their step times in the same round
    ours, torch_ = rows[(14, "ours plain")], rows[(14, "pytorch")]
    assert ours["over_pytorch"] == pytest.approx(torch_["seconds"][0] / ours["seconds"][0])
    assert "wrote" in capsys.readouterr().out


def test_profile_counts_fusions_and_kernel_time(tmp_path):
    args = ["--depths", "8", "--batch", "4", "--profile", "--out", str(tmp_path / "p.json")]
    rows = depth_scaling.main(args)["rows"]
    assert [r["side"] for r in rows] == ["ours barriers", "ours plain"]
    for row in rows:
        assert _finite_positive(row["other_ms"]) and row["big_fusion_ms"] >= 0
        assert 0 < row["largest_fusion"] <= row["fused"]


def test_reproduction_barriers_keep_the_step_and_separate_the_blocks():
    runs = {b: depth_scaling.plain_resnet(8, 4, barriers=b) for b in (True, False)}
    for barriers, (_, compiled, _) in runs.items():
        count = compiled.as_text().count(" opt-barrier(")
        assert (count > 0) == barriers  # kept through fusion only with the compile options
    params = {b: jax.device_get(run()) for b, (run, _, _) in runs.items()}  # one SGD step
    for a, b in zip(params[True], params[False], strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
