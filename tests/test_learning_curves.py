"""bench/learning_curves.py: a rerun keeps the runs already in its JSON, and the table averages
each side over seeds."""

import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _script():
    from bench import learning_curves

    return learning_curves


def _run(depth, seed, side, errors):
    epochs = [
        {"epoch": e, "test_error": err, "test_rate": 0.5 + seed, "train_ce": 2.0, "train_rate": 0.7}
        for e, err in enumerate(errors, 1)
    ]
    return {"depth": depth, "seed": seed, "side": side, "seconds": 1.0, "epochs": epochs}


def test_rerun_keeps_earlier_runs_and_averages_over_seeds(tmp_path, monkeypatch, capsys):
    pytest.importorskip("torch", reason="PyTorch not installed: pip install -e .[torch]")
    lc = _script()
    out, plot = tmp_path / "curves.json", tmp_path / "curves.png"
    runs = [
        _run(8, 0, "aig-jax", [80.0, 60.0]),
        _run(8, 1, "aig-jax", [70.0, 50.0]),
        _run(8, 0, "reference", [90.0, 64.0]),
        _run(8, 1, "reference", [86.0, 62.0]),
    ]
    out.write_text(json.dumps({"runs": runs}))

    def no_training(config):
        raise AssertionError(f"trained {config.model} seed {config.seed} again")

    monkeypatch.setattr(lc, "run_ours", no_training)
    monkeypatch.setattr(lc, "run_reference", no_training)
    argv = ["--depths", "8", "--seeds", "0", "1", "--epochs", "2", "--data_dir", str(tmp_path)]
    result = lc.main([*argv, "--out", str(out), "--plot", str(plot)])

    assert [(r["seed"], r["side"]) for r in result["runs"]] == [
        (0, "aig-jax"),
        (0, "reference"),
        (1, "aig-jax"),
        (1, "reference"),
    ]
    assert json.loads(out.read_text())["runs"] == result["runs"]
    lines = capsys.readouterr().out.splitlines()
    # epoch 2: errors 55 (ours) and 63 (reference), rates 1 (0.5 and 1.5) on both sides
    assert "| ConvNet-AIG 8 | 2 | 55 | 63 | 1 | 1 | 2 | 2 |" in lines
    assert plot.stat().st_size > 0


def test_a_missing_data_directory_is_named(tmp_path):
    lc = _script()
    with pytest.raises(SystemExit):
        lc.main(["--data_dir", str(tmp_path / "absent")])
