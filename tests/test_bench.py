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
    assert "speed-up" in proc.stdout and str(out) in proc.stdout
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
    skipping = model["gated"]["skipping"]
    # 3 blocks: execute, skip, execute
    assert skipping["batch1_rate_0.5"]["rate"] == pytest.approx(2 / 3)
    assert skipping["batch1_rate_1.0"]["rate"] == 1.0
    assert skipping["batch_median"]["path"] == "cond"
    assert all(_positive(s["speedup"]) for s in skipping.values())
    cache = results["compile_cache"]
    assert _positive(cache["cold_compile_s"]) and _positive(cache["warm_compile_s"])
    (loop,) = results["loop"]
    assert loop["model"] == "resnet8_cifar" and _positive(loop["images_per_s"])
    assert 0 <= loop["input_wait_fraction"] <= 1 and _positive(loop["over_bare_step"])
    assert "training loop resnet8_cifar" in proc.stdout
    assert [(p["preprocess"], p["source"]) for p in results["pipeline"]] == [
        ("cifar", "synthetic"),
        ("imagenet", "synthetic"),
        ("imagenet", "jpeg"),
    ]
    assert all(_positive(p["images_per_s"]) for p in results["pipeline"])
    assert all(_positive(p["host_normalised_images_per_s"]) for p in results["pipeline"])
    threads = os.cpu_count() or 1  # whole rounds of one batch per thread, at least 2 batches
    assert all(p["batches_timed"] % threads == 0 for p in results["pipeline"])
    assert all(p["batches_timed"] >= 2 for p in results["pipeline"])


def test_bench_sections_measure_only_what_is_asked(tmp_path):
    out = tmp_path / "pipeline.json"
    proc = _run_bench("--sections", "pipeline", "--out", str(out))
    results = json.loads(out.read_text())
    assert not {"models", "compile_cache", "loop"} & set(results)
    assert [(p["preprocess"], p["image_size"]) for p in results["pipeline"]] == [
        ("cifar", 32),
        ("imagenet", 64),
        ("imagenet", 64),
    ]
    assert "input pipeline imagenet (jpeg) 64² b8" in proc.stdout


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
    proc = _run_bench(
        "--sections", "models", "--variants", "gated", "--no-skipping", "--profile",
        "--out", str(out),
    )  # fmt: skip
    results = json.loads(out.read_text())
    assert results["xla_flags"] == ""
    (model,) = results["models"]
    assert "ungated" not in model
    assert model["ratios"] == {}
    gated = model["gated"]
    assert "skipping" not in gated
    kernels = gated["train_kernels"]
    assert kernels["ops"] > 0 and 0 < kernels["gate_op_ms"] < kernels["op_ms"]
    assert all(len(row) == 3 and row[2] > 0 for row in kernels["top"])
    phases = gated["train_compile"]["phases"]
    assert len(phases) == 15 and all(s > 0 and count >= 1 for _, s, count in phases)
    assert "gated train step" in proc.stdout and "of which gates" in proc.stdout
    assert "gated train compile" in proc.stdout


def test_variants_are_the_gated_and_the_ungated_model():
    assert model_bench.VARIANT_NAMES == ("gated", "ungated")
    with pytest.raises(SystemExit):  # --variants takes only these
        speed.main(["--tiny", "--variants", "gated", "other"])


def test_a_failed_variant_raises(monkeypatch):
    def variant(model, data, iters, mesh, profile, say, measured):
        raise ValueError("broken")

    monkeypatch.setattr(model_bench, "_bench_variant", variant)
    monkeypatch.setattr(model_bench, "_batch", lambda *args: {})  # no real step runs
    with pytest.raises(ValueError, match="broken"):
        model_bench.bench_model("resnet8_cifar", 16, 8, "float32", 1, ("gated",))


def test_the_table_lists_each_variant_and_the_ratios():
    figures = {
        "train_images_per_s": 100.0,
        "infer_images_per_s": 300.0,
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
    assert lines[3] == "resnet8_cifar: gated/ungated train 0.5, infer 1"


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

    def variant(model, data, iters, mesh, profile, say, measured):
        measured(train)
        say("tracing and compiling the inference step")
        raise KeyboardInterrupt  # stopped while compiling the inference step

    monkeypatch.setattr(model_bench, "_bench_variant", variant)
    monkeypatch.setattr(model_bench, "_batch", lambda *args: {})  # no real step runs
    out = tmp_path / "stopped.json"
    args = ["--tiny", "--sections", "models", "--variants", "gated", "ungated", "--out", str(out)]
    with pytest.raises(KeyboardInterrupt):
        speed.main(args)
    (model,) = json.loads(out.read_text())["models"]
    assert model["model"] == "resnet8_cifar" and model["gated"] == train
    assert "ungated" not in model and "ratios" not in model
    err = capsys.readouterr().err
    assert "resnet8_cifar gated: train 123 img/s, compiled in 4.5 s\n" in err
    assert err.endswith("resnet8_cifar gated: tracing and compiling the inference step\n")
