"""bench/aot_compile.py: kernel launches counted from compiled HLO, and the script end to end on
this host's CPU (GPU targets need JAX's CUDA plugin, which the tests do not install)."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))

import aot_compile  # noqa: E402  (bench/ is not a package)

# Entry: 2 kernels, a 3-trip loop (body 2 kernels, condition 1), a call (1 kernel) and an async
# copy (its start launches, its done does not); tuples, parameters and bitcasts launch nothing.
HLO = """
HloModule m

%fused (p: f32[4]) -> f32[4] {
  %p = f32[4]{0} parameter(0)
  ROOT %n = f32[4]{0} negate(%p)
}

%body (t: (s32[], f32[4])) -> (s32[], f32[4]) {
  %t = (s32[], f32[4]{0}) parameter(0)
  %i = s32[] get-tuple-element(%t), index=0
  %x = f32[4]{0} get-tuple-element(%t), index=1
  %a = f32[4]{0} fusion(%x), kind=kLoop, calls=%fused
  %b = s32[] fusion(%i), kind=kLoop, calls=%fused
  ROOT %r = (s32[], f32[4]{0}) tuple(%b, %a)
}

%cond (t: (s32[], f32[4])) -> pred[] {
  %t = (s32[], f32[4]{0}) parameter(0)
  %i = s32[] get-tuple-element(%t), index=0
  ROOT %lt = pred[] fusion(%i), kind=kLoop, calls=%fused
}

%callee (x: f32[4]) -> f32[4] {
  %x = f32[4]{0} parameter(0)
  ROOT %c = f32[4]{0} custom-call(%x), custom_call_target="kernel"
}

ENTRY %main (x: f32[4]) -> (f32[4], f32[4]) {
  %x = f32[4]{0} parameter(0)
  %f = f32[4]{0} fusion(%x), kind=kLoop, calls=%fused
  %g = f32[4]{0} custom-call(%f), custom_call_target="cudnn"
  %zero = s32[] constant(0)
  %init = (s32[], f32[4]{0}) tuple(%zero, %g)
  %w = (s32[], f32[4]{0}) while(%init), condition=%cond, body=%body, backend_config=TRIPS
  %o = f32[4]{0} get-tuple-element(%w), index=1
  %k = f32[4]{0} call(%o), to_apply=%callee
  %cs = (f32[4]{0}, f32[4]{0}, u32[]) copy-start(%k)
  %cd = f32[4]{0} copy-done(%cs)
  %v = f32[2,2]{1,0} bitcast(%cd)
  ROOT %out = (f32[4]{0}, f32[4]{0}) tuple(%cd, %k)
}
""".replace("TRIPS", '{"known_trip_count":{"n":"3"}}')


def test_kernel_launches_of_a_hand_written_module():
    # 2 + 3 × (2 + 1) + 1 (the exit test) + 1 + 1
    assert aot_compile.kernel_launches(HLO) == 14


def test_a_compiled_loop_counts_its_body_once_per_iteration():
    def launches(trips):
        def f(x):
            return jax.lax.fori_loop(0, trips, lambda i, y: jnp.sin(y) * 2 + y.sum(), x)

        return aot_compile.kernel_launches(jax.jit(f).lower(jnp.ones(64)).compile().as_text())

    two, five = launches(2), launches(5)
    assert two > 0 and five > two and (five - two) % 3 == 0


def _run(*args):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    return subprocess.run(
        [sys.executable, os.path.join(ROOT, "bench", "aot_compile.py"), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_cpu_target_writes_compile_times_and_launches(tmp_path):
    out = tmp_path / "aot.json"
    args = ("--target", "cpu", "--tiny", "--variants", "gated", "ungated", "--repeats", "2")
    proc = _run(*args, "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "launches/step" in proc.stdout and str(out) in proc.stdout
    results = json.loads(out.read_text())
    assert results["target"] == "cpu" and results["host_cpus"] == os.cpu_count()
    (model,) = results["models"]
    assert model["model"] == "resnet8_cifar" and set(model) >= {"gated", "ungated"}
    assert "gated_threefry_kernel" not in model
    for tag in ("gated", "ungated"):
        runs = model[tag]["compile_s_runs"]
        assert len(runs) == 2 and min(runs) > 0 and model[tag]["trace_s"] > 0
        assert model[tag]["compile_s"] == pytest.approx(sum(runs) / 2)  # the median of two
    assert model["gated"]["launches"] > model["ungated"]["launches"] > 0  # the gates' kernels


def test_an_unknown_target_is_named():
    proc = _run("--target", "tpu9", "--tiny")
    assert proc.returncode == 2
    assert "unknown target 'tpu9'" in proc.stderr and "h100" in proc.stderr


def test_a_missing_cuda_plugin_is_a_clear_error(monkeypatch):
    from jax.experimental import topologies

    def no_plugin(*args, **kwargs):
        raise NotImplementedError("topology not implemented for cuda")

    monkeypatch.setattr(topologies, "get_topology_desc", no_plugin)
    with pytest.raises(RuntimeError, match=r"jax-cuda12-plugin\[with-cuda\]==\d"):
        aot_compile.target_devices("h100")
