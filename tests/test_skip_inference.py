"""The skipping inference paths give the masked model's outputs, batch 1 and batch > 1."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from aig_jax.eval.step import make_eval_step
from aig_jax.inference import skipping
from aig_jax.inference.skipping import BRANCHES, make_fast_eval_step
from aig_jax.model.blocks import Bottleneck, Conv
from aig_jax.model.resnet import ResNet, build_model
from aig_jax.sharding import make_mesh, shard_batch


def _cifar():
    return build_model("resnet8_cifar", num_classes=5), 16


def _bottleneck():
    # Two stages (the second strided); the last block is ungated.
    model = ResNet(
        stage_sizes=(2, 1),
        block_cls=Bottleneck,
        widths=(4, 8),
        stem="imagenet",
        num_classes=5,
        gated=(True, True, False),
    )
    return model, 16


def _variables(model, size):
    """Random variables of ``model``'s shapes (no compiled init): He-scaled kernels, random
    BatchNorm statistics and affine parameters, and gates whose p(execute) differs between
    images."""
    shapes = jax.eval_shape(
        lambda: model.init({"params": jax.random.key(0)}, jnp.zeros((1, size, size, 3)))
    )
    rng = np.random.default_rng(0)

    def fill(path, leaf):
        name = jax.tree_util.keystr(path)
        if "kernel" in name:
            value = rng.normal(size=leaf.shape) / np.sqrt(np.prod(leaf.shape[:-1]))
        elif "'var'" in name or "'scale'" in name:
            value = rng.uniform(0.5, 1.5, size=leaf.shape)
        else:
            value = 0.1 * rng.normal(size=leaf.shape)
        return jnp.asarray(value, leaf.dtype)

    return jax.tree_util.tree_map_with_path(fill, shapes)


def _setting(model, variables, x, mode):
    """Thresholds for ``mode``: batch 1 alternates execute/skip by block; larger batches split
    each block's images at the median p(execute), so that some images execute and some skip."""
    n = len(model.block_infos())
    if mode == "argmax":
        return jnp.full((n,), 0.5)
    if x.shape[0] == 1:
        return jnp.asarray([0.0, 1.0] * (n // 2) + [0.0] * (n % 2))
    probs = jax.jit(lambda v, x: model.apply(v, x, gate_mode="open").probs)(variables, x)
    return jnp.median(probs, axis=1)


# Every setting for "cond"; "pallas" (slow to compile in interpret mode) where images of one
# batch disagree (calibrated) and once with argmax.
SETTINGS = [
    *(
        (make, batch, mode, "cond")
        for make in (_cifar, _bottleneck)
        for batch in (1, 4)
        for mode in ("argmax", "calibrated")
    ),
    *((make, batch, "calibrated", "pallas") for make in (_cifar, _bottleneck) for batch in (1, 4)),
    (_cifar, 4, "argmax", "pallas"),
]


def _apply(model, path):
    def run(v, x, t, mode):
        return model.apply(v, x, gate_mode=mode, thresholds=t, gated_branch=BRANCHES[path])

    return jax.jit(run, static_argnums=3)


@pytest.mark.parametrize(("make", "batch", "mode", "path"), SETTINGS)
def test_skipping_branches_equal_the_masked_model(make, batch, mode, path):
    model, size = make()
    variables = _variables(model, size)
    x = jax.random.normal(jax.random.key(batch), (batch, size, size, 3))
    thresholds = _setting(model, variables, x, mode)
    ref = _apply(model, "masked")(variables, x, thresholds, mode)
    out = _apply(model, path)(variables, x, thresholds, mode)
    np.testing.assert_array_equal(out.gates, ref.gates)
    np.testing.assert_allclose(out.probs, ref.probs, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(out.logits, ref.logits, rtol=1e-4, atol=1e-4)
    gated = np.asarray(ref.gates)[[i.gated for i in model.block_infos()]]
    if mode == "calibrated":  # the comparison covered both skipped and executed branches
        assert 0 < gated.mean() < 1


def test_pallas_path_with_row_and_channel_tiles_equals_the_masked_model(monkeypatch):
    # Cut every branch convolution into one-row tiles with half the channels per block.
    monkeypatch.setattr(skipping, "WHOLE_IMAGE_TILE", 0)
    monkeypatch.setattr(
        skipping,
        "tile_sizes",
        lambda h, w, c_in, c_out: {"rows": 1, "cout_block": c_out // 2, "cin_block": c_in // 2},
    )
    test_skipping_branches_equal_the_masked_model(_bottleneck, 4, "calibrated", "pallas")


def _primitives(jaxpr):
    for eqn in jaxpr.eqns:
        yield eqn.primitive.name, eqn
        for value in eqn.params.values():
            for sub in value if isinstance(value, tuple | list) else [value]:
                inner = getattr(sub, "jaxpr", None)
                if inner is not None:
                    yield from _primitives(getattr(inner, "jaxpr", inner))


def test_cond_path_puts_each_gated_branch_behind_its_decision():
    model, size = _cifar()  # 3 gated blocks
    variables = _variables(model, size)
    x = jnp.zeros((1, size, size, 3))
    thresholds = jnp.full((3,), 0.5)
    jaxpr = jax.make_jaxpr(
        lambda v: model.apply(v, x, thresholds=thresholds, gated_branch=BRANCHES["cond"])
    )(variables).jaxpr
    top = [e.primitive.name for e in jaxpr.eqns]
    conds = [e for e in jaxpr.eqns if e.primitive.name == "cond"]
    assert len(conds) == 3
    # Only the shortcut projections and the stem convolve outside the conds; each cond's
    # executing branch holds its block's two convolutions, its skipping branch none.
    assert top.count("conv_general_dilated") == 1 + 2
    for cond in conds:
        skip, run = cond.params["branches"]
        assert [n for n, _ in _primitives(run.jaxpr)].count("conv_general_dilated") == 2
        assert "conv_general_dilated" not in [n for n, _ in _primitives(skip.jaxpr)]


def test_pallas_path_refuses_a_convolution_it_cannot_compute():
    model, size = _cifar()
    biased = model.clone(conv=functools.partial(Conv, use_bias=True))
    variables = _variables(biased, size)
    x = jnp.zeros((1, size, size, 3))
    with pytest.raises(ValueError, match=r"Pallas path.*conv1"):
        biased.apply(variables, x, gated_branch=BRANCHES["pallas"])


def _batch(x):
    n = x.shape[0]
    return {
        "image": np.asarray(x),
        "label": np.arange(n, dtype=np.int32) % 5,
        "mask": np.ones(n, bool),
        "index": np.arange(n, dtype=np.int32),
    }


@pytest.mark.parametrize(
    ("make", "batch", "devices", "path"),
    [(_cifar, 1, 1, "auto"), (_cifar, 4, 2, "pallas"), (_bottleneck, 4, 2, "auto")],
)
def test_fast_eval_step_is_a_drop_in_for_the_eval_step(make, batch, devices, path):
    model, size = make()
    variables = _variables(model, size)
    x = jax.random.normal(jax.random.key(7), (batch, size, size, 3))
    thresholds = _setting(model, variables, x, "calibrated")
    mesh = make_mesh(devices)
    data = shard_batch(_batch(x), mesh)
    key = jax.random.key(3)
    ref = make_eval_step(model, mesh)(variables, data, key, "calibrated", thresholds)
    out = make_fast_eval_step(model, mesh, path=path)(
        variables, data, key, "calibrated", thresholds
    )
    assert out.keys() == ref.keys()
    for name in ("top", "gates", "label", "mask", "index"):
        np.testing.assert_array_equal(out[name], ref[name], err_msg=name)
    for name in ("confidence", "loss", "probs"):
        np.testing.assert_allclose(out[name], ref[name], rtol=1e-4, atol=1e-5, err_msg=name)
    assert out["gates"].sharding.is_fully_replicated


def test_fast_eval_step_samples_like_the_masked_model():
    model, size = _cifar()
    variables = _variables(model, size)
    mesh = make_mesh(1)
    data = shard_batch(_batch(jax.random.normal(jax.random.key(4), (2, size, size, 3))), mesh)
    thresholds = jnp.full((3,), 0.5)
    args = (variables, data, jax.random.key(5), "sample", thresholds)
    ref, out = make_eval_step(model, mesh)(*args), make_fast_eval_step(model, mesh)(*args)
    np.testing.assert_array_equal(out["gates"], ref["gates"])
    np.testing.assert_array_equal(out["loss"], ref["loss"])


def test_errors_name_the_bad_value():
    model, _ = _cifar()
    with pytest.raises(ValueError, match="'fast'"):
        make_fast_eval_step(model, make_mesh(1), path="fast")


def test_auto_path_uses_pallas_only_where_it_was_verified(monkeypatch):
    assert skipping.choose_path(1, 224) == "cond"
    assert skipping.choose_path(64, 32) == "cond"  # CPU: Pallas would only interpret
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert skipping.choose_path(64, 32) == "pallas"
    assert skipping.choose_path(64, 224) == "masked"
    assert skipping.choose_path(1, 224) == "cond"
