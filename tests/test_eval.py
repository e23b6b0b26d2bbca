"""Evaluation: exactness, gate modes, MACs, per-class statistics, calibration, report, eval.py."""

import json
import os

import jax
import numpy as np
import pytest
from absl import flags
from PIL import Image

from aig_jax.checkpoint import CheckpointError, save_variables
from aig_jax.data import eval_iterator, eval_transform, make_source
from aig_jax.errors import ConfigError
from aig_jax.eval import calibration, gate_stats
from aig_jax.eval.evaluators import Classification, EvalContext
from aig_jax.eval.predict import Predictions, predict, summarize
from aig_jax.eval.restore import restore
from aig_jax.eval.step import make_eval_step
from aig_jax.eval.suite import Evaluators
from aig_jax.model.flops import model_cost
from aig_jax.model.resnet import build_model
from aig_jax.model.spec import ModelSpec
from aig_jax.model.variables import abstract_variables
from aig_jax.sharding import make_mesh
from configs import tiny
from tests.conftest import run_cli, user_error_line
from tests.tiny_checkpoint import save_ungated_copy, trained_tiny, without_gates


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(workdir, config) of a tiny gated model trained for a few steps."""
    return trained_tiny(tmp_path_factory)


def test_whole_split_is_counted_once_and_matches_a_per_image_loop(trained):
    workdir, _ = trained
    mesh = make_mesh()
    restored = restore(workdir, mesh)
    config = restored.config
    source = make_source(config.dataset, "test")
    assert len(source) % config.eval_batch_size != 0  # 360 images, batches of 128
    preds = predict(
        make_eval_step(restored.model, mesh),
        restored.variables,
        eval_iterator(source, config.dataset, global_batch=config.eval_batch_size),
        mesh,
        num_layers=3,
        progress=False,
    )
    np.testing.assert_array_equal(preds.index, np.arange(len(source)))
    # Reference: one image at a time, NumPy bookkeeping.
    host = jax.device_get(restored.variables)
    apply = jax.jit(lambda x: restored.model.apply(host, x, gate_mode="argmax"))
    correct, gates = 0, []
    for i in range(len(source)):
        image, label = source.read(np.array([i]))
        out = apply(eval_transform(image, config.dataset))
        correct += int(np.argmax(np.asarray(out.logits)[0]) == label[0])
        gates.append(np.asarray(out.gates)[:, 0])
    assert int(preds.correct.sum()) == correct
    np.testing.assert_array_equal(preds.gates, np.stack(gates))


def test_open_gates_equal_the_ungated_network_with_the_same_weights(trained):
    workdir, _ = trained
    mesh = make_mesh()
    gated = restore(workdir, mesh)
    plain = build_model("resnet8_cifar", gated=False)
    plain_vars = {k: without_gates(v) for k, v in gated.variables.items()}
    source = make_source(gated.config.dataset, "test")
    images, _ = source.read(np.arange(64))
    x = eval_transform(images, gated.config.dataset)
    host, plain_host = jax.device_get((gated.variables, plain_vars))
    run = jax.jit(gated.model.apply, static_argnames="gate_mode")
    open_out = run(host, x, gate_mode="open")
    argmax_out = run(host, x, gate_mode="argmax")
    plain_out = jax.jit(plain.apply)(plain_host, x)
    np.testing.assert_allclose(open_out.logits, plain_out.logits, rtol=1e-5, atol=1e-5)
    assert np.all(np.asarray(open_out.gates) == 1)
    assert not np.allclose(argmax_out.logits, plain_out.logits)  # gates do skip blocks


def _conv(k, cin, cout, hw):
    return k * k * cin * cout * hw * hw


def test_realised_gmacs_are_the_executed_blocks_macs():
    model = build_model("resnet8_cifar", gated=True)  # 3 blocks at 16², 8², 4²
    cost = model_cost(model, 16)
    # By hand: the branches; stem + head + projections + gates run for every image.
    branch = np.array(
        [
            2 * _conv(3, 16, 16, 16),
            _conv(3, 16, 32, 8) + _conv(3, 32, 32, 8),
            _conv(3, 32, 64, 4) + _conv(3, 64, 64, 4),
        ]
    )
    fixed = _conv(3, 3, 16, 16) + 64 * 10 + _conv(1, 16, 32, 8) + _conv(1, 32, 64, 4)
    fixed += sum(c * 16 + 16 * 2 for c in (16, 16, 32))
    gates = np.array([[1, 0, 1], [0, 0, 0], [1, 1, 1], [0, 1, 0]], np.float32)
    n = len(gates)
    preds = Predictions(
        index=np.arange(n),
        labels=np.array([0, 1, 2, 3]),
        top=np.array([[0, 1], [2, 1], [2, 1], [4, 5]]),
        confidence=np.full(n, 0.5),
        loss=np.ones(n),
        gates=gates,
        probs=gates,
    )
    summary = summarize(preds, cost, 10)
    per_image = fixed + gates @ branch
    assert summary["realised_gmacs"] == pytest.approx(per_image.mean() / 1e9, rel=1e-6)
    full = fixed + branch.sum()
    assert summary["full_gmacs"] == pytest.approx(full / 1e9, rel=1e-9)
    assert summary["macs_saving"] == pytest.approx(1 - per_image.mean() / full, rel=1e-5)
    assert summary["top1_error"] == pytest.approx(50.0)  # images 0 and 2 are right
    assert summary["top5_error"] == pytest.approx(25.0)  # image 1 also within the top 2


def test_class_layer_matrix_clustering_and_extremes_on_a_hand_built_case():
    # Classes 0 and 2 skip block 1; classes 1 and 3 skip block 0; class 4 has no images.
    labels = np.array([0, 0, 1, 2, 3, 3])
    gates = np.array([[1, 0], [1, 1], [0, 1], [1, 0], [0, 1], [0, 1]])
    matrix = gate_stats.class_layer_rates(gates, labels, 5)
    expected = np.array([[1, 0.5], [0, 1], [1, 0], [0, 1], [np.nan, np.nan]])
    np.testing.assert_array_equal(matrix, expected)
    order = list(gate_stats.cluster_order(matrix))
    assert sorted(order) == [0, 1, 2, 3, 4]
    pos = {c: order.index(c) for c in range(5)}
    assert abs(pos[1] - pos[3]) == 1  # identical patterns end up side by side
    assert abs(pos[0] - pos[2]) == 1
    most, least = gate_stats.top_classes_per_layer(matrix, k=2)
    assert most[0].tolist() == [0, 2] and least[0].tolist() == [1, 3]
    assert most[1].tolist() == [1, 3] and least[1].tolist() == [2, 0]
    by = gate_stats.by_executed_count(gates, np.array([1, 1, 0, 1, 0, 0], bool), np.ones(6))
    assert by["count"].tolist() == [0, 5, 1]
    assert by["accuracy"][1] == pytest.approx(2 / 5) and by["accuracy"][2] == 1.0


def test_calibrated_thresholds_reproduce_the_target_rates():
    rng = np.random.default_rng(0)
    probs = rng.uniform(size=(1000, 4)).astype(np.float32)
    rates = np.array([0.72, 0.0, 1.0, 0.333])
    thresholds = calibration.fit_thresholds(probs, rates)
    np.testing.assert_array_equal(calibration.rates_under(probs, thresholds), [0.72, 0, 1, 0.333])
    # A threshold of 0.5 is the argmax decision (strict >), so calibration nests argmax.
    np.testing.assert_array_equal(
        calibration.rates_under(probs, np.full(4, 0.5)), (probs > 0.5).mean(axis=0)
    )
    tied = np.array([[0.9], [0.6], [0.6], [0.1]], np.float32)
    assert calibration.rates_under(tied, calibration.fit_thresholds(tied, [0.5]))[0] == 0.25
    with pytest.raises(ValueError, match=r"\[0, 1\].*1.5"):
        calibration.fit_thresholds(probs, [0.5, 0.5, 0.5, 1.5])
    with pytest.raises(ValueError, match=r"\(1000, 4\).*\(3,\)"):
        calibration.fit_thresholds(probs, [0.5, 0.5, 0.5])


def _is_png(path):
    with Image.open(path) as im:
        pixels = np.asarray(im.convert("L"))
    return im.format == "PNG" and pixels.size > 10_000 and pixels.std() > 1


def test_eval_main_writes_a_full_report(trained, tmp_path, capsys):
    workdir, config = trained
    baseline = tmp_path / "plain"
    save_ungated_copy(restore(workdir, make_mesh()).variables, baseline, config)
    out = tmp_path / "report"
    argv = [f"--workdir={workdir}", f"--output={out}", f"--baseline={baseline}"]
    argv += ["--samples=2", "--calibration_limit=256", "--attack", "--epsilons=2,8"]
    argv += ["--limit=200"]
    _eval_py(argv, "main")
    printed = capsys.readouterr().out
    for row in ("[argmax]", "[sample]", "[open]", "[calibrated]", "[baseline]", "[attack gated]"):
        assert row in printed
    with open(out / "report.json") as f:
        report = json.load(f)
    assert report["dataset"]["num_examples"] == 200
    assert set(report["modes"]) == {"argmax", "sample", "open", "calibrated"}
    assert report["modes"]["sample"]["seeds"] == 2
    # The baseline holds the gated model's weights without gates: it is the open model.
    assert report["baseline"]["top1_error"] == pytest.approx(report["modes"]["open"]["top1_error"])
    calib = report["calibration"]
    np.testing.assert_allclose(calib["calibrated_rates"], calib["sampled_rates"], atol=1 / 256)
    assert report["attack"]["gated"]["epsilons"] == [0.0, 2.0, 8.0]
    assert len(report["attack"]["baseline"]["accuracy_jpeg"]) == 3
    assert "| calibrated |" in (out / "report.md").read_text()
    for name in [*report["plots"].values(), *report["analysis"]["plots"].values()]:
        assert _is_png(out / name), name
    assert len(report["analysis"]["class_order"]) == 10


def test_clear_errors_for_missing_checkpoints_other_models_and_class_counts(trained, tmp_path):
    workdir, config = trained
    with pytest.raises(CheckpointError, match="no checkpoint"):
        _eval_py([f"--checkpoint={tmp_path}"])
    other = config.copy_and_resolve_references()
    other.model = "resnet14_cifar"
    with pytest.raises(CheckpointError, match=r"resnet8_cifar.*resnet14_cifar"):
        restore(workdir, make_mesh(), other)
    classes = config.copy_and_resolve_references()
    classes.dataset.num_classes = 7
    with pytest.raises(CheckpointError, match=r"num_classes differs: 10 in the checkpoint, 7 in"):
        restore(workdir, make_mesh(), classes)
    with pytest.raises(ValueError, match="unknown gate mode 'greedy'"):
        _eval_py([f"--workdir={workdir}", "--modes=argmax,greedy"])
    assert not os.path.exists(os.path.join(workdir, "report"))


def test_eval_py_refuses_a_checkpoint_with_nan_weights_naming_the_variable(tmp_path):
    """A diverged run's weights: one error line (exit 2) before anything is compiled."""
    config = tiny.get_config()
    spec = ModelSpec.from_config(config)
    shapes = abstract_variables(spec.build(), (16, 16, 3))
    variables = jax.tree.map(lambda s: np.ones(s.shape, s.dtype), shapes)
    variables["params"]["linear"]["bias"][3] = np.nan
    save_variables(
        str(tmp_path), 7, variables, {"model": spec.to_json(), "config": config.to_dict()}
    )
    line = user_error_line(run_cli("eval.py", f"--checkpoint={tmp_path}"))
    assert f"checkpoint {tmp_path} step 7 holds nan in ['params']['linear']['bias']" in line
    assert not os.path.exists(tmp_path / "report")


def test_eval_py_refuses_outputs_that_are_not_finite_in_one_line(tmp_path):
    """Finite weights whose logits and gate probabilities overflow: one error line (exit 2)
    instead of "nan GMACs/image", and no report."""
    config = tiny.get_config()
    spec = ModelSpec.from_config(config)
    shapes = abstract_variables(spec.build(), (16, 16, 3))
    variables = jax.tree.map(lambda s: np.ones(s.shape, s.dtype), shapes)
    variables["params"]["linear"]["kernel"][:] = 1e38  # the logits overflow to infinity
    variables["params"]["stage1_block0"]["gate"]["fc2"]["kernel"][:] = 1e38  # p(execute) NaN
    meta = {"model": spec.to_json(), "config": config.to_dict()}
    save_variables(str(tmp_path), 3, variables, meta)
    proc = run_cli("eval.py", f"--checkpoint={tmp_path}", "--modes=argmax", "--limit=64")
    line = user_error_line(proc)
    assert line == (
        "error: the model's outputs are not finite (NaN or infinite logits or gate "
        "probabilities) for 64 of 64 images in gate mode 'argmax'; nothing is reported"
    )
    assert "GMACs" not in proc.stdout and not os.path.exists(tmp_path / "report")


def test_calibrated_classification_needs_thresholds(trained):
    workdir, _ = trained
    mesh = make_mesh()
    restored = restore(workdir, mesh)
    ds, batch = restored.config.dataset, restored.config.eval_batch_size
    ctx = EvalContext.create(restored.model, restored.spec, ds, mesh, batch_size=batch)
    with pytest.raises(ValueError, match="'calibrated' needs thresholds"):
        Classification(ctx, "calibrated")
    with pytest.raises(ValueError, match="seeds must be >= 1"):
        Classification(ctx, "sample", seeds=0)


def _eval_py(argv, entry="evaluate"):
    """Run the repository's eval.py (``evaluate`` or ``main``) with command-line ``argv``."""
    import eval as eval_py

    flags.FLAGS(["eval.py", *argv])
    try:
        return eval_py.evaluate() if entry == "evaluate" else eval_py.main(["eval.py"])
    finally:
        flags.FLAGS.unparse_flags()


def test_eval_py_runs_an_old_checkpoints_defaults_and_the_flags_override_them(trained, tmp_path):
    """A checkpoint whose config predates config.evals gets configs/default.py's evaluators;
    --modes replaces the classifications (in its order), and the analysis follows the first."""
    workdir, config = trained
    old = config.to_dict()
    del old["evals"]
    old["eval_gate_modes"] = ("argmax",)
    restored = restore(workdir, make_mesh())
    meta = {"model": restored.spec.to_json(), "config": old}
    save_variables(str(tmp_path / "old"), 5, jax.device_get(restored.variables), meta)
    argv = [f"--checkpoint={tmp_path / 'old'}", "--limit=64", "--samples=1"]
    report = _eval_py([*argv, "--calibration_limit=64", f"--output={tmp_path / 'a'}"])
    assert list(report["modes"]) == ["argmax", "sample", "open", "calibrated"]
    assert report["calibration"]["num_examples"] == 64
    assert report["analysis"]["gate_mode"] == "argmax"
    report = _eval_py([*argv, "--modes=open,argmax", f"--output={tmp_path / 'b'}"])
    assert list(report["modes"]) == ["open", "argmax"] and report["calibration"] is None
    assert report["analysis"]["gate_mode"] == "open"
    assert report["modes"]["open"]["mean_executed_blocks"] == 3.0


def test_evaluators_check_their_entries_and_collapse_for_a_model_without_gates(trained, tmp_path):
    workdir, config = trained
    mesh = make_mesh()
    restored = restore(workdir, mesh)
    ds, batch = restored.config.dataset, restored.config.eval_batch_size
    ctx = EvalContext.create(restored.model, restored.spec, ds, mesh, batch_size=batch, limit=64)
    with pytest.raises(ConfigError, match=r"config.evals.a: JPEG quality must be in \[1, 100\]"):
        Evaluators(ctx, {"a": {"type": "attack", "jpeg_quality": 0}})
    evals = {
        "argmax": {"type": "classification", "mode": "argmax"},
        "calibrated": {"type": "classification", "mode": "calibrated", "during_training": False},
        "fit": {"type": "calibration", "limit": 64},
    }
    assert Evaluators(ctx, evals, during_training=True).calibration is None
    results = Evaluators(ctx, evals).run(restored.variables, str(tmp_path))
    assert list(results) == ["fit", "argmax", "calibrated"]  # thresholds first
    assert results["calibrated"]["gate_mode"] == "calibrated"
    baseline = tmp_path / "plain"
    save_ungated_copy(restored.variables, baseline, config)
    plain = restore(str(baseline), mesh)
    ctx = EvalContext.create(plain.model, plain.spec, ds, mesh, batch_size=batch)
    gates = {"type": "gate_statistics", "mode": "sample"}
    assert Evaluators(ctx, {**evals, "gates": gates}).entries == {
        "argmax": {"type": "classification", "mode": "argmax"},
        "gates": {"type": "gate_statistics", "mode": "argmax"},
    }
