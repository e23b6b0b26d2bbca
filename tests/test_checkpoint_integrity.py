"""Checkpoint integrity: damaged array data is detected at every restore, training falls back
to the newest good checkpoint, and a resumed run logs each step once."""

import json
import logging
import os
import shutil

import jax
import numpy as np
import pytest

from aig_jax import checkpoint
from aig_jax.eval.restore import restore
from aig_jax.model.spec import ModelSpec
from aig_jax.sharding import make_mesh
from aig_jax.train.loop import train_and_evaluate
from aig_jax.train.metrics import read_metrics
from tests.test_train import abstract_state, restore_state, small_config


def config(steps):
    """The small synthetic config for ``steps`` steps, checkpointing every two."""
    return small_config(num_train_steps=steps, checkpoint_every_steps=2)


@pytest.fixture(scope="module")
def four_steps(tmp_path_factory):
    """A workdir trained for four steps: checkpoints at steps 2 and 4."""
    workdir = str(tmp_path_factory.mktemp("four"))
    train_and_evaluate(config(4), workdir)
    return workdir


@pytest.fixture(scope="module")
def six_steps(tmp_path_factory):
    """A workdir trained for six steps in one go."""
    workdir = str(tmp_path_factory.mktemp("six"))
    train_and_evaluate(config(6), workdir)
    return workdir


@pytest.fixture
def run(four_steps, tmp_path):
    """A copy of the four-step workdir, to damage."""
    return str(shutil.copytree(four_steps, tmp_path / "run"))


def step_dir(workdir, step):
    return os.path.join(workdir, "checkpoints", str(step))


def largest_data_file(directory):
    """The largest array data file (in an OCDBT ``d/`` directory) under ``directory``."""
    files = [
        os.path.join(root, name)
        for root, _, names in os.walk(directory)
        if os.path.basename(root) == "d"
        for name in names
    ]
    return max(files, key=os.path.getsize)


def flip_one_bit(path):
    with open(path, "r+b") as f:
        data = bytearray(f.read())
        data[len(data) // 2] ^= 0x08
        f.seek(0)
        f.write(data)


def overwrite_8_bytes(path):
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2)
        old = f.read(8)
        f.seek(-8, os.SEEK_CUR)
        f.write(bytes(b ^ 0xFF for b in old))


def edit_meta(workdir, step, **fields):
    """Rewrite fields of a checkpoint's meta JSON (None deletes the field)."""
    path = os.path.join(step_dir(workdir, step), "meta", "metadata")
    with open(path) as f:
        meta = json.load(f)
    for name, value in fields.items():
        if value is None:
            meta.pop(name)
        else:
            meta[name] = value
    with open(path, "w") as f:
        json.dump(meta, f)


def test_checksums_cover_every_saved_array(four_steps):
    variables, opt_state, meta = restore_state(four_steps, small_config())
    saved = jax.tree_util.tree_flatten_with_path({**variables, "opt_state": opt_state})[0]
    assert len(meta[checkpoint.CHECKSUMS]) == len(saved)
    assert meta[checkpoint.CHECKSUMS] == checkpoint.checksums({**variables, "opt_state": opt_state})


@pytest.mark.parametrize("damage", [flip_one_bit, overwrite_8_bytes])
def test_resume_falls_back_past_damaged_array_data(run, six_steps, damage, caplog):
    damage(largest_data_file(step_dir(run, 4)))
    with caplog.at_level(logging.WARNING):
        train_and_evaluate(config(6), run)
    assert "checkpoint step 4 is corrupt" in caplog.text
    # Moved aside, out of the rotation, still on disk; training went on from step 2.
    assert os.path.isdir(os.path.join(run, "checkpoints_corrupt", "4", "model"))
    assert checkpoint.Checkpointer(os.path.join(run, "checkpoints")).all_steps() == [2, 4, 6]
    resumed, straight = restore_state(run, small_config()), restore_state(six_steps, small_config())
    for a, b in zip(jax.tree.leaves(resumed), jax.tree.leaves(straight), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert [m["step"] for m in read_metrics(run, "train")] == [1, 2, 3, 4, 5, 6]


def test_finished_run_whose_final_checkpoint_is_damaged_trains_it_again(
    run, four_steps, caplog, capsys
):
    flip_one_bit(largest_data_file(step_dir(run, 4)))
    with caplog.at_level(logging.WARNING):
        train_and_evaluate(config(4), run)
    assert "nothing to do" not in capsys.readouterr().out
    assert "checkpoint step 4 is corrupt: moved to" in caplog.text
    assert os.path.isdir(os.path.join(run, "checkpoints_corrupt", "4"))
    retrained, first = restore_state(run, small_config()), restore_state(four_steps, small_config())
    for a, b in zip(jax.tree.leaves(retrained), jax.tree.leaves(first), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_eval_restore_of_a_damaged_checkpoint_names_it(run):
    flip_one_bit(largest_data_file(os.path.join(step_dir(run, 4), "model")))
    mesh = make_mesh(1)
    message = r"checkpoint step 4 in .*checksum \(corrupt data\); other checkpoints here: steps 2"
    for path in (step_dir(run, 4), run):  # named, or the latest of the workdir: no fallback
        with pytest.raises(checkpoint.CheckpointError, match=message):
            restore(path, mesh)
    assert restore(step_dir(run, 2), mesh).step == 2


def test_checkpoint_without_checksums_loads_with_a_warning(run, caplog):
    edit_meta(run, 4, checksums=None)
    with caplog.at_level(logging.WARNING):
        variables, _, meta = restore_state(run, small_config())
    assert meta["step"] == 4
    assert "step 4" in caplog.text and "cannot be verified" in caplog.text
    assert np.all(np.isfinite(jax.tree.leaves(variables)[0]))


def test_array_restored_in_another_dtype_loads_unverified_with_a_warning(tmp_path, caplog):
    checkpoint.save_variables(str(tmp_path), 0, {"params": {"w": np.linspace(0, 1, 6)}}, {})
    one_device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    like = {"params": {"w": jax.ShapeDtypeStruct((6,), np.float32, sharding=one_device)}}
    with caplog.at_level(logging.WARNING):
        restored = checkpoint.load_variables(str(tmp_path), 0, like)
    assert "params/w saved as float64, restored as float32: not verified" in caplog.text
    np.testing.assert_array_equal(restored["params"]["w"], np.linspace(0, 1, 6, dtype=np.float32))


def test_meta_naming_another_step_is_refused(run):
    shutil.copytree(step_dir(run, 2), step_dir(run, 8))  # a step directory copied over
    with pytest.raises(checkpoint.CheckpointError, match=r"meta says step 2, not 8"):
        train_and_evaluate(config(10), run)
    with pytest.raises(checkpoint.CheckpointError, match=r"meta says step 2, not 8"):
        restore(step_dir(run, 8), make_mesh(1))
    assert not os.path.exists(os.path.join(run, "checkpoints_corrupt"))


def test_metrics_after_a_kill_and_resume_hold_each_step_once(run):
    # Killed while logging step 5, after the records of steps 3-4 but before checkpoint 4.
    shutil.rmtree(step_dir(run, 4))
    with open(os.path.join(run, "metrics.jsonl"), "a") as f:
        f.write('{"step": 5, "kind": "tr')
    train_and_evaluate(config(6), run)
    with open(os.path.join(run, "metrics.jsonl")) as f:
        logged = [json.loads(line) for line in f]
    keys = [(r["step"], r["kind"]) for r in logged]
    assert sorted(keys) == sorted({*keys}) and len(keys) == len(read_metrics(run))
    assert [s for s, kind in keys if kind == "train"] == [1, 2, 3, 4, 5, 6]


def test_read_metrics_keeps_the_last_record_of_each_step(tmp_path):
    records = [
        {"step": 1, "kind": "train", "loss": 3.0},
        {"step": 2, "kind": "train", "loss": 2.0},
        {"step": 2, "kind": "eval", "gate_mode": "argmax", "top1_error": 50.0},
        {"step": 2, "kind": "eval", "gate_mode": "sample", "top1_error": 60.0},
        {"step": 2, "kind": "train", "loss": 2.5},  # replayed after a kill
    ]
    with open(tmp_path / "metrics.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
        f.write('{"step": 3, "ki')  # cut short by a kill
    assert read_metrics(str(tmp_path), "train") == [records[0], records[4]]
    assert read_metrics(str(tmp_path), "eval") == records[2:4]


def test_init_from_gives_another_runs_variables_at_step_0(four_steps, tmp_path):
    spec, like = abstract_state(small_config())
    empty = str(tmp_path / "checkpoints")
    saved = checkpoint.restore_or_init(
        empty, like.variables, like.opt_state, spec, init_from=four_steps, fallback=True
    )
    assert (saved.step, saved.opt_state, saved.meta["step"]) == (0, None, 4)
    trained, _, _ = restore_state(four_steps, small_config())
    jax.tree.map(np.testing.assert_array_equal, saved.variables, trained)
    other = ModelSpec.from_config(small_config(model="resnet14_cifar"))
    with pytest.raises(checkpoint.CheckpointError, match="is for another model: name differs"):
        checkpoint.restore_or_init(empty, like.variables, None, other, init_from=four_steps)
    with pytest.raises(checkpoint.CheckpointError, match=r"init_from .*: no checkpoint there"):
        checkpoint.restore_or_init(empty, like.variables, None, spec, init_from=str(tmp_path))
