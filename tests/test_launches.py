"""bench/launches.py: kernels counted in compiled HLO, and kernels compiled read from the PTX that
XLA:GPU dumps (hand-written inputs with counts worked out by hand; a real GPU program where JAX's
CUDA plugin is installed)."""

import importlib.util
import os

import jax
import jax.numpy as jnp
import pytest

from aig_jax.compilation_cache import enable_compilation_cache
from bench import launches

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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
    assert launches.kernel_launches(HLO) == 14


def test_a_compiled_loop_counts_its_body_once_per_iteration():
    def count(trips):
        def f(x):
            return jax.lax.fori_loop(0, trips, lambda i, y: jnp.sin(y) * 2 + y.sum(), x)

        return launches.kernel_launches(jax.jit(f).lower(jnp.ones(64)).compile().as_text())

    two, five = count(2), count(5)
    assert two > 0 and five > two and (five - two) % 3 == 0


def test_compiled_kernels_counts_the_entry_points_of_the_dumped_ptx(tmp_path):
    assert launches.compiled_kernels(str(tmp_path)) is None  # XLA:CPU dumps no PTX
    (tmp_path / "module_0001.jit_step.1.ptx").write_text(
        "//\n.version 8.4\n.visible .entry loop_add_fusion(\n\t.param .u64 a\n)\n"
        ".visible .entry input_reduce_fusion_3(\n)\n.func helper()\n"
    )
    (tmp_path / "module_0001.jit_step.2.ptx").write_text(".visible .entry gemm_fusion_dot(\n)\n")
    (tmp_path / "module_0001.jit_step.2.ir-with-opt.ll").write_text(".visible .entry not_ptx(\n")
    assert launches.compiled_kernels(str(tmp_path)) == 3


def _has_cuda_plugin() -> bool:
    try:
        return importlib.util.find_spec("jax_plugins.xla_cuda12") is not None
    except ModuleNotFoundError:  # no jax_plugins package at all
        return False


@pytest.mark.skipif(
    not _has_cuda_plugin(),
    reason="compiling for a GPU target needs JAX's CUDA plugin (not installed by `make test`)",
)
def test_a_real_gpu_program_reuses_one_compiled_kernel(tmp_path):
    from bench import aot_compile

    mesh = jax.make_mesh(
        (1,),
        ("data",),
        axis_types=(jax.sharding.AxisType.Explicit,),
        devices=aot_compile.target_devices("h100"),
    )
    x = jax.ShapeDtypeStruct((8, 16, 16, 4), jnp.float32, sharding=jax.NamedSharding(mesh, jax.P()))
    w, m = jnp.ones((3, 3, 4, 4)), jnp.eye(4) * 0.5
    dims = ("NHWC", "HWIO", "NHWC")

    def f(x):
        def body(i, y):
            y = jax.lax.conv_general_dilated(y, w, (1, 1), "SAME", dimension_numbers=dims)
            for _ in range(6):  # dependent matrix products: a kernel each
                y = jnp.tanh(y @ m)
            return y

        return jax.lax.fori_loop(0, 4, body, x)

    enable_compilation_cache(False)  # a program read from the cache would not be dumped
    try:
        compiled = jax.jit(f).lower(x).compile(compiler_options={"xla_dump_to": str(tmp_path)})
    finally:
        enable_compilation_cache(True)
    hlo = compiled.as_text()
    # Each iteration launches the convolution and the six products' kernels, or more.
    assert launches.kernel_launches(hlo) >= 4 * 7
    # The six products' kernels are one compiled kernel with six launches per iteration.
    assert 0 < launches.compiled_kernels(str(tmp_path)) < launches.kernel_launches(hlo)
