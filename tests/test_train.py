"""Training: optimizer semantics, sharded steps, resume, signals, checkpoints, divergence, the
workdir lock and bad input."""

import functools
import json
import os
import signal
import socket
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from aig_jax import checkpoint
from aig_jax.cli import check_override_names
from aig_jax.data import eval_iterator, make_source
from aig_jax.errors import ConfigError, DataError, WorkdirError
from aig_jax.eval.predict import predict
from aig_jax.eval.step import make_eval_step
from aig_jax.model.spec import ModelSpec
from aig_jax.sharding import make_mesh, replicate, shard_batch
from aig_jax.train import loop
from aig_jax.train import workdir as workdir_lock
from aig_jax.train.config_checks import validate_config
from aig_jax.train.loop import train_and_evaluate
from aig_jax.train.metrics import LoopTimer, read_metrics
from aig_jax.train.optim import gate_mask, learning_rate_schedule, make_optimizer
from aig_jax.train.state import create_train_state
from aig_jax.train.step import make_train_step
from configs import default, tiny
from tests.conftest import HANG_GUARD_S, REPO, SHARED_DATA, run_cli, user_error_line

LOCK = workdir_lock.LOCK_FILE

# Small enough for CPU: 8×8 synthetic images, batch 16, ResNet-8 with every block gated.
SMALL = {
    "dataset.source": "synthetic",
    "dataset.name": "synthetic",
    "dataset.num_examples": 64,
    "dataset.image_size": 8,
    "dataset.crop_padding": 1,
    "batch_size": 16,
    "eval_batch_size": 32,
    "eval_every_epochs": 1000.0,
    "evals": {"argmax": {"type": "classification", "mode": "argmax"}},
    "log_every_steps": 1,
    "num_devices": 1,
    "tensorboard": False,
    "progress": False,
    "data_threads": 1,
}


def small_config(**overrides) -> ml_collections.ConfigDict:
    """The tiny config on synthetic 8×8 images; ``overrides`` use ``__`` for nested fields."""
    config = tiny.get_config()
    for name, value in {**SMALL, **{k.replace("__", "."): v for k, v in overrides.items()}}.items():
        node = config
        *parents, leaf = name.split(".")
        for part in parents:
            node = node[part]
        node[leaf] = value
    return config


def abstract_state(config):
    """(spec, ShapeDtypeStructs of the TrainState) of ``config``, on one device."""
    spec = ModelSpec.from_config(config)
    size = config.dataset.image_size
    tx = make_optimizer(config, learning_rate_schedule(config, 4))
    shapes = jax.eval_shape(
        functools.partial(create_train_state, spec.build(), tx, (size, size, 3), config.seed)
    )
    one_device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    like = jax.tree.map(
        lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=one_device), shapes
    )
    return spec, like


def restore_state(workdir, config, step=None):
    """(variables, opt_state, meta) saved in ``workdir`` (latest step by default), on one
    device."""
    spec, like = abstract_state(config)
    path = workdir if step is None else os.path.join(workdir, "checkpoints", str(step))
    saved = checkpoint.restore_or_init(path, like.variables, like.opt_state, spec)
    return saved.variables, saved.opt_state, saved.meta


def assert_trees_close(a, b, atol):
    flat_a, tree_a = jax.tree.flatten(a)
    flat_b, tree_b = jax.tree.flatten(b)
    assert tree_a == tree_b
    for x, y in zip(flat_a, flat_b, strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=atol, rtol=0)


# ------------------------------------------------------------------------------ optimizer


def test_sgd_matches_pytorch_update_rule_with_gate_lr_factor():
    """Two steps of PyTorch's SGD (wd in the gradient, heavy ball, lr per group) by hand."""
    config = small_config(learning_rate=0.1, momentum=0.9, weight_decay=0.01, gate_lr_factor=10.0)
    params = {
        "conv": {"kernel": jnp.array([1.0, -2.0])},
        "gate": {"fc1": {"kernel": jnp.array([0.5])}, "fc2": {"bias": jnp.array([0.1, 2.0])}},
    }
    grads = [
        jax.tree.map(lambda p: jnp.full_like(p, 0.3), params),
        jax.tree.map(lambda p: jnp.full_like(p, -0.2), params),
    ]
    tx = make_optimizer(config, learning_rate_schedule(config, steps_per_epoch=100))
    state = tx.init(params)
    got = params
    for g in grads:
        updates, state = tx.update(g, state, got)
        got = jax.tree.map(lambda p, u: p + u, got, updates)

    def torch_sgd(p, lr):
        buf = None
        for g in (0.3, -0.2):
            d = g + 0.01 * p
            buf = d if buf is None else 0.9 * buf + d
            p = p - lr * buf
        return p

    close = functools.partial(np.testing.assert_allclose, rtol=1e-6)
    close(got["conv"]["kernel"], torch_sgd(np.array([1.0, -2.0]), 0.1))
    close(got["gate"]["fc1"]["kernel"], torch_sgd(np.array([0.5]), 0.1))
    close(got["gate"]["fc2"]["bias"], torch_sgd(np.array([0.1, 2.0]), 1.0))  # lr × 10


def test_gate_mask_selects_the_reference_parameter_groups():
    params = {
        "block1": {"conv1": {"kernel": 0}, "gate": {"fc1": {"kernel": 0}, "fc2": {"bias": 0}}},
        "head": {"kernel": 0},
    }
    assert jax.tree.leaves(gate_mask(params, "fc2")) == [False, False, True, False]
    assert jax.tree.leaves(gate_mask(params, "gate")) == [False, True, True, False]
    assert not any(jax.tree.leaves(gate_mask(params, "none")))
    with pytest.raises(ValueError, match="'fc3'"):
        gate_mask(params, "fc3")


def test_learning_rate_steps_down_at_the_boundary_epochs_after_warmup():
    config = small_config(learning_rate=0.1, lr_boundaries_epochs=(2, 3), lr_decay=0.1)
    schedule = learning_rate_schedule(config, steps_per_epoch=10)
    got = [float(schedule(s)) for s in (0, 19, 20, 29, 30, 100)]
    np.testing.assert_allclose(got, [0.1, 0.1, 0.01, 0.01, 0.001, 0.001], rtol=1e-6)
    config.warmup_epochs = 1.0
    schedule = learning_rate_schedule(config, steps_per_epoch=10)
    got = [float(schedule(s)) for s in (0, 5, 10, 19, 20, 30)]
    np.testing.assert_allclose(got, [0.0, 0.05, 0.1, 0.1, 0.01, 0.001], rtol=1e-6, atol=1e-9)


# ------------------------------------------------------------------------------ sharding


def _small_model_and_state():
    """(spec, model, optimizer, initial state) of the small test config, 8×8 images."""
    config = small_config()
    spec = ModelSpec.from_config(config)
    model = spec.build()
    tx = make_optimizer(config, learning_rate_schedule(config, 4))
    return spec, model, tx, create_train_state(model, tx, (8, 8, 3), seed=0)


def test_eight_device_step_equals_one_device_step():
    spec, model, tx, state0 = _small_model_and_state()
    rng = np.random.default_rng(0)
    batches = [
        {
            "image": rng.normal(size=(16, 8, 8, 3)).astype(np.float32),
            "label": rng.integers(0, 10, 16).astype(np.int32),
        }
        for _ in range(2)
    ]
    results = []
    for n in (1, 8):
        mesh = make_mesh(n)
        step = make_train_step(model, tx, spec.targets, target_weight=2.0, donate=False)
        with jax.set_mesh(mesh):
            state = replicate(state0, mesh)
            for batch in batches:
                state, metrics = step(state, shard_batch(batch, mesh), jax.random.key(3))
        results.append((jax.device_get(state), jax.device_get(metrics)))
    (one, m1), (eight, m8) = results
    assert_trees_close(one.params, eight.params, atol=2e-5)
    assert_trees_close(one.batch_stats, eight.batch_stats, atol=2e-5)
    np.testing.assert_array_equal(m1["gate_rates"], m8["gate_rates"])  # same noise, same gates
    np.testing.assert_allclose(m1["loss"], m8["loss"], rtol=1e-5)


def test_uint8_batches_normalised_on_the_device_train_like_host_normalised_ones():
    spec, model, tx, state0 = _small_model_and_state()
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (16, 8, 8, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, 16).astype(np.int32)
    mean, std = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
    host = ((pixels / 255 - np.array(mean)) / np.array(std)).astype(np.float32)
    mesh = make_mesh(1)
    results = []
    with jax.set_mesh(mesh):
        for batch, stats in (({"image": host}, None), ({"image": pixels}, (mean, std))):
            step = make_train_step(
                model, tx, spec.targets, target_weight=2.0, donate=False, pixel_stats=stats
            )
            state, metrics = step(
                replicate(state0, mesh),
                shard_batch({**batch, "label": labels}, mesh),
                jax.random.key(3),
            )
            results.append(jax.device_get((state.params, metrics["loss"])))
    (p_host, loss_host), (p_device, loss_device) = results
    np.testing.assert_allclose(loss_host, loss_device, rtol=1e-5)
    assert_trees_close(p_host, p_device, atol=1e-5)


def test_grad_norm_metric_is_the_norm_of_every_gradient():
    """With plain SGD the step's gradients are (params before - params after) / lr; the
    logged grad_norm is their joint L2 norm, reduced here in float64 leaf by leaf."""
    spec, model, _, _ = _small_model_and_state()
    lr = 0.5
    tx = optax.sgd(lr)
    state0 = create_train_state(model, tx, (8, 8, 3), seed=0)
    rng = np.random.default_rng(1)
    batch = {
        "image": rng.normal(size=(16, 8, 8, 3)).astype(np.float32),
        "label": rng.integers(0, 10, 16).astype(np.int32),
    }
    mesh = make_mesh(1)
    step = make_train_step(model, tx, spec.targets, target_weight=2.0, donate=False)
    with jax.set_mesh(mesh):
        state, metrics = step(replicate(state0, mesh), shard_batch(batch, mesh), jax.random.key(3))
    before, after = jax.device_get((state0.params, state.params))
    squares = [
        np.sum(((np.asarray(b, np.float64) - np.asarray(a, np.float64)) / lr) ** 2)
        for b, a in zip(jax.tree.leaves(before), jax.tree.leaves(after), strict=True)
    ]
    np.testing.assert_allclose(float(metrics["grad_norm"]), np.sqrt(sum(squares)), rtol=1e-4)


def test_batch_not_divisible_by_the_devices_is_refused():
    with pytest.raises(ValueError, match=r"12.*8 devices|8 devices.*12"):
        train_and_evaluate(small_config(batch_size=12, num_devices=8), "/nonexistent/never")


# ------------------------------------------------------------------------- resume, signals


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """Six steps in one go (checkpoint every two)."""
    workdir = str(tmp_path_factory.mktemp("straight"))
    train_and_evaluate(small_config(num_train_steps=6, checkpoint_every_steps=2), workdir)
    return workdir


def test_resume_gives_the_same_parameters_and_metrics(uninterrupted, tmp_path):
    workdir = str(tmp_path)
    train_and_evaluate(small_config(num_train_steps=3, checkpoint_every_steps=2), workdir)
    assert checkpoint.Checkpointer(os.path.join(workdir, "checkpoints")).all_steps() == [2, 3]
    train_and_evaluate(small_config(num_train_steps=6, checkpoint_every_steps=2), workdir)
    config = small_config()
    a_vars, a_opt, a_meta = restore_state(uninterrupted, config)
    b_vars, b_opt, b_meta = restore_state(workdir, config)
    assert a_meta["step"] == b_meta["step"] == 6
    assert_trees_close(a_vars, b_vars, atol=1e-6)
    assert_trees_close(a_opt, b_opt, atol=1e-6)
    ignore = ("images_per_sec", "input_wait_fraction", "kind")
    a = {m["step"]: m for m in read_metrics(uninterrupted, "train")}
    b = {m["step"]: m for m in read_metrics(workdir, "train")}
    assert sorted(b) == [1, 2, 3, 4, 5, 6]  # each step logged once
    for s in (4, 5, 6):
        for key in a[s]:
            if key not in ignore:
                np.testing.assert_allclose(a[s][key], b[s][key], rtol=1e-5, err_msg=key)


def test_sigterm_saves_the_current_step_and_rerun_resumes(tmp_path):
    """train.py under SIGTERM: exit 0 with a checkpoint of exactly the steps it ran."""
    workdir = str(tmp_path / "run")
    overrides = [f"--config.{k}={v}" for k, v in SMALL.items() if k != "evals"]
    command = [
        sys.executable,
        os.path.join(REPO, "train.py"),
        "--config",
        os.path.join(REPO, "configs", "tiny.py"),
        "--workdir",
        workdir,
        *overrides,
        "--config.num_train_steps=100000",
        "--config.checkpoint_every_steps=100000",
        f"--compilation_cache={tmp_path / 'xla'}",
    ]
    env = {**os.environ, "PYTHONPATH": REPO}
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    metrics = os.path.join(workdir, "metrics.jsonl")
    deadline = time.time() + HANG_GUARD_S
    while not (os.path.exists(metrics) and os.path.getsize(metrics) > 0):
        assert proc.poll() is None, proc.stdout.read().decode()
        assert time.time() < deadline, "training did not start"
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=HANG_GUARD_S)
    assert proc.returncode == 0, out.decode()[-3000:]
    assert b"rerun the same command to resume" in out
    assert not os.path.exists(os.path.join(workdir, LOCK))  # released on SIGTERM
    # The train step went to the compilation cache, for the rerun to load.
    assert any(name.startswith("jit_step") for name in os.listdir(tmp_path / "xla"))
    last = read_metrics(workdir, "train")[-1]["step"]
    config = small_config()
    _, _, meta = restore_state(workdir, config)
    assert 0 < meta["step"] == last < 100000
    # Nothing lost: the saved state is the state after `last` uninterrupted steps.
    reference = str(tmp_path / "reference")
    train_and_evaluate(small_config(num_train_steps=last), reference)
    assert_trees_close(restore_state(workdir, config)[0], restore_state(reference, config)[0], 1e-6)
    # Rerunning continues from the saved step.
    train_and_evaluate(small_config(num_train_steps=last + 1), workdir)
    steps = [m["step"] for m in read_metrics(workdir, "train")]
    assert steps[-2:] == [last, last + 1] and len(steps) == len(set(steps))


# ---------------------------------------------------------------------------- checkpoints


def test_checkpoint_from_eight_devices_restores_and_evaluates_on_one(tmp_path):
    config = small_config(num_devices=8, num_train_steps=2)
    train_and_evaluate(config, str(tmp_path))
    spec = ModelSpec.from_config(config)
    model = spec.build()
    variables, _, _ = restore_state(str(tmp_path), config)
    source = make_source(config.dataset, "test")
    outputs = []
    for n in (1, 8):
        mesh = make_mesh(n)
        with jax.set_mesh(mesh):
            preds = predict(
                make_eval_step(model, mesh),
                replicate(variables, mesh),
                eval_iterator(source, config.dataset, global_batch=24),
                mesh,
                num_layers=len(spec.rates),
                progress=False,
            )
        outputs.append(preds)
    one, eight = outputs
    assert len(one.labels) == len(source)
    np.testing.assert_array_equal(one.index, np.arange(len(source)))
    np.testing.assert_array_equal(one.gates, eight.gates)
    np.testing.assert_array_equal(one.top[:, 0], eight.top[:, 0])
    np.testing.assert_allclose(one.loss, eight.loss, rtol=1e-4)


def _corrupt(step_dir):
    """Overwrite every data file of one saved checkpoint with garbage."""
    hit = 0
    for root, _, files in os.walk(step_dir):
        for name in files:
            with open(os.path.join(root, name), "wb") as f:
                f.write(b"not a checkpoint")
            hit += 1
    assert hit


def test_unreadable_checkpoint_is_set_aside_and_the_older_one_resumed(tmp_path):
    workdir = str(tmp_path)
    train_and_evaluate(small_config(num_train_steps=4, checkpoint_every_steps=2), workdir)
    ckpt_dir = os.path.join(workdir, "checkpoints")
    _corrupt(os.path.join(ckpt_dir, "4"))
    train_and_evaluate(small_config(num_train_steps=6, checkpoint_every_steps=2), workdir)
    assert sorted(os.listdir(ckpt_dir)) == ["2", "4", "6"]
    assert os.listdir(os.path.join(workdir, "checkpoints_corrupt")) == ["4"]
    assert restore_state(workdir, small_config())[2]["step"] == 6
    # When no checkpoint can be restored, training stops and nothing is moved.
    for step in (2, 4, 6):
        _corrupt(os.path.join(ckpt_dir, str(step)))
    with pytest.raises(checkpoint.CheckpointError, match=r"no checkpoint .* can be restored.*6"):
        train_and_evaluate(small_config(num_train_steps=8, checkpoint_every_steps=2), workdir)
    assert sorted(os.listdir(ckpt_dir)) == ["2", "4", "6"]


def test_partial_checkpoint_is_never_resumed_from(tmp_path):
    workdir = str(tmp_path)
    train_and_evaluate(small_config(num_train_steps=2), workdir)
    partial = os.path.join(workdir, "checkpoints", "9.orbax-checkpoint-tmp-1234")
    os.makedirs(os.path.join(partial, "model"))
    with open(os.path.join(partial, "model", "junk"), "wb") as f:
        f.write(b"\0" * 10)
    train_and_evaluate(small_config(num_train_steps=3), workdir)
    assert [m["step"] for m in read_metrics(workdir, "train")] == [1, 2, 3]
    assert restore_state(workdir, small_config())[2]["step"] == 3


def test_resuming_another_model_is_refused(tmp_path):
    train_and_evaluate(small_config(num_train_steps=1), str(tmp_path))
    with pytest.raises(checkpoint.CheckpointError, match="another model"):
        train_and_evaluate(small_config(num_train_steps=2, model="resnet14_cifar"), str(tmp_path))


# ------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    "field, value, match",
    [
        ("model", "resnet9_cifar", r"config.model = 'resnet9_cifar': expected one of"),
        ("target_rate", 1.5, r"config.target_rate = 1.5: expected a rate in \[0, 1\]"),
        ("dataset__source", "csv", r"config.dataset.source = 'csv'"),
        ("lr_boundaries_epochs", (250, 150), r"config.lr_boundaries_epochs = \(250, 150\)"),
        ("batch_size", 0, r"config.batch_size = 0: expected a positive integer"),
        (
            "evals",
            {"a": {"type": "classification", "mode": "maybe"}},
            r"config.evals.a.mode = 'maybe'",
        ),
        ("evals", {"a": {"type": "fgsm"}}, r"config.evals.a.type = 'fgsm': expected one of \["),
        ("evals", {"a": {"type": "attack", "eps": 2}}, r"config.evals.a.eps is not an option of"),
        (
            "evals",
            {"c": {"type": "classification", "mode": "calibrated"}},
            r"'calibrated' needs an",
        ),
        ("eval_gate_modes", ("argmax",), r"config.eval_gate_modes was removed: .*config.evals"),
        ("scan_blocks", True, r"config.scan_blocks was removed: .*compilation cache"),
        ("on_nonfinite", "ignore", r"config.on_nonfinite = 'ignore': expected one of"),
        ("init", "xavier", r"config.init = 'xavier': expected one of \('reference', 'he_normal'\)"),
        ("gate_rate_one_blocks", "skip", r"config.gate_rate_one_blocks = 'skip': expected one of"),
    ],
)
def test_invalid_config_names_the_field(field, value, match):
    with pytest.raises(ValueError, match=match):
        validate_config(small_config(**{field: value}))


def test_missing_data_directory_is_named(tmp_path):
    missing = str(tmp_path / "nowhere")
    config = small_config(dataset__source="npz", dataset__data_dir=missing)
    with pytest.raises(DataError, match=missing):
        train_and_evaluate(config, str(tmp_path / "run"))


def test_the_loop_runs_the_evaluators_listed_for_training(tmp_path):
    evals = {
        "argmax": {"type": "classification", "mode": "argmax"},
        "open": {"type": "classification", "mode": "open", "during_training": False},
        "gates": {"type": "gate_statistics", "grid_size": 2},
    }
    results = train_and_evaluate(small_config(num_train_steps=2, evals=evals), str(tmp_path))
    assert list(results) == ["argmax", "gates"]
    assert results["gates"]["gate_mode"] == "argmax"  # the first classification's mode
    logged = read_metrics(str(tmp_path), "eval")
    assert [(r["step"], r["evaluator"]) for r in logged] == [(2, "argmax"), (2, "gates")]
    matrix = np.load(tmp_path / "gates" / "class_layer_argmax_step2.npy")
    np.testing.assert_allclose(matrix, np.array(results["gates"]["class_layer_rates"], float))
    assert (tmp_path / "gates" / "step2" / results["gates"]["plots"]["class_layer"]).exists()


# ----------------------------------------------------------------------- datasets, end to end


def test_tfds_source_trains_end_to_end_with_mock_data(tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")
    config = small_config(
        dataset__source="tfds",
        dataset__name="cifar10",
        dataset__data_dir=str(tmp_path / "tfds"),
        dataset__image_size=32,
        dataset__crop_padding=4,
        num_train_steps=2,
        eval_limit=20,
    )
    with tfds.testing.mock_data(policy=tfds.testing.MockPolicy.USE_CODE, num_examples=40):
        results = train_and_evaluate(config, str(tmp_path / "run"))
    assert results["argmax"]["num_examples"] == 20
    assert len(results["argmax"]["layer_rates"]) == 3


MINI = os.path.join(SHARED_DATA, "cifar10", "mini")


@pytest.mark.skipif(
    not os.path.isdir(MINI), reason=f"real CIFAR-10 subset not found at {os.path.abspath(MINI)}"
)
def test_real_cifar10_subset_learns_and_gates_move_to_the_target(tmp_path):
    """ResNet-8, every block gated at t = 0.6, 250 steps on 2,560 real CIFAR-10 images: test
    accuracy well above chance (10%) on the 1,000 test images, and training execution rates that
    start near the gates' initial 0.87 and end near the target (the README quotes this run)."""
    config = tiny.get_config()
    config.update_from_flattened_dict(
        {
            "dataset.source": "npz",
            "dataset.name": "cifar10",
            "dataset.data_dir": MINI,
            "dataset.image_size": 32,
            "dataset.crop_padding": 4,
            "dataset.flip": True,
            "dataset.mean": default.CIFAR_MEAN,
            "dataset.std": default.CIFAR_STD,
            "target_rate": 0.6,
            "num_train_steps": 250,
            "lr_boundaries_epochs": (5,),
            "weight_decay": 5e-4,
            "eval_every_epochs": 1000.0,
            "evals.sample.during_training": False,
            "log_every_steps": 5,
            "num_devices": 1,
            "tensorboard": False,
            "progress": False,
        }
    )
    results = train_and_evaluate(config, str(tmp_path))["argmax"]
    assert results["num_examples"] == 1000
    assert results["top1_error"] < 74.0  # accuracy above 26%
    logged = read_metrics(str(tmp_path), "train")
    first, last = np.array(logged[0]["gate_rates"]), np.array(logged[-1]["gate_rates"])
    assert first.mean() > 0.75 and abs(last.mean() - 0.6) < 0.1
    assert abs(np.mean(results["layer_rates"]) - 0.6) < 0.15


def test_loop_timer_leaves_out_pauses_and_measures_input_waits():
    def slow_batches(n, seconds):
        for i in range(n):
            time.sleep(seconds)
            yield {"i": i}

    timer = LoopTimer(step=10)
    batches = slow_batches(4, 0.05)
    steps = 10
    while timer.wait_for(batches) is not None:
        time.sleep(0.05)  # the "step"
        steps += 1
        with timer.paused():
            time.sleep(0.25)  # evaluation / checkpointing: not training time
    lap = timer.lap(steps, batch_size=8)
    # 0.4 s of training, half of it waiting for input; the 1 s of pauses is left out
    # (counting it would give 4 · 8 / 1.4 ≈ 23 images/s).
    assert 0.35 < lap["input_wait_fraction"] < 0.65
    assert 0.6 * 80 < lap["images_per_sec"] < 1.05 * 80
    again = timer.lap(steps, batch_size=8)  # a new interval: no steps, nothing waited
    assert again["images_per_sec"] == 0 and again["input_wait_fraction"] == 0


# --------------------------------------------------------------------- divergence (NaN, inf)


def _tiny_command(workdir, *overrides):
    """train.py arguments: the small config in ``workdir``, plus ``--config.…`` overrides."""
    small = [f"--config.{k}={v}" for k, v in SMALL.items() if k != "evals"]
    return [
        os.path.join(REPO, "train.py"),
        f"--config={os.path.join(REPO, 'configs', 'tiny.py')}",
        f"--workdir={workdir}",
        *small,
        *overrides,
    ]


def _all_finite(tree):
    return all(np.isfinite(np.asarray(leaf)).all() for leaf in jax.tree.leaves(tree))


def test_divergence_stops_at_the_step_and_keeps_the_last_finite_checkpoint(tmp_path):
    """lr 1e4: train.py exits 2 naming the first non-finite step; a checkpoint every step, of
    which two are kept, yet the newest on disk is the finite one before that step."""
    workdir = str(tmp_path / "run")
    proc = run_cli(
        *_tiny_command(
            workdir,
            "--config.learning_rate=10000",
            "--config.num_train_steps=30",
            "--config.checkpoint_every_steps=1",
            "--config.keep_checkpoints=2",
            f"--compilation_cache={tmp_path / 'xla'}",
        )
    )
    line = user_error_line(proc)
    step = int(line.split(" at step ")[1].split(";")[0])
    assert "lower config.learning_rate (now 10000)" in line and 1 < step < 30, line
    variables, opt_state, meta = restore_state(workdir, small_config())
    assert meta["step"] == step - 1 and f"the newest checkpoint is step {step - 1}" in line
    assert _all_finite(variables) and _all_finite(opt_state)
    logged = read_metrics(workdir, "train")
    assert [m["step"] for m in logged] == list(range(1, step))
    assert all(np.isfinite(m["loss"]) for m in logged)
    assert not os.path.exists(os.path.join(workdir, LOCK))  # released on the error


def test_skip_step_keeps_the_state_of_a_nonfinite_batch():
    spec, model, tx, state0 = _small_model_and_state()
    rng = np.random.default_rng(0)
    clean = {
        "image": rng.normal(size=(16, 8, 8, 3)).astype(np.float32),
        "label": rng.integers(0, 10, 16).astype(np.int32),
    }
    poisoned = {**clean, "image": clean["image"].copy()}
    poisoned["image"][3, 2, 2, 0] = np.nan
    step = make_train_step(
        model, tx, spec.targets, target_weight=2.0, donate=False, on_nonfinite="skip_step"
    )
    mesh = make_mesh(1)
    with jax.set_mesh(mesh):
        state = replicate(state0, mesh)
        skipped, metrics = step(state, shard_batch(poisoned, mesh), jax.random.key(3))
        applied, clean_metrics = step(skipped, shard_batch(clean, mesh), jax.random.key(3))
    assert not metrics["finite"] and np.isnan(metrics["loss"]) and clean_metrics["finite"]
    before, after = jax.device_get((state, skipped))
    assert int(after.step) == 1  # the batch is consumed; its update is not applied
    for name in ("params", "batch_stats", "opt_state"):
        jax.tree.map(np.testing.assert_array_equal, getattr(before, name), getattr(after, name))
    changed = jax.tree.leaves(jax.device_get(applied.params))
    assert any(
        not np.array_equal(a, b)
        for a, b in zip(changed, jax.tree.leaves(before.params), strict=True)
    )


def test_skip_step_trains_through_divergence_counting_the_skipped_steps(tmp_path):
    config = small_config(learning_rate=1e4, num_train_steps=8, on_nonfinite="skip_step")
    train_and_evaluate(config, str(tmp_path))
    logged = read_metrics(str(tmp_path), "train")
    assert [m["step"] for m in logged] == list(range(1, 9))
    assert sum(m["skipped_steps"] for m in logged) > 0
    variables, _, meta = restore_state(str(tmp_path), config)
    assert meta["step"] == 8 and _all_finite(variables)
    # An evaluation whose outputs overflow is left out, not logged as NaN.
    assert all(np.isfinite(r["loss"]) for r in read_metrics(str(tmp_path), "eval"))


# ---------------------------------------------------------------------- one run per workdir


@pytest.fixture
def no_compiling(monkeypatch):
    """Fail the test if the training loop gets as far as building its training state."""

    def refuse(*args, **kwargs):
        raise AssertionError("compiled before the check")

    monkeypatch.setattr(loop, "create_train_state", refuse)


def _write_lock(workdir, pid, host):
    os.makedirs(workdir, exist_ok=True)
    record = {"pid": pid, "host": host, "started": "2026-01-01T00:00:00+00:00"}
    with open(os.path.join(workdir, LOCK), "w") as f:
        json.dump(record, f)
    return record


def test_a_live_run_holds_its_workdir(tmp_path, no_compiling):
    workdir = str(tmp_path)
    record = _write_lock(workdir, os.getpid(), socket.gethostname())
    match = rf"in use by pid {os.getpid()} on host .* since 2026-01-01.*another --workdir"
    with pytest.raises(WorkdirError, match=match):
        train_and_evaluate(small_config(num_train_steps=1), workdir)
    assert os.listdir(workdir) == [LOCK]  # nothing written, the holder's lock kept
    with open(os.path.join(workdir, LOCK)) as f:
        assert json.load(f) == record


def test_a_dead_runs_lock_is_taken_over_and_released(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # reaped: its pid names no process
    workdir = str(tmp_path)
    _write_lock(workdir, dead.pid, socket.gethostname())
    train_and_evaluate(small_config(num_train_steps=1), workdir)
    assert restore_state(workdir, small_config())[2]["step"] == 1
    assert not os.path.exists(os.path.join(workdir, LOCK))


def test_a_stale_lock_replaced_meanwhile_by_a_new_run_is_not_removed(tmp_path):
    """Two runs read the same dead holder; the faster one took the lock over: the slower one's
    take-over leaves the new lock in place (and then refuses, naming its holder)."""
    stale = {"pid": 2**22 + 1, "host": socket.gethostname(), "started": "2026-01-01T00:00:00"}
    record = _write_lock(str(tmp_path), os.getpid(), socket.gethostname())
    workdir_lock._take_over(str(tmp_path / LOCK), stale)
    assert os.listdir(tmp_path) == [LOCK]
    with open(tmp_path / LOCK) as f:
        assert json.load(f) == record


# --------------------------------------------------------------- checks before compiling


def test_unwritable_workdir_is_refused_before_compiling(tmp_path, no_compiling):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(WorkdirError, match=rf"cannot create workdir {blocker}/run"):
        train_and_evaluate(small_config(num_train_steps=1), str(blocker / "run"))


def test_empty_evaluation_split_is_refused_before_compiling(tmp_path, no_compiling):
    data = tmp_path / "data"
    data.mkdir()
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (32, 8, 8, 3), dtype=np.uint8)
    np.savez(data / "d_train.npz", image=images, label=np.arange(32) % 10)
    np.savez(data / "d_test.npz", image=images[:0], label=np.zeros(0, np.int64))
    config = small_config(dataset__source="npz", dataset__data_dir=str(data))
    with pytest.raises(DataError, match=r"evaluation split 'test' .* is empty"):
        train_and_evaluate(config, str(tmp_path / "run"))
    assert not os.path.exists(tmp_path / "run" / "checkpoints")


def test_finished_workdir_has_nothing_to_do_and_a_shorter_config_is_refused(
    tmp_path, capsys, monkeypatch
):
    workdir = str(tmp_path)
    train_and_evaluate(small_config(num_train_steps=2), workdir)
    capsys.readouterr()
    monkeypatch.setattr(loop, "compile_together", None)  # no train step is compiled
    assert train_and_evaluate(small_config(num_train_steps=2), workdir) == {}
    assert capsys.readouterr().out == (
        f"nothing to do: step 2 of 2; eval.py --workdir {workdir} to evaluate\n"
    )
    with pytest.raises(WorkdirError, match=r"already at step 2, past this run's final step 1"):
        train_and_evaluate(small_config(num_train_steps=1), workdir)
    assert [m["step"] for m in read_metrics(workdir, "train")] == [1, 2]


def test_train_py_names_a_missing_config_file_or_field_and_the_closest_ones(tmp_path):
    proc = run_cli(*_tiny_command(str(tmp_path / "run"), "--config.learning_rat=0.1"))
    line = user_error_line(proc)
    assert "no field 'learning_rat'" in line and "did you mean --config.learning_rate" in line
    assert not os.path.exists(tmp_path / "run")
    missing = str(tmp_path / "nope.py")
    proc = run_cli("train.py", f"--config={missing}", f"--workdir={tmp_path / 'run'}")
    assert user_error_line(proc) == f"error: --config {missing}: no such config file"
    with pytest.raises(ConfigError, match=r"'dataset.sorce'.*--config.dataset.source"):
        check_override_names(small_config(), ["batch_size", "dataset.sorce"])
    with pytest.raises(
        ConfigError, match=r"eval_gate_modes\): list the evaluators in config.evals"
    ):
        check_override_names(small_config(), ["eval_gate_modes"])
