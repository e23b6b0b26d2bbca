import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from aig_jax.blocks import Bottleneck
from aig_jax.losses import total_loss
from aig_jax.models import MODELS, ResNet, build_model, num_blocks, stack_rows
from aig_jax.schedules import gated_flags, target_rates

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
    model = build_model("resnet50", num_classes=3, gated=gated_flags(rates))
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


def _max_diff(a, b):
    return max(jax.tree.leaves(jax.tree.map(lambda p, q: float(jnp.max(jnp.abs(p - q))), a, b)))


def _small_bottleneck_resnet(**kwargs):
    # Bottleneck blocks, with gated and ungated blocks interleaved inside a stage.
    gated = (True, False, True, True, False, True, True, False, False)  # stages of 4 and 5
    return ResNet(
        stage_sizes=(4, 5),
        block_cls=Bottleneck,
        widths=(4, 8),
        stem="imagenet",
        num_classes=5,
        gated=gated,
        **kwargs,
    )


@pytest.mark.parametrize(
    ("make", "size"),
    [
        (lambda **kw: build_model("resnet14_cifar", num_classes=5, **kw), 16),
        (_small_bottleneck_resnet, 32),
    ],
    ids=["cifar", "bottleneck"],
)
def test_scanned_blocks_equal_the_unrolled_model(make, size):
    model, scanned = make(), make(scan_blocks=True)
    x = jax.random.normal(jax.random.key(2), (4, size, size, 3))
    variables, scanned_init = (
        jax.jit(lambda net=net: net.init(RNGS, x, train=True))() for net in (model, scanned)
    )
    # Same initial variables: scanning does not change the parameter layout.
    assert _max_diff(variables, scanned_init) == 0
    # Blocks alternately execute (threshold 0) and skip (2): each scanned step must use its own.
    n = len(model.block_infos())
    thresholds = jnp.asarray([0.0, 2.0] * (n // 2) + [0.0] * (n % 2))

    def infer(v, net):
        return net.apply(v, x, gate_mode="calibrated", thresholds=thresholds)

    a, b = (jax.jit(infer, static_argnums=1)(variables, net) for net in (model, scanned))
    np.testing.assert_allclose(a.logits, b.logits, atol=1e-5)
    np.testing.assert_array_equal(a.gates, b.gates)
    assert 0 < float(jnp.mean(a.gates)) < 1
    np.testing.assert_allclose(a.probs, b.probs, atol=1e-6)

    def loss(params, net):
        out, updates = net.apply(
            {**variables, "params": params},
            x,
            train=True,
            gate_mode="calibrated",
            thresholds=thresholds,
            mutable=["batch_stats"],
        )
        return jnp.sum(out.logits**2), (out.gates, updates["batch_stats"])

    grad = jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=1)
    (la, (gates_a, stats_a)), ga = grad(variables["params"], model)
    (lb, (gates_b, stats_b)), gb = grad(variables["params"], scanned)
    np.testing.assert_allclose(la, lb, rtol=1e-5)
    np.testing.assert_array_equal(gates_a, gates_b)
    # Every block's running statistics come back to its own subtree, updated.
    assert jax.tree.structure(stats_a) == jax.tree.structure(stats_b)
    assert _max_diff(stats_a, stats_b) < 1e-4
    assert _max_diff(stats_a, variables["batch_stats"]) > 1e-3
    assert _max_diff(ga, gb) < 1e-4 * max(1.0, float(la))


def test_scanned_sampled_gates_equal_the_unrolled_model_and_follow_the_key():
    model, scanned = (build_model("resnet14_cifar", scan_blocks=s) for s in (False, True))
    x = jax.random.normal(jax.random.key(2), (8, 16, 16, 3))
    variables = model.init(RNGS, x, train=True)
    # p(execute) = 1/2 in every gate: each decision is the noise's alone.
    variables["params"] = jax.tree_util.tree_map_with_path(
        lambda path, a: jnp.zeros_like(a) if "fc2" in jax.tree_util.keystr(path) else a,
        variables["params"],
    )

    def sample(net, key):
        out, _ = net.apply(variables, x, train=True, rngs={"gumbel": key}, mutable=["batch_stats"])
        return out

    first = sample(scanned, jax.random.key(5))
    unrolled = sample(model, jax.random.key(5))
    # One draw of noise for all gates: block i gets slice i, scanned or not.
    np.testing.assert_array_equal(first.gates, unrolled.gates)
    np.testing.assert_allclose(first.logits, unrolled.logits, atol=1e-5)
    assert first.gates.shape == (6, 8) and 0 < float(jnp.mean(first.gates)) < 1
    np.testing.assert_array_equal(first.gates, sample(scanned, jax.random.key(5)).gates)
    assert not np.array_equal(first.gates, sample(scanned, jax.random.key(6)).gates)


def _eqns(jaxpr):
    """Every equation of ``jaxpr`` and of the jaxprs nested in its equations."""
    for eqn in jaxpr.eqns:
        yield eqn
        for value in eqn.params.values():
            for sub in value if isinstance(value, tuple | list) else [value]:
                if isinstance(sub, jax.extend.core.ClosedJaxpr):
                    yield from _eqns(sub.jaxpr)
                elif isinstance(sub, jax.extend.core.Jaxpr):
                    yield from _eqns(sub)


@pytest.mark.parametrize("scan", [False, True])
def test_gates_index_their_layer_rows_at_indices_unknown_to_the_compiler(scan):
    # A row of the stacked [L, ...] noise, thresholds or gate gradients read at a constant
    # index makes each gate's fused kernels differ by that offset: XLA then compiles them once
    # per gate (AIG-ResNet-110 for an H100: 443 kernels instead of 209).
    model = build_model("resnet14_cifar", scan_blocks=scan)
    blocks = model.num_blocks  # 6: no other axis of the arrays below has that length
    x = jnp.zeros((3, 8, 8, 3))
    variables = model.init(RNGS, x, train=True)

    def loss(params):
        out, _ = model.apply(
            {**variables, "params": params}, x, train=True, rngs=RNGS, mutable=["batch_stats"]
        )
        return total_loss(
            out.logits, jnp.zeros(3, jnp.int32), out.gates, jnp.full(blocks, 0.5), target_weight=1
        )[0]

    jaxpr = jax.make_jaxpr(jax.grad(loss))(variables["params"]).jaxpr
    per_layer = [
        e
        for e in _eqns(jaxpr)
        if e.invars and getattr(e.invars[0].aval, "shape", ())[:1] == (blocks,)
    ]
    static = [e.primitive.name for e in per_layer if e.primitive.name in ("slice", "split")]
    assert not static, f"layer rows sliced at constant offsets: {static}"
    reads = [e for e in per_layer if e.primitive.name == "dynamic_slice"]
    assert len(reads) >= 3 * (2 if scan else blocks)  # noise, thresholds and gradients
    assert not any(isinstance(e.invars[1], jax.extend.core.Literal) for e in reads)


def test_stacked_gate_rows_have_the_gradient_of_their_concatenation():
    parts = [jax.random.normal(jax.random.key(i), (n, 4)) for i, n in enumerate((1, 3, 2))]
    weights = jax.random.normal(jax.random.key(9), (6, 4))
    starts = tuple(jnp.int32(s) for s in (0, 1, 4))
    stacked = stack_rows(parts, starts)
    np.testing.assert_array_equal(stacked, jnp.concatenate(parts))
    grads = jax.grad(lambda p: jnp.sum(weights * stack_rows(p, starts)))(parts)
    for grad, rows in zip(grads, (weights[:1], weights[1:4], weights[4:]), strict=True):
        np.testing.assert_array_equal(grad, rows)
