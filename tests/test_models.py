import dataclasses
import importlib
import inspect

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from aig_jax.model.blocks import BatchNorm
from aig_jax.model.resnet import MODELS, build_model, num_blocks
from aig_jax.model.schedules import gated_flags, target_rates
from aig_jax.model.spec import ModelSpec
from configs import default

RNGS = {"params": jax.random.key(0), "gumbel": jax.random.key(1)}


def _param_count(tree):
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def _abstract_init(model, size):
    return jax.eval_shape(lambda: model.init(RNGS, jnp.zeros((1, size, size, 3)), train=True))


@pytest.mark.parametrize(
    ("name", "size", "expected"),
    [
        ("resnet110_cifar", 32, 1_766_630),
        ("resnet50", 224, 25_768_264),
        ("resnet101", 224, 45_040_314),
    ],
)
def test_fully_gated_parameter_counts_equal_the_reference(name, size, expected):
    assert _param_count(_abstract_init(build_model(name), size)["params"]) == expected


@pytest.mark.parametrize("name", sorted(MODELS.names()))
def test_every_registry_model_traces_with_its_block_metadata(name):
    model = build_model(name, num_classes=7)
    out = jax.eval_shape(
        lambda: model.init_with_output(RNGS, jnp.zeros((2, 32, 32, 3)), train=True)[0]
    )
    n = num_blocks(name)
    assert out.logits.shape == (2, 7) and out.gates.shape == (n, 2) and out.probs.shape == (n, 2)
    infos = model.block_infos()
    assert infos[0].name == "stage1_block0" and len(infos) == n


@pytest.mark.parametrize("name", ["resnet8_cifar", "resnet18"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_forward_runs_in_both_dtypes(name, dtype):
    model = build_model(name, num_classes=5, dtype=dtype)
    x = jax.random.normal(jax.random.key(2), (2, 32, 32, 3))
    variables = model.init(RNGS, x, train=True)
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(variables["params"]))
    (out, _) = model.apply(variables, x, train=True, rngs=RNGS, mutable=["batch_stats"])
    assert out.logits.dtype == jnp.float32 and out.gates.dtype == jnp.float32
    assert np.isfinite(np.asarray(out.logits)).all()
    assert set(np.unique(out.gates).tolist()) <= {0.0, 1.0}
    ev = model.apply(variables, x)  # evaluation: running statistics, argmax gates
    np.testing.assert_array_equal(ev.gates, (ev.probs > 0.5).astype(np.float32))


def _strip_gates(tree):
    if isinstance(tree, dict):
        return {k: _strip_gates(v) for k, v in tree.items() if k != "gate"}
    return tree


def test_open_mode_equals_the_ungated_resnet_with_the_same_weights():
    x = jax.random.normal(jax.random.key(2), (4, 16, 16, 3))
    gated = build_model("resnet14_cifar")
    plain = build_model("resnet14_cifar", gated=False)
    v = gated.init(RNGS, x, train=True)
    v["batch_stats"] = jax.tree.map(lambda a: a + 0.3, v["batch_stats"])
    out = gated.apply(v, x, gate_mode="open")
    ref = plain.apply(_strip_gates(v), x)
    np.testing.assert_array_equal(out.logits, ref.logits)
    np.testing.assert_array_equal(out.gates, 1.0)
    # Training mode (batch statistics) too.
    out_t, _ = gated.apply(v, x, train=True, gate_mode="open", mutable=["batch_stats"])
    ref_t, _ = plain.apply(_strip_gates(v), x, train=True, mutable=["batch_stats"])
    np.testing.assert_array_equal(out_t.logits, ref_t.logits)


def test_ungated_blocks_report_one_and_have_no_gate():
    rates = target_rates("resnet50_reference", 16, 0.5)
    model = build_model("resnet50", num_classes=3, gated=gated_flags(rates, "drop"))
    infos = model.block_infos()
    assert [i.gated for i in infos] == [r < 1 for r in rates]
    assert [i.index for i in infos if i.downsampling] == [0, 0, 0, 0]
    assert [n for n, i in enumerate(infos) if i.downsampling] == [0, 3, 7, 13]
    variables = _abstract_init(model, 64)
    for info in infos:
        assert ("gate" in variables["params"][info.name]) == info.gated


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="unknown model 'resnet51'"):
        build_model("resnet51")
    with pytest.raises(ValueError, match="gated has 4 entries but the model has 3 blocks"):
        build_model("resnet8_cifar", gated=[True] * 4)
    model = build_model("resnet8_cifar")
    with pytest.raises(ValueError, match=r"expected images of shape \[B, H, W, C\]"):
        model.init(RNGS, jnp.zeros((32, 32, 3)))
    v = model.init(RNGS, jnp.zeros((1, 8, 8, 3)))
    with pytest.raises(ValueError, match="needs thresholds of shape"):
        model.apply(v, jnp.zeros((1, 8, 8, 3)), gate_mode="calibrated")
    with pytest.raises(ValueError, match="unknown dtype 'fp16'"):
        build_model("resnet8_cifar", dtype="fp16")
    with pytest.raises(ValueError, match="depth must be 6n\\+2"):
        MODELS.get("resnet8_cifar").func(9)


def test_each_gate_draws_its_own_noise_from_the_gumbel_stream():
    model = build_model("resnet14_cifar")
    x = jax.random.normal(jax.random.key(2), (8, 16, 16, 3))
    variables = model.init(RNGS, x, train=True)
    # p(execute) = 1/2 in every gate: each decision is the noise's alone.
    variables["params"] = jax.tree_util.tree_map_with_path(
        lambda path, a: jnp.zeros_like(a) if "fc2" in jax.tree_util.keystr(path) else a,
        variables["params"],
    )

    def sample(key):
        out, _ = model.apply(
            variables, x, train=True, rngs={"gumbel": key}, mutable=["batch_stats"]
        )
        return np.asarray(out.gates)

    first = sample(jax.random.key(5))
    assert first.shape == (6, 8) and 0 < first.mean() < 1
    np.testing.assert_array_equal(first, sample(jax.random.key(5)))  # deterministic per key
    assert not np.array_equal(first, sample(jax.random.key(6)))
    # Gates draw independently: no two blocks decide alike on all 8 images.
    assert len({row.tobytes() for row in first}) == 6


def test_norm_partial_reaches_every_block_and_gate():
    # A fork's normalisation: BatchNorm whose scales start at 0.5 and that counts its calls.
    calls = []

    def counting_norm(*args, **kwargs):
        calls.append(kwargs["name"])
        return BatchNorm(*args, scale_init=nn.initializers.constant(0.5), **kwargs)

    model = build_model("resnet8_cifar").clone(norm=counting_norm)
    variables = model.init(RNGS, jnp.zeros((2, 8, 8, 3)))
    scales = [
        leaf
        for path, leaf in jax.tree_util.tree_leaves_with_path(variables["params"])
        if jax.tree_util.keystr(path).endswith("['scale']")
    ]
    # stem + 3 blocks × 2 + 2 projections + 3 gates
    assert len(scales) == 1 + 6 + 2 + 3 and all(np.all(np.asarray(s) == 0.5) for s in scales)
    assert calls.count("fc1bn") == 3 and calls.count("shortcut_bn") == 2
    # Training statistics are the norm's: the running averages move, evaluation reads them.
    x = jax.random.normal(jax.random.key(3), (4, 8, 8, 3))
    _, updates = model.apply(variables, x, train=True, rngs=RNGS, mutable=["batch_stats"])
    moved = jax.tree.map(
        lambda a, b: float(jnp.max(jnp.abs(a - b))),
        updates["batch_stats"],
        variables["batch_stats"],
    )
    assert min(jax.tree.leaves(moved)) > 0


def test_a_group_norm_model_needs_no_running_statistics():
    def group_norm(*, use_running_average, dtype, name, **kwargs):
        del use_running_average  # GroupNorm has no running statistics
        return nn.GroupNorm(num_groups=None, group_size=1, dtype=dtype, name=name, **kwargs)

    model = build_model("resnet8_cifar", num_classes=4).clone(norm=group_norm)
    x = jax.random.normal(jax.random.key(3), (2, 8, 8, 3))
    variables = model.init(RNGS, x)
    assert "batch_stats" not in variables
    out = model.apply(variables, x, train=True, rngs=RNGS)
    assert out.logits.shape == (2, 4) and np.isfinite(np.asarray(out.logits)).all()


def test_bfloat16_compute_keeps_gates_and_logits_in_float32():
    model = build_model("resnet8_cifar", dtype="bfloat16")
    x = jax.random.normal(jax.random.key(3), (2, 8, 8, 3))
    variables = model.init(RNGS, x)
    _, state = model.apply(variables, x, capture_intermediates=True)
    dtypes = {
        jax.tree_util.keystr(path): leaf.dtype
        for path, leaf in jax.tree_util.tree_leaves_with_path(state["intermediates"])
    }
    convs = [d for k, d in dtypes.items() if "conv" in k]
    gates = [d for k, d in dtypes.items() if "'gate'" in k and "fc" in k]
    assert convs and all(d == jnp.bfloat16 for d in convs)
    assert gates and all(d == jnp.float32 for d in gates)


@pytest.mark.parametrize(
    ("config", "keep", "drop"),
    [
        ("imagenet_resnet50_aig", 25_768_264, 25_701_212),
        ("imagenet_resnet101_aig", 45_040_314, 44_993_578),
    ],
)
def test_rate_one_blocks_keep_their_gates_by_default_as_in_the_reference(config, keep, drop):
    module = importlib.import_module(f"configs.{config}")
    spec = ModelSpec.from_config(module.get_config())
    assert spec.gate_rate_one_blocks == "keep" and spec.init == "reference"
    assert all(spec.gated) and 1.0 in spec.rates
    assert _param_count(_abstract_init(spec.build(), 64)["params"]) == keep
    dropped = dataclasses.replace(spec, gate_rate_one_blocks="drop")
    assert dropped.gated == gated_flags(spec.rates, "drop")
    assert _param_count(_abstract_init(dropped.build(), 64)["params"]) == drop
    assert ModelSpec.from_json(spec.to_json()) == spec


def test_a_spec_written_before_init_and_layout_existed_loads_as_before():
    data = ModelSpec("resnet50", 1000, target_rates("resnet50_reference", 16, 0.5)).to_json()
    del data["init"], data["gate_rate_one_blocks"]
    old = ModelSpec.from_json(data)
    assert (old.init, old.gate_rate_one_blocks) == ("he_normal", "drop")
    assert old.gated == gated_flags(old.rates, "drop") and not all(old.gated)


def test_spec_build_model_and_the_configs_share_their_defaults():
    config = default.get_config()
    spec = ModelSpec.from_config(config)
    assert ModelSpec(spec.name, spec.num_classes, spec.rates) == spec
    assert inspect.signature(build_model).parameters["init"].default == spec.init == "reference"
    # Chosen where the model is built: a CIFAR model's BatchNorm γ starts U(0, 1), as the
    # reference's (He-normal would start it at 1), and the gates' with it.
    variables = build_model("resnet8_cifar").init(RNGS, jnp.zeros((1, 8, 8, 3)))["params"]
    for scale in (variables["bn1"]["scale"], variables["stage1_block0"]["gate"]["fc1bn"]["scale"]):
        assert 0 <= scale.min() and scale.max() <= 1 and scale.std() > 0.1
