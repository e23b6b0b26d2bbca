"""bench/sensitivity.py: the one-ulp nudge, the statistics it reports, and a tiny end-to-end
run whose rerun keeps what was measured."""

import json
from pathlib import Path

import numpy as np
import pytest

from bench import sensitivity

REPO = Path(__file__).resolve().parent.parent


def test_nudge_moves_every_float32_element_one_ulp_up_and_nothing_else():
    tree = {"w": np.array([1.0, -2.5, 0.0], np.float32), "n": np.array([3, 4], np.int32)}
    out = sensitivity.nudge(tree)
    eps = np.finfo(np.float32)
    np.testing.assert_array_equal(
        out["w"], [1.0 + eps.eps, -2.5 + 2 * eps.eps, eps.smallest_subnormal]
    )
    assert out["w"].dtype == np.float32
    np.testing.assert_array_equal(out["n"], [3, 4])


def test_relative_difference_is_max_and_median_over_arrays():
    a = {"x": np.array([1.0, 3.0]), "y": np.array([0.0, -6.0]), "z": np.array([5.0])}
    b = {"x": np.array([1.0, 2.0]), "y": np.array([0.0, -8.0]), "z": np.array([5.0])}
    # x: 1/2, y: 2/8, z: 0
    assert sensitivity.relative_difference(a, b) == (0.5, 0.25)
    assert sensitivity.relative_difference(b, b) == (0.0, 0.0)


def test_statistics():
    s = sensitivity.statistics([1.0, 2.0, 6.0])
    assert s == {"mean": 3.0, "sd": pytest.approx(np.sqrt(7.0)), "min": 1.0, "max": 6.0}
    assert sensitivity.statistics([4.0])["sd"] == 0.0


def test_mean_difference_and_its_standard_error():
    diff, se = sensitivity.mean_difference([1.0, 3.0], [0.0, 0.0, 3.0])
    # means 2 and 1; sample variances 2 and 3: sqrt(2/2 + 3/3)
    assert diff == pytest.approx(1.0) and se == pytest.approx(np.sqrt(2.0))


@pytest.fixture
def tiny_data(tmp_path):
    rng = np.random.default_rng(0)
    data = tmp_path / "data"
    data.mkdir()
    for split, n in (("train", 32), ("test", 20)):
        images = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
        np.savez(data / f"d_{split}.npz", image=images, label=np.arange(n) % 10)
    return data


def test_tiny_run_measures_both_sides_and_a_rerun_keeps_it(tmp_path, tiny_data, monkeypatch):
    pytest.importorskip("torch", reason="PyTorch not installed: pip install -e .[torch]")
    out, plot = tmp_path / "s.json", tmp_path / "s.png"
    argv = ["--depth", "8", "--steps", "2", "--batch_size", "16", "--data_dir", str(tiny_data),
            "--out", str(out), "--plot", str(plot)]  # fmt: skip
    result = sensitivity.main([*argv, "--draws", "1"])

    rows = result["divergence"]
    assert [r["step"] for r in rows] == [0, 1]
    # The first step starts from the same weights, batch and noise on both sides.
    assert rows[0]["ce"]["ours"] == pytest.approx(rows[0]["ce"]["reference"], rel=1e-5)
    # A one-ulp nudge of the weights changes what one step computes, on both sides.
    assert rows[0]["ours vs ours nudged"][0] > 0
    assert rows[0]["reference vs reference nudged"][0] > 0
    for side in sensitivity.SIDES:
        (record,) = result["spread"][side].values()
        assert 0.0 <= record["test_error"] <= 100.0
        assert 0.0 <= record["test_rate"] <= 1.0
        assert np.isfinite(record["train_ce"])
    ours = result["spread"]["aig-jax"]["0"]  # our weights evaluated by the reference model too
    assert 0.0 <= ours["reference_eval_test_error"] <= 100.0
    assert 0.0 <= ours["reference_eval_test_rate"] <= 1.0
    assert json.loads(out.read_text()) == result
    assert plot.stat().st_size > 0

    trained = []
    monkeypatch.setattr(sensitivity, "divergence", lambda *a: pytest.fail("divergence again"))
    for name in ("spread_ours", "spread_reference"):
        monkeypatch.setattr(
            sensitivity,
            name,
            lambda config, draw, name=name: trained.append((name, draw)) or {"test_error": 50.0,
                "test_rate": 0.5, "train_ce": 2.0, "train_rate": 0.7},
        )  # fmt: skip
    again = sensitivity.main([*argv, "--draws", "2"])
    assert trained == [("spread_ours", 1), ("spread_reference", 1)]
    assert again["divergence"] == rows
    for side in sensitivity.SIDES:
        assert again["spread"][side]["0"] == result["spread"][side]["0"]
        assert list(again["spread"][side]) == ["0", "1"]


def test_a_missing_data_directory_is_named(tmp_path, capsys):
    with pytest.raises(SystemExit):
        sensitivity.main(["--data_dir", str(tmp_path / "absent")])
    assert "absent does not exist" in capsys.readouterr().err
