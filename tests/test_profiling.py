"""bench/profiling.py: which instruction each recorded kernel ran and for how long, and which
compiler phases a compilation spent its time in."""

import os

import jax
import jax.numpy as jnp
import pytest
from jax.profiler import ProfileData

from aig_jax.compilation_cache import enable_compilation_cache
from bench import profiling

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


HLO = """HloModule jit_step, is_scheduled=true

%fused_computation (p: f32[4]) -> f32[4] {
  %p = f32[4]{0} parameter(0)
  ROOT %neg.1 = f32[4]{0} negate(%p), metadata={op_name="jit(step)/net/neg"}
}

ENTRY %main (a: f32[4]) -> f32[4] {
  %a = f32[4]{0} parameter(0), metadata={op_name="a"}
  %fusion.1 = f32[4]{0} fusion(%a), kind=kLoop, calls=%fused_computation, metadata={op_name="jit(step)/net/block0/gate/neg"}
  %input_reduce_fusion.7 = f32[4]{0} fusion(%fusion.1), kind=kInput, calls=%fused_computation, metadata={op_name="jit(step)/net/block0/conv/neg"}
  ROOT %cudnn-conv.2 = f32[4]{0} custom-call(%input_reduce_fusion.7), custom_call_target="__cudnn$convForward", window={size=1}, metadata={op_name="jit(step)/net/block1/conv/conv_general_dilated" stack_frame_id=3}
}
"""  # noqa: E501  (HLO instructions are long lines)


def _event(name: int, op: str, module: str, duration_us: int) -> str:
    return (
        f"events {{ metadata_id: {name} duration_ps: {duration_us * 10**6} "
        f'stats {{ metadata_id: 1 str_value: "{op}" }} '
        f'stats {{ metadata_id: 2 str_value: "{module}" }} }}'
    )


def _profile(events: list[str]) -> ProfileData:
    names = ["loop_fusion_1", "input_reduce_fusion_7", "sm90_xmma_fprop", "other_kernel"]
    metadata = " ".join(
        f'event_metadata {{ key: {i} value {{ id: {i} name: "{n}" }} }}'
        for i, n in enumerate(names, start=1)
    )
    return ProfileData.from_text_proto(
        f'planes {{ name: "/device:GPU:0" lines {{ name: "Stream #1" {" ".join(events)} }} '
        f"{metadata} "
        'stat_metadata { key: 1 value { id: 1 name: "hlo_op" } } '
        'stat_metadata { key: 2 value { id: 2 name: "hlo_module" } } }'
    )


def test_op_names_reads_the_name_stack_of_each_instruction():
    names = profiling.op_names(HLO)
    assert names["fusion.1"] == "jit(step)/net/block0/gate/neg"
    assert names["input_reduce_fusion.7"] == "jit(step)/net/block0/conv/neg"
    assert names["cudnn-conv.2"] == "jit(step)/net/block1/conv/conv_general_dilated"
    assert names["neg.1"] == "jit(step)/net/neg"  # inside a fusion: named, never recorded
    assert "a" in names and "main" not in names


def test_op_durations_names_kernels_launched_from_command_buffers():
    profile = _profile(
        [
            _event(1, "fusion.1", "jit_step", 2),
            _event(2, "command_buffer_3", "jit_step", 5),  # a fusion's kernel in a graph
            _event(3, "command_buffer_3", "jit_step", 7),  # a library kernel in a graph
            _event(4, "fusion.1", "jit_other", 11),  # another program
        ]
    )
    instructions = profiling.op_names(HLO).keys()
    got = profiling.op_durations(profile, "jit_step", instructions)
    assert got == [
        ("fusion.1", pytest.approx(2e-6)),
        ("input_reduce_fusion.7", pytest.approx(5e-6)),
        ("command_buffer_3", pytest.approx(7e-6)),
    ]
    assert len(profiling.op_durations(profile, None, instructions)) == 4


def test_profile_step_sums_a_cpu_program_per_step():
    @jax.jit
    def step(x):
        return jnp.tanh(x @ x) * 2.0

    x = jnp.ones((64, 64))
    compiled = step.lower(x).compile()
    jax.block_until_ready(compiled(x))
    result = profiling.profile_step(lambda: compiled(x), compiled.as_text(), steps=2)
    assert result["ops"] >= 1 and result["op_ms"] > 0
    assert result["gate_op_ms"] == 0  # no gate module in this program
    assert 1 <= len(result["top"]) <= 10
    assert sum(row[2] for row in result["top"]) == pytest.approx(result["op_ms"])


def _host_event(name: int, start_us: int, duration_us: int) -> str:
    return (
        f"events {{ metadata_id: {name} offset_ps: {start_us * 10**6} "
        f"duration_ps: {duration_us * 10**6} }}"
    )


def test_compile_phases_count_nested_events_of_one_name_once():
    names = ["compile", "fusion", "$stages.py:586 compile", "codegen"]
    metadata = " ".join(
        f'event_metadata {{ key: {i} value {{ id: {i} name: "{n}" }} }}'
        for i, n in enumerate(names, start=1)
    )
    thread_a = [
        _host_event(1, 0, 100),  # compile [0, 100)
        _host_event(2, 10, 30),  # fusion inside it
        _host_event(1, 50, 20),  # compile nested in compile: counted, its time not again
        _host_event(3, 0, 120),  # a Python function: left out
    ]
    thread_b = [_host_event(2, 0, 5), _host_event(4, 5, 1), _host_event(2, 40, 5)]
    profile = ProfileData.from_text_proto(
        'planes { name: "/host:CPU" '
        f'lines {{ name: "a" timestamp_ns: 1000 {" ".join(thread_a)} }} '
        f'lines {{ name: "b" timestamp_ns: 2000 {" ".join(thread_b)} }} {metadata} }}'
    )
    phases = profiling.compile_phases(profile)
    assert [row[0] for row in phases] == ["compile", "fusion", "codegen"]
    assert phases[0][1:] == [pytest.approx(100e-6), 2]
    assert phases[1][1:] == [pytest.approx(40e-6), 3]
    assert phases[2][1:] == [pytest.approx(1e-6), 1]
    assert profiling.compile_phases(profile, top=1) == phases[:1]


def test_profile_compile_returns_a_working_executable_and_the_phases():
    @jax.jit
    def step(x):
        return jnp.tanh(x @ x) * 2.0

    x = jnp.ones((32, 32))
    enable_compilation_cache(False)  # a real compile, not a read from the tests' cache
    try:
        compiled, info = profiling.profile_compile(step.lower(x), top=5)
    finally:
        enable_compilation_cache(True)
    assert jnp.array_equal(compiled(x), step(x))
    assert info["compile_s"] > 0 and len(info["phases"]) == 5
    seconds = [row[1] for row in info["phases"]]
    assert seconds == sorted(seconds, reverse=True) and seconds[-1] > 0
    assert not any(row[0].startswith("$") for row in info["phases"])
