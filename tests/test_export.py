"""Exported models: the jax-only runtime gives eval.py's outputs, the artefact holds what it
says, and the predictor's output and errors."""

import json
import os
import re
import shutil
import subprocess
import sys
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from aig_jax.data import eval_transform, make_source
from aig_jax.errors import exit_on_user_error
from aig_jax.eval.evaluators import Calibration, EvalContext
from aig_jax.eval.restore import restore
from aig_jax.export import artefact, predict, runtime
from aig_jax.export.artefact import export_model
from aig_jax.export.programs import flat_weights
from aig_jax.model.flops import model_cost
from aig_jax.model.resnet import build_model
from aig_jax.sharding import make_mesh
from tests.conftest import HANG_GUARD_S, run_cli, user_error_line
from tests.tiny_checkpoint import trained_tiny

#: Evaluation images compared between the runtime and eval.py's path.
NUM_IMAGES = 24

#: Runs the standalone runtime where importing aig_jax or flax fails: argv = artefact, images
#: (.npy), output (.npz). Each image alone (the batch-1 program), then all (the batched one).
DRIVER = """
import importlib.abc, os, sys

class Blocked(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("aig_jax", "flax"):
            raise ImportError(f"{name} is blocked")

sys.meta_path.insert(0, Blocked())
for name in ("aig_jax", "flax"):
    try:
        __import__(name)
    except ImportError:
        pass
    else:
        raise SystemExit(f"{name} was importable")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # python -I leaves it out
import numpy as np
from runtime import Exported

model = Exported.load(sys.argv[1])
images = np.load(sys.argv[2])
single = [model(images[i : i + 1]) for i in range(len(images))]
batched = model(images)
np.savez(
    sys.argv[3],
    logits1=np.concatenate([o.logits for o in single]),
    decisions1=np.concatenate([o.decisions for o in single], axis=1),
    macs1=np.concatenate([o.macs for o in single]),
    logits=batched.logits,
    decisions=batched.decisions,
    macs=batched.macs,
)
assert not [m for m in sys.modules if m.split(".")[0] in ("aig_jax", "flax")]
"""


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(workdir, config) of a tiny gated model trained for a few steps."""
    return trained_tiny(tmp_path_factory)


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory):
    """{mode: artefact path} of the trained model, exported by the command line."""
    workdir, _ = trained
    out = tmp_path_factory.mktemp("export")
    paths = {}
    names = out / "names.txt"
    names.write_text("".join(f"digit {k}\n" for k in range(10)))
    for mode, extra in (
        ("argmax", ["--platforms=cpu"]),
        ("calibrated", ["--calibration_limit=256", f"--class_names={names}"]),
    ):
        paths[mode] = str(out / f"{mode}.aig")
        args = ["-m", "aig_jax.export", f"--workdir={workdir}", f"--out={paths[mode]}"]
        proc = run_cli(*args, f"--mode={mode}", *extra)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert f"wrote {paths[mode]}" in proc.stdout
    return paths


def _run_standalone(path, images, tmp_path):
    """The runtime's outputs for ``images``, run by a copy of runtime.py alone."""
    shutil.copy(runtime.__file__, tmp_path / "runtime.py")
    (tmp_path / "driver.py").write_text(DRIVER)
    np.save(tmp_path / "images.npy", images)
    proc = subprocess.run(
        [sys.executable, "-I", "driver.py", path, "images.npy", "out.npz"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=HANG_GUARD_S,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return dict(np.load(tmp_path / "out.npz"))


@pytest.mark.parametrize("mode", ["argmax", "calibrated"])
def test_standalone_runtime_gives_the_eval_paths_outputs(trained, exported, mode, tmp_path):
    workdir, _ = trained
    with zipfile.ZipFile(exported[mode]) as archive:
        manifest = json.loads(archive.read("manifest.json"))
    thresholds = np.asarray(manifest["gates"]["thresholds"], np.float32)
    mesh = make_mesh()
    restored = restore(workdir, mesh)
    model, config = restored.model, restored.config
    ctx = EvalContext.create(
        model, restored.spec, config.dataset, mesh, batch_size=config.eval_batch_size,
        progress=False,
    )  # fmt: skip
    if mode == "calibrated":  # the command line fitted what eval.py fits
        fit = Calibration(ctx, limit=256).run(restored.variables)
        np.testing.assert_array_equal(thresholds, np.float32(fit["thresholds"]))
        assert manifest["classes"]["names"] == [f"digit {k}" for k in range(10)]
        assert manifest["platforms"] == ["cpu", "cuda", "tpu"]  # the default
    else:
        np.testing.assert_array_equal(thresholds, 0.5)
        assert manifest["classes"]["names"] == list("0123456789")  # the dataset's
    preds = ctx.predict(
        restored.variables, mode, limit=NUM_IMAGES, thresholds=thresholds, desc="reference"
    )
    raw, labels = make_source(config.dataset, config.dataset.eval_split).read(np.arange(NUM_IMAGES))
    out = _run_standalone(
        exported[mode], eval_transform(raw, config.dataset, normalised=False), tmp_path
    )

    ref_gates = preds.gates.T  # [L, N]
    assert 0 < ref_gates.mean() < 1  # some blocks skipped, some executed
    host = jax.device_get(restored.variables)
    ref_logits = jax.jit(
        lambda x: model.apply(host, x, gate_mode=mode, thresholds=thresholds).logits
    )(eval_transform(raw, config.dataset))
    ref_macs = np.asarray(model_cost(model, config.dataset.image_size).realised_macs(ref_gates))
    for suffix in ("1", ""):  # the batch-1 program, image by image, then the batched one
        logits = out["logits" + suffix]
        np.testing.assert_array_equal(out["decisions" + suffix], ref_gates.astype(bool))
        np.testing.assert_allclose(logits, ref_logits, rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(out["macs" + suffix], ref_macs)
        np.testing.assert_array_equal(np.argsort(-logits, axis=1)[:, :5], preds.top)
        log_probs = jax.nn.log_softmax(logits)
        np.testing.assert_allclose(np.exp(log_probs.max(axis=1)), preds.confidence, rtol=1e-5)
        loss = -np.take_along_axis(np.asarray(log_probs), labels[:, None], axis=1)[:, 0]
        np.testing.assert_allclose(loss, preds.loss, rtol=1e-5, atol=1e-6)


def test_batch1_program_puts_each_gated_branch_under_a_conditional(exported):
    manifest, files = runtime.read_artefact(exported["argmax"])
    assert sum(b["gated"] for b in manifest["blocks"]) == 3
    conds = {}
    for name, program in manifest["programs"].items():
        exp = jax.export.deserialize(bytearray(files[program["file"]]))
        assert files[program["stablehlo"]] == exp.mlir_module_serialized
        conds[name] = len(re.findall(r"stablehlo\.(?:case|if)\b", exp.mlir_module()))
        assert str(exp.in_avals[-1].shape[0]) == str(program["batch"])
    assert conds == {"batch1": 3, "batched": 0}


def _tiny_model():
    model = build_model("resnet8_cifar", num_classes=10)
    variables = jax.jit(model.init)({"params": jax.random.key(0)}, jnp.zeros((1, 8, 8, 3)))
    return model, jax.device_get(variables)


def _export(path, model, variables, **kwargs):
    settings = {"image_size": 8, "preprocess": "cifar", "mean": (0.5,) * 3, "std": (0.25,) * 3}
    return export_model(str(path), model, variables, **settings, **kwargs)


def test_artefact_holds_the_weights_costs_and_programs_for_every_platform(tmp_path):
    model, variables = _tiny_model()
    platforms = ("cpu", "cuda", "tpu")
    _export(tmp_path / "all.aig", model, variables, platforms=platforms)
    manifest, files = runtime.read_artefact(str(tmp_path / "all.aig"))
    assert set(files) == {"manifest.json", "manifest.sha256", *manifest["files"]}
    for program in manifest["programs"].values():
        exp = jax.export.deserialize(bytearray(files[program["file"]]))
        assert exp.platforms == platforms
    names, arrays, _ = flat_weights(variables)
    loaded = runtime._weights(manifest, files["weights.bin"])
    assert [a["name"] for a in manifest["weights"]["arrays"]] == names
    for mine, theirs in zip(loaded, arrays, strict=True):
        np.testing.assert_array_equal(mine, theirs)
    cost = model_cost(model, 8)
    assert manifest["macs"]["all_blocks"] == cost.macs
    assert [b["branch_macs"] for b in manifest["blocks"]] == cost.branch_macs.tolist()
    # Built for three platforms, it runs here like an artefact built for the CPU alone.
    _export(tmp_path / "cpu.aig", model, variables)
    images = np.random.default_rng(0).integers(0, 256, (3, 8, 8, 3), np.uint8)
    for program, batch in (("batch1", images[:1]), ("batched", images)):
        both = [
            runtime.Exported.load(str(tmp_path / n))(batch, program=program)
            for n in ("all.aig", "cpu.aig")
        ]
        for a, b in zip(*both, strict=True):
            np.testing.assert_array_equal(a, b)
    with pytest.raises(runtime.ArtefactError, match="no cuda device"):
        runtime.Exported.load(str(tmp_path / "all.aig"), platform="cuda")


def test_thresholds_passed_at_call_time_change_the_decisions(tmp_path):
    model, variables = _tiny_model()
    _export(tmp_path / "m.aig", model, variables, gate_mode="calibrated", thresholds=[2.0] * 3)
    loaded = runtime.Exported.load(str(tmp_path / "m.aig"))
    images = np.zeros((2, 8, 8, 3), np.uint8)
    cost = model_cost(model, 8)
    skipped = loaded(images)
    np.testing.assert_array_equal(skipped.decisions, False)
    np.testing.assert_array_equal(skipped.macs, cost.fixed_macs)
    executed = loaded(images, thresholds=np.full(3, -1.0))
    np.testing.assert_array_equal(executed.decisions, True)
    np.testing.assert_array_equal(executed.macs, cost.macs)
    with pytest.raises(
        ValueError, match=r"uint8 images \[B, 8, 8, 3\], got float32 \[2, 8, 8, 3\]"
    ):
        loaded(images.astype(np.float32))
    with pytest.raises(ValueError, match="'batch1' cannot run 2 images"):
        loaded(images, program="batch1")
    with pytest.raises(ValueError, match="calibrated' needs 3 thresholds, got 2"):
        _export(tmp_path / "bad.aig", model, variables, gate_mode="calibrated", thresholds=[0, 0])


def test_predictor_prints_classes_blocks_and_gmacs(exported, trained, tmp_path):
    _, config = trained
    raw, labels = make_source(config.dataset, "test").read(np.arange(3))
    paths = []
    for i, image in enumerate(raw):
        paths.append(str(tmp_path / f"digit{i}.png"))
        Image.fromarray(image).save(paths[-1])
    small = str(tmp_path / "small.png")
    Image.fromarray(raw[0][::2, ::2]).save(small)
    proc = run_cli("-m", "aig_jax.export.predict", exported["argmax"], *paths, small)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"note: {small} is 8×8: resized it to 16×16" in proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == 4
    loaded = runtime.Exported.load(exported["argmax"])
    for path, line in zip([*paths, small], lines, strict=True):
        image = predict.load_image(path, 16, "cifar")[0]
        out = loaded(image[None])
        name, classes, blocks, gmacs = re.fullmatch(
            r"(.*): (.*) \| blocks (.*) \| (.*) GMACs", line
        ).groups()
        assert name == path
        assert [int(c.split()[0]) for c in classes.split(", ")] == list(
            np.argsort(-out.logits[0])[:5]
        )
        assert blocks == f"{int(out.decisions.sum())}/3"
        assert gmacs == f"{out.macs[0] / 1e9:.4g}"
    assert lines[0].split(": ")[1].startswith(f"{labels[0]} ")  # the trained model is right


def _rewritten(path, out, edit):
    """A copy of the artefact at ``path`` whose manifest ``edit`` changed, checksums redone."""
    manifest, files = runtime.read_artefact(path)
    edit(manifest)
    text = json.dumps(manifest).encode()
    files.update({"manifest.json": text, "manifest.sha256": runtime.sha256(text).encode()})
    artefact._write_zip(str(out), files)
    return str(out)


def _flipped(path, out, member):
    """A copy of the artefact with one byte of ``member`` changed, its zip CRC redone."""
    with zipfile.ZipFile(path) as archive:
        files = {n: archive.read(n) for n in archive.namelist()}
    data = bytearray(files[member])
    data[len(data) // 2] ^= 1
    files[member] = bytes(data)
    artefact._write_zip(str(out), files)
    return str(out)


def test_predictor_errors_are_one_line(exported, trained, tmp_path, capsys):
    good = exported["argmax"]
    image = tmp_path / "digit.png"
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(image)
    truncated = tmp_path / "truncated.aig"
    truncated.write_bytes(open(good, "rb").read()[: os.path.getsize(good) // 2])
    cases = {
        "no such image file: .*missing.png": [good, str(tmp_path / "missing.png")],
        "not a readable image": [good, str(tmp_path / "truncated.aig")],
        "no exported model at": [str(tmp_path / "none.aig"), str(image)],
        "truncated.aig is corrupt or truncated": [str(truncated), str(image)],
        "corrupt: the checksum of weights.bin differs": [
            _flipped(good, tmp_path / "flipped.aig", "weights.bin"),
            str(image),
        ],
        "format version 2, newer than this runtime reads \\(up to 1\\)": [
            _rewritten(good, tmp_path / "new.aig", lambda m: m.update(format_version=2)),
            str(image),
        ],
        "program batch1 has calling convention version 99; JAX .* runs versions": [
            _rewritten(
                good,
                tmp_path / "convention.aig",
                lambda m: m["programs"]["batch1"].update(calling_convention_version=99),
            ),
            str(image),
        ],
        "unknown platform 'gpu'; expected one of cpu, cuda, rocm, tpu": [
            good,
            str(image),
            "--platform=gpu",
        ],
        "exported for cpu, not tpu: export it again with --platforms cpu,tpu": [
            good,
            str(image),
            "--platform=tpu",
        ],
    }
    for message, argv in cases.items():
        with pytest.raises(SystemExit) as stop:
            exit_on_user_error(predict.main)(argv)
        assert stop.value.code == 2
        errors = capsys.readouterr().err.strip().splitlines()
        assert len(errors) == 1 and re.match(f"error: .*{message}", errors[0]), errors


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--step=7"], r"--step 7: no such checkpoint in .* \(steps \[100\]\)"),
        (["--platforms=cpu,gpu"], r"--platforms \['gpu'\]: expected some of cpu, cuda"),
        (["--class_names={names}"], r"--class_names .*names.txt names 3 classes; the model has 10"),
    ],
)
def test_export_command_line_errors(trained, tmp_path, args, message):
    workdir, _ = trained
    out, names = tmp_path / "m.aig", tmp_path / "names.txt"
    names.write_text("a\nb\nc\n")
    args = [a.format(names=names) for a in args]
    proc = run_cli("-m", "aig_jax.export", f"--workdir={workdir}", f"--out={out}", *args)
    assert re.search(message, user_error_line(proc))
    assert not out.exists()
