"""bench/kernel_profile.py: which instruction each recorded kernel ran, and for how long."""

import os
import sys

import jax
import jax.numpy as jnp
import pytest
from jax.profiler import ProfileData

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))

import kernel_profile  # noqa: E402  (bench/ is not a package)

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
    names = kernel_profile.op_names(HLO)
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
    instructions = kernel_profile.op_names(HLO).keys()
    got = kernel_profile.op_durations(profile, "jit_step", instructions)
    assert got == [
        ("fusion.1", pytest.approx(2e-6)),
        ("input_reduce_fusion.7", pytest.approx(5e-6)),
        ("command_buffer_3", pytest.approx(7e-6)),
    ]
    assert len(kernel_profile.op_durations(profile, None, instructions)) == 4


def test_profile_step_sums_a_cpu_program_per_step():
    @jax.jit
    def step(x):
        return jnp.tanh(x @ x) * 2.0

    x = jnp.ones((64, 64))
    compiled = step.lower(x).compile()
    jax.block_until_ready(compiled(x))
    result = kernel_profile.profile_step(lambda: compiled(x), compiled.as_text(), steps=2)
    assert result["ops"] >= 1 and result["op_ms"] > 0
    assert result["gate_op_ms"] == 0  # no gate module in this program
    assert 1 <= len(result["top"]) <= 10
    assert sum(row[2] for row in result["top"]) == pytest.approx(result["op_ms"])
