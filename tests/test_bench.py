"""python -m bench.speed runs end to end (its smallest setting) and writes the documented JSON."""

import json
import math
import os
import subprocess
import sys

import jax
import pytest

from bench import model_bench, speed, table
from tests.conftest import HANG_GUARD_S

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _positive(value):
    return isinstance(value, float) and math.isfinite(value) and value > 0


def _run_bench(*args):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device
    env["JAX_PLATFORMS"] = "cpu"
    proc = subprocess.run(
        [sys.executable, "-m", "bench.speed", "--tiny", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=HANG_GUARD_S,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_bench_tiny_writes_json_with_every_measurement(tmp_path):
    out = tmp_path / "result.json"
    proc = _run_bench("--out", str(out))
    assert "skipping resnet8_cifar batch1_rate_0.5" in proc.stdout and str(out) in proc.stdout
    results = json.loads(out.read_text())
    assert results["backend"] == "cpu" and results["jax_version"] and results["device"]
    (model,) = results["models"]
    assert model["model"] == "resnet8_cifar"
    assert {k for k, v in model.items() if isinstance(v, dict)} == {"gated", "ungated", "ratios"}
    for tag in ("gated", "ungated"):
        m = model[tag]
        assert _positive(m["train_images_per_s"]) and _positive(m["infer_images_per_s"])
        assert _positive(m["train_compile"]["compile_s"])
        assert m["train_compile"]["compiled_bytes"] > 0
        assert "phases" not in m["train_compile"]  # compiles are traced with --profile only
        assert m["peak_device_bytes"] is None  # the CPU backend reports no memory statistics
    assert set(model["ratios"]) == {"train_gated_over_ungated", "infer_gated_over_ungated"}
    assert all(_positive(r) for r in model["ratios"].values())
    (skipping,) = results["skipping"]
    # 3 blocks: execute, skip, execute; only lax.cond on a CPU
    assert skipping["batch1_rate_0.5"]["rate"] == pytest.approx(2 / 3)
    assert skipping["batch1_rate_1.0"]["rate"] == 1.0
    assert 0 < skipping["batch4_median"]["rate"] < 1
    rows = [v for v in skipping.values() if isinstance(v, dict)]
    assert len(rows) == 3 and all(set(r) == {"rate", "masked_images_per_s", "cond"} for r in rows)
    assert all(_positive(r["cond"]["speedup"]) for r in rows)
    (loop,) = results["loop"]
    assert loop["model"] == "resnet8_cifar" and _positive(loop["images_per_s"])
    assert 0 <= loop["input_wait_fraction"] <= 1 and _positive(loop["over_bare_step"])
    # the step's time in the loop = bare step + input wait + the rest on the host
    step_ms = 1e3 * loop["batch"] / loop["images_per_s"]
    bare_ms = 1e3 * loop["batch"] / loop["bare_images_per_s"]
    assert loop["input_wait_ms"] + loop["host_ms"] + bare_ms == pytest.approx(step_ms)
    assert "training loop resnet8_cifar" in proc.stdout


def test_bench_sections_measure_only_what_is_asked_and_fill_the_cache_dir(tmp_path):
    out, cache = tmp_path / "skipping.json", tmp_path / "cache"
    proc = _run_bench("--sections", "skipping", "--cache-dir", str(cache), "--out", str(out))
    results = json.loads(out.read_text())
    assert not {"models", "loop"} & set(results)
    assert results["skipping"][0]["model"] == "resnet8_cifar"
    assert "skipping resnet8_cifar batch4_median" in proc.stdout
    assert any(cache.iterdir())  # the compiled programs, for a later run to read


def test_models_option_keeps_the_named_models_in_order_and_names_unknown_ones():
    models = speed.SIZES["full"]["models"]
    assert speed.select_models(models, None) == models
    assert speed.select_models(models, ["resnet110_cifar"]) == [("resnet110_cifar", 32, 256)]
    assert speed.select_models(models, ["resnet110_cifar", "resnet50"]) == models
    with pytest.raises(ValueError, match=r"--models \['resnet18'\] not among"):
        speed.select_models(models, ["resnet18", "resnet50"])
    with pytest.raises(SystemExit):
        speed.main(["--tiny", "--models", "resnet50"])


def test_variants_and_profile_measure_only_the_asked_variants(tmp_path):
    out = tmp_path / "gated.json"
    args = ("--sections", "models", "--variants", "gated", "--profile", "--out", str(out))
    proc = _run_bench(*args)
    results = json.loads(out.read_text())
    assert results["xla_flags"] == ""
    (model,) = results["models"]
    assert "ungated" not in model
    assert model["ratios"] == {}
    gated = model["gated"]
    kernels = gated["train_kernels"]
    assert kernels["ops"] > 0 and 0 < kernels["gate_op_ms"] < kernels["op_ms"]
    assert all(len(row) == 3 and row[2] > 0 for row in kernels["top"])
    phases = gated["train_compile"]["phases"]
    assert len(phases) == 15 and all(s > 0 and count >= 1 for _, s, count in phases)
    assert "gated train step" in proc.stdout and "of which gates" in proc.stdout
    assert "gated train compile" in proc.stdout


def test_variants_are_the_gated_and_the_ungated_model():
    assert model_bench.VARIANTS == ("gated", "ungated")
    with pytest.raises(SystemExit):  # --variants takes only these
        speed.main(["--tiny", "--variants", "gated", "other"])
    gated, ungated = (
        model_bench.model_config("resnet8_cifar", "float32", v) for v in ("gated", "ungated")
    )
    assert gated.target_schedule == "uniform" and ungated.target_schedule == "ungated"
    model, _, _ = model_bench.train_step_for(ungated)
    assert model.gated_flags() == (False,) * 3


def test_a_failed_variant_raises(monkeypatch):
    def variant(config, size, batch, iters, mesh, profile, figures, say):
        raise ValueError("broken")

    monkeypatch.setattr(model_bench, "_bench_variant", variant)
    with pytest.raises(ValueError, match="broken"):
        model_bench.bench_model("resnet8_cifar", 16, 8, "float32", 1, ("gated",))


def test_the_reference_is_measured_and_compared_per_variant():
    pytest.importorskip("torch", reason="PyTorch not installed: pip install -e .[torch]")
    ref = model_bench.bench_reference("resnet8_cifar", 16, 4, "float32", 1)
    assert ref["device"] == "cpu" and ref["torch"]
    for tag in ("gated", "ungated"):
        assert _positive(ref[tag]["train_images_per_s"]) and _positive(
            ref[tag]["infer_images_per_s"]
        )
    ours = {tag: {"train_images_per_s": 2.0, "infer_images_per_s": 3.0} for tag in ("gated",)}
    ref = {**ref, "gated": {"train_images_per_s": 4.0, "infer_images_per_s": 1.5}}
    assert speed.reference_ratios(ours, ref) == {
        "train_gated_over_reference": 0.5,
        "infer_gated_over_reference": 2.0,
    }


def test_the_table_lists_each_variant_and_the_ratios():
    figures = {
        "train_images_per_s": 100.0,
        "infer_images_per_s": 3000.0,
        "train_compile": {"trace_s": 0.5, "compile_s": 4.5},
        "peak_device_bytes": None,
    }
    result = {"model": "resnet8_cifar", "image_size": 16, "batch": 8, "gated": figures}
    result["ungated"] = {**figures, "train_images_per_s": 200.0}
    result["ratios"] = model_bench._ratios(result)
    assert result["ratios"] == {"train_gated_over_ungated": 0.5, "infer_gated_over_ungated": 1.0}
    lines = table.table({"models": [result]}).splitlines()
    assert lines[0].split()[:2] == ["model", "variant"]
    assert [line.split()[3] for line in lines[1:3]] == ["gated", "ungated"]
    assert lines[1].split()[4:6] == ["100", "3,000"]
    assert lines[3] == "resnet8_cifar: train_gated_over_ungated 0.5, infer_gated_over_ungated 1"


@pytest.fixture
def restored_jax_cache_config():
    """speed.main points JAX's persistent cache elsewhere and turns it off: put back the
    test session's settings afterwards."""
    from aig_jax.compilation_cache import enable_compilation_cache

    keys = (
        "jax_compilation_cache_dir",
        "jax_persistent_cache_min_compile_time_secs",
        "jax_persistent_cache_min_entry_size_bytes",
        "jax_enable_compilation_cache",
    )
    saved = {k: jax.config.values[k] for k in keys}
    yield
    for k, v in saved.items():
        jax.config.update(k, v)
    enable_compilation_cache(saved["jax_enable_compilation_cache"])


def test_an_interrupted_bench_keeps_the_figures_measured_so_far(
    tmp_path, monkeypatch, capsys, restored_jax_cache_config
):
    train = {"train_images_per_s": 123.0, "train_compile": {"trace_s": 0.5, "compile_s": 4.5}}

    def variant(config, size, batch, iters, mesh, profile, figures, say):
        figures.update(train)
        say("compiling the inference step")
        raise KeyboardInterrupt  # stopped while compiling the inference step

    monkeypatch.setattr(model_bench, "_bench_variant", variant)
    out = tmp_path / "stopped.json"
    args = ["--tiny", "--sections", "models", "--variants", "gated", "ungated", "--out", str(out)]
    with pytest.raises(KeyboardInterrupt):
        speed.main(args)
    (model,) = json.loads(out.read_text())["models"]
    assert model["model"] == "resnet8_cifar" and model["gated"] == train
    assert "ungated" not in model and "ratios" not in model
    assert capsys.readouterr().err.endswith("resnet8_cifar gated: compiling the inference step\n")
