"""bench/launches.py: kernels counted in compiled HLO, and the host's launches read from the thunk
sequence that XLA:GPU dumps (hand-written dumps in XLA's format with counts worked out by hand; a
real GPU program where JAX's CUDA plugin is installed)."""

import importlib.util
import os

import jax
import jax.numpy as jnp
import pytest

from aig_jax.compilation_cache import enable_compilation_cache
from bench import launches
from bench.launches import Launches

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


# A graph of 2 kernels; a convolution; a 3-trip loop (thunk 4, HLO while.7) whose condition is one
# kernel outside graphs and whose body is a convolution, a graph of 2 kernels and a dynamic-slice
# fusion (one launch; its copy is how it runs); a library call and the done half of an async
# copy (it launches nothing); a graph holding a 2-trip loop (thunk 14, while.9; condition 1
# kernel, body 2).
THUNKS = """\
000: kCommandBuffer [source       | next=003 (1)]
    001: kCustomKernel [source       | next=002 (1)] loop_add_fusion
    002: kCopy         [prev=001 (1) | sink        ] kCopy
003: kConvolution   [prev=000 (1) | next=004 (1)] kConvolution
004: kWhile         [prev=003 (1) | next=011 (1)]
condition:
    005: kCustomKernel [source | sink] loop_compare_fusion
  body:
    006: kConvolution        [source        | next=000 (1) ] kConvolution
    000: kCommandBuffer      [prev=006 (1)  | next=009 (1) ]
        007: kCustomKernel [source       | next=008 (1)] input_reduce_fusion
        008: kCustomKernel [prev=007 (1) | sink        ] loop_multiply_fusion
    009: kDynamicSliceFusion [prev=000 (1)  | sink         ] params=1, results=1
        010: kCopy [source | sink] kCopy
011: kCustomCall    [prev=004 (1) | next=012 (1)] kCustomCall
012: kCopyDone      [prev=011 (1) | next=000 (1)] kCopyDone
000: kCommandBuffer [prev=012 (1) | sink        ]
    014: kWhile        [source       | sink        ]
    condition:
        015: kCustomKernel [source | sink] loop_compare_fusion
      body:
        016: kCustomKernel [source       | next=017 (1)] loop_add_fusion
        017: kCustomKernel [prev=016 (1) | sink        ] loop_add_fusion
"""

METADATA = """\
thunk_metadata {
  thunk_info {
    profile_annotation: "command_buffer_1"
  }
  thunk_kind: "kCommandBuffer"
}
thunk_metadata {
  thunk_info {
    profile_annotation: "while.7"
    thunk_id: 4
  }
  thunk_kind: "kWhile"
}
thunk_metadata {
  thunk_info {
    profile_annotation: "while.9"
    thunk_id: 14
  }
  thunk_kind: "kWhile"
}
"""

LOOPS_HLO = """
ENTRY %main (t: (s32[])) -> (s32[]) {
  %t = (s32[]) parameter(0)
  %while.7 = (s32[]) while(%t), condition=%c, body=%b, backend_config=THREE
  ROOT %while.9 = (s32[]) while(%while.7), condition=%c, body=%b, backend_config=TWO
}
""".replace("THREE", '{"known_trip_count":{"n":"3"}}').replace(
    "TWO", '{"known_trip_count":{"n":"2"}}'
)

# graphs: 1 + 3 (the loop's) + 1; other: 1 + 3 × 3 + 1 (the exit test) + 1;
# in graphs: 2 + 3 × 2 + (2 × (2 + 1) + 1)
EXPECTED = Launches(graphs=5, other=12, graph_kernels=15)


def test_the_parsed_tree_nests_graphs_loops_and_fused_thunks():
    top = launches.parse_thunks(THUNKS)
    assert [(t.kind, t.id) for t in top] == [
        ("kCommandBuffer", 0),
        ("kConvolution", 3),
        ("kWhile", 4),
        ("kCustomCall", 11),
        ("kCopyDone", 12),
        ("kCommandBuffer", 0),
    ]
    assert [t.id for t in top[0].children] == [1, 2]
    loop = top[2]
    assert set(loop.sections) == {"condition", "body"} and not loop.children
    assert [t.id for t in loop.sections["condition"]] == [5]
    assert [t.kind for t in loop.sections["body"]] == [
        "kConvolution",
        "kCommandBuffer",
        "kDynamicSliceFusion",
    ]
    assert [t.id for t in loop.sections["body"][1].children] == [7, 8]
    assert [t.id for t in loop.sections["body"][2].children] == [10]
    inner = top[5].children[0]
    assert inner.kind == "kWhile" and [t.id for t in inner.sections["body"]] == [16, 17]


def test_launches_of_a_hand_written_thunk_sequence():
    assert launches.thunk_names(METADATA) == {4: "while.7", 14: "while.9"}
    assert launches.trip_counts(LOOPS_HLO) == {"while.7": 3, "while.9": 2}
    got = launches.thunk_launches(launches.parse_thunks(THUNKS), {4: 3, 14: 2})
    assert got == EXPECTED
    # Unknown trip counts count each loop once: 1 + 1 + 1 graphs; 1 + (3 + 1) + 1 other;
    # 2 + 2 + (2 + 1 + 1) in graphs.
    assert launches.thunk_launches(launches.parse_thunks(THUNKS), {}) == Launches(3, 6, 8)


def test_dumped_launches_reads_a_dump_folder(tmp_path):
    assert launches.dumped_launches(str(tmp_path), LOOPS_HLO) is None  # XLA:CPU dumps none
    # No thunk pass changed the program: its thunk sequence as emitted is what runs.
    before = tmp_path / "module_0001.jit_step.thunk_sequence.txt"
    before.write_text("003: kConvolution   [source | sink] kConvolution\n")
    assert launches.dumped_launches(str(tmp_path), LOOPS_HLO) == Launches(other=1)
    # After the passes: without the metadata no loop is matched to its trip count.
    (tmp_path / "module_0001.jit_step.thunk_sequence_after_thunk_passes.txt").write_text(THUNKS)
    assert launches.dumped_launches(str(tmp_path), LOOPS_HLO) == Launches(3, 6, 8)
    (tmp_path / "module_0001.jit_step.thunk_metadata.txt").write_text(METADATA)
    assert launches.dumped_launches(str(tmp_path), LOOPS_HLO) == EXPECTED
    (tmp_path / "module_0002.jit_g.thunk_sequence_after_thunk_passes.txt").write_text(THUNKS)
    with pytest.raises(ValueError, match="several programs"):
        launches.dumped_launches(str(tmp_path), LOOPS_HLO)


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
def test_a_real_gpu_program_launches_every_kernel_once(tmp_path):
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
            for _ in range(6):  # dependent matrix products: a kernel each, in one graph
                y = jnp.tanh(y @ m)
            return y

        return jax.lax.fori_loop(0, 4, body, x)

    enable_compilation_cache(False)  # a program read from the cache would not be dumped
    try:
        compiled = jax.jit(f).lower(x).compile(compiler_options={"xla_dump_to": str(tmp_path)})
    finally:
        enable_compilation_cache(True)
    hlo = compiled.as_text()
    got = launches.dumped_launches(str(tmp_path), hlo)
    # The convolution ends each iteration's graph: one graph launch per iteration.
    assert got is not None and got.graphs == 4 and got.graph_kernels % 4 == 0
    # Every kernel the HLO launches runs either inside a graph or on its own.
    assert got.graph_kernels + got.other == launches.kernel_launches(hlo)
    # The six products' kernels are one compiled kernel with six launches per iteration.
    assert 0 < launches.compiled_kernels(str(tmp_path)) < launches.kernel_launches(hlo)
