"""The skipping inference paths give the masked model's outputs, batch 1 and batch > 1."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from aig_jax import skip_inference
from aig_jax.blocks import Bottleneck
from aig_jax.models import ResNet, build_model
from aig_jax.sharding import make_mesh, shard_batch
from aig_jax.skip_inference import fold_conv_bn, fold_variables, make_fast_eval_step, skip_forward
from aig_jax.steps import make_eval_step


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


@pytest.mark.parametrize(("make", "batch", "mode", "path"), SETTINGS)
def test_skip_forward_equals_the_masked_model(make, batch, mode, path):
    model, size = make()
    variables = _variables(model, size)
    x = jax.random.normal(jax.random.key(batch), (batch, size, size, 3))
    thresholds = _setting(model, variables, x, mode)
    ref = jax.jit(lambda v, x, t: model.apply(v, x, gate_mode=mode, thresholds=t))(
        variables, x, thresholds
    )
    fast = jax.jit(
        lambda v, x, t: skip_forward(
            model, fold_variables(model, v), x, gate_mode=mode, thresholds=t, path=path
        )
    )
    out = fast(variables, x, thresholds)
    np.testing.assert_array_equal(out.gates, ref.gates)
    np.testing.assert_allclose(out.probs, ref.probs, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(out.logits, ref.logits, rtol=1e-4, atol=1e-4)
    gated = np.asarray(ref.gates)[[i.gated for i in model.block_infos()]]
    if mode == "calibrated":  # the comparison covered both skipped and executed branches
        assert 0 < gated.mean() < 1


def test_pallas_path_with_row_and_channel_tiles_equals_the_masked_model(monkeypatch):
    # Cut every branch convolution into one-row tiles with half the channels per block.
    monkeypatch.setattr(skip_inference, "WHOLE_IMAGE_TILE", 0)
    monkeypatch.setattr(
        skip_inference,
        "tile_sizes",
        lambda h, w, c_in, c_out: {"rows": 1, "cout_block": c_out // 2, "cin_block": c_in // 2},
    )
    test_skip_forward_equals_the_masked_model(_bottleneck, 4, "calibrated", "pallas")


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


def test_fold_conv_bn_matches_the_batch_norm_formula():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 5, 5, 3)).astype(np.float32)
    kernel = rng.normal(size=(3, 3, 3, 4)).astype(np.float32)
    gamma, beta, mean = (rng.normal(size=4).astype(np.float32) for _ in range(3))
    var = rng.uniform(0.5, 2.0, size=4).astype(np.float32)
    dn = ("NHWC", "HWIO", "NHWC")
    conv = np.asarray(jax.lax.conv_general_dilated(x, kernel, (1, 1), "SAME", dimension_numbers=dn))
    expected = (conv - mean) / np.sqrt(var + 1e-5) * gamma + beta
    folded = fold_conv_bn(kernel, {"scale": gamma, "bias": beta}, {"mean": mean, "var": var})
    np.testing.assert_array_equal(folded["kernel"], kernel)
    got = conv * folded["scale"] + folded["bias"]
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_errors_name_the_bad_value():
    model, size = _cifar()
    variables = _variables(model, size)
    folded = fold_variables(model, variables)
    x = jnp.zeros((1, size, size, 3))
    with pytest.raises(ValueError, match="'sample'"):
        skip_forward(model, folded, x, gate_mode="sample")
    with pytest.raises(ValueError, match="'scan'"):
        skip_forward(model, folded, x, path="scan")
    with pytest.raises(ValueError, match=r"shape \(3,\), got \(2,\)"):
        skip_forward(model, folded, x, gate_mode="calibrated", thresholds=jnp.zeros(2))
    with pytest.raises(ValueError, match="'fast'"):
        make_fast_eval_step(model, make_mesh(1), path="fast")
    broken = jax.tree.map(lambda a: a, variables)
    del broken["params"]["stage1_block0"]["bn2"]
    with pytest.raises(ValueError, match=r"stage1_block0.*\['bn2'\]"):
        fold_variables(model, broken)


def test_auto_path_uses_pallas_only_where_it_was_verified(monkeypatch):
    assert skip_inference.choose_path(1, 224) == "cond"
    assert skip_inference.choose_path(64, 32) == "cond"  # CPU: Pallas would only interpret
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert skip_inference.choose_path(64, 32) == "pallas"
    assert skip_inference.choose_path(64, 224) == "masked"
    assert skip_inference.choose_path(1, 224) == "cond"
