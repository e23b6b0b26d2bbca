"""PyTorch interop: parity with a PyTorch ConvNet-AIG, torchvision weights, round trips, CLI.

The PyTorch model (:mod:`tests.torch_reference`) is the reference code's architecture
(andreasveit/convnet-aig) with its module names: projection shortcut ``shortcut`` = (1×1 conv,
BN), gate = global average pool → 1×1 conv ``fc1`` (C→16, bias) → BatchNorm1d ``fc1bn`` → ReLU
→ 1×1 conv ``fc2`` (16→2) → decision (index 1 = execute), masked residual
``relu(shortcut(x) + out * g)``. With ``naming="torchvision"`` it is an ungated torchvision
ResNet (``downsample``, ``fc``).
"""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from aig_jax.checkpoint import load_variables, read_meta
from aig_jax.convert import main
from aig_jax.interop.pytorch import (
    convert_reference_state_dict,
    convert_torchvision_state_dict,
    load_torch_state_dict,
    save_torch_state_dict,
    to_reference_state_dict,
)
from aig_jax.model.blocks import BasicBlock, Bottleneck
from aig_jax.model.resnet import CIFAR_WIDTHS, IMAGENET_WIDTHS, ResNet, build_model, cifar_resnet
from aig_jax.model.spec import ModelSpec
from aig_jax.model.variables import abstract_variables
from tests.conftest import run_cli, user_error_line

torch = pytest.importorskip("torch", reason="PyTorch not installed: pip install -e .[torch]")
from tests.torch_reference import TorchResNet  # noqa: E402 (needs torch)

tnn = torch.nn


def randomised(model, seed):
    """``model`` in float64 eval mode with random weights and BatchNorm statistics."""
    gen = torch.Generator().manual_seed(seed)

    def fill(t, low, high):
        t.copy_(torch.rand(t.shape, generator=gen, dtype=t.dtype) * (high - low) + low)

    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, tnn.Conv2d | tnn.Linear):
                fan_in = module.weight[0].numel()
                module.weight.copy_(torch.randn(module.weight.shape, generator=gen) / fan_in**0.5)
                if module.bias is not None:
                    fill(module.bias, -0.3, 0.3)
            elif isinstance(module, tnn.BatchNorm2d | tnn.BatchNorm1d):
                fill(module.weight, 0.5, 1.5)
                fill(module.bias, -0.2, 0.2)
                fill(module.running_mean, -0.2, 0.2)
                fill(module.running_var, 0.5, 2.0)
                module.num_batches_tracked.fill_(7)
    return model.double().eval()


def images(batch, size, seed=0):
    """The same images as PyTorch NCHW float64 and as our NHWC float32.

    Each image has its own colour cast, so that the gates' pooled inputs differ between images.
    """
    gen = torch.Generator().manual_seed(seed)
    cast = 2 * torch.randn(batch, 3, 1, 1, generator=gen)
    x = (torch.randn(batch, 3, size, size, generator=gen) + cast).double()
    return x, jnp.asarray(x.numpy().transpose(0, 2, 3, 1), jnp.float32)


def rel_err(ours, ref):
    return float(np.max(np.abs(np.asarray(ours, np.float64) - ref)) / np.max(np.abs(ref)))


CIFAR110 = dict(bottleneck=False, stage_sizes=(18, 18, 18), widths=CIFAR_WIDTHS, stem="cifar")
IMAGENET_SMALL = dict(
    bottleneck=True, stage_sizes=(2, 1, 1, 1), widths=IMAGENET_WIDTHS, stem="imagenet"
)


def our_model(arch, num_classes, gated=True):
    block = Bottleneck if arch["bottleneck"] else BasicBlock
    return ResNet(
        stage_sizes=arch["stage_sizes"],
        block_cls=block,
        widths=arch["widths"],
        stem=arch["stem"],
        num_classes=num_classes,
        gated=gated,
    )


@pytest.fixture(scope="module")
def resnet110():
    """The float64 PyTorch ResNet-110 (10 classes) and its state dict."""
    net = randomised(TorchResNet(num_classes=10, **CIFAR110), seed=1)
    return net, net.state_dict()


@pytest.fixture(scope="module")
def imagenet_small():
    """A float64 PyTorch bottleneck ResNet with stages (2, 1, 1, 1) (7 classes), its state dict."""
    net = randomised(TorchResNet(num_classes=7, **IMAGENET_SMALL), seed=2)
    return net, net.state_dict()


@pytest.mark.parametrize(
    ("arch", "fixture", "size"),
    [(CIFAR110, "resnet110", 32), (IMAGENET_SMALL, "imagenet_small", 64)],
)
def test_reference_parity_in_argmax_and_open_mode(arch, fixture, size, request):
    net, state_dict = request.getfixturevalue(fixture)
    model = our_model(arch, getattr(net, net.head_name).out_features)
    converted = convert_reference_state_dict(state_dict, model)
    assert converted.dropped_gates == () and converted.initialised_gates == ()
    x_torch, x = images(4, size)
    for mode in ("argmax", "open"):
        with torch.no_grad():
            ref_logits, ref_gates, margins = net(x_torch, mode)
        out = model.apply(converted.variables, x, gate_mode=mode)
        np.testing.assert_array_equal(np.asarray(out.gates), ref_gates.numpy())
        assert rel_err(out.logits, ref_logits.numpy()) < 1e-4
        if mode == "argmax":  # mixed decisions, not so close to a tie that float32 could flip one
            g = ref_gates.numpy()
            assert ((g.min(axis=1) == 0) & (g.max(axis=1) == 1)).any()
            assert float(margins.min()) > 1e-3


def test_gates_of_rate_one_blocks_are_dropped_and_those_blocks_always_execute(imagenet_small):
    net, state_dict = imagenet_small
    gated = (False, True, True, False, True)
    model = our_model(IMAGENET_SMALL, 7, gated=gated)
    converted = convert_reference_state_dict(state_dict, model)
    assert converted.dropped_gates == ("stage1_block0", "stage3_block0")
    assert "gate" not in converted.variables["params"]["stage1_block0"]
    x_torch, x = images(3, 64, seed=5)
    with torch.no_grad():
        ref_logits, ref_gates, _ = net(x_torch, "argmax", open_blocks={0, 3})
    out = model.apply(converted.variables, x)
    np.testing.assert_array_equal(np.asarray(out.gates), ref_gates.numpy())
    assert rel_err(out.logits, ref_logits.numpy()) < 1e-4


@pytest.mark.parametrize("bottleneck", [False, True], ids=["resnet18-like", "resnet50-like"])
def test_torchvision_weights_land_exactly_and_gates_are_fresh(bottleneck):
    arch = dict(
        bottleneck=bottleneck, stage_sizes=(1, 1, 1, 1), widths=IMAGENET_WIDTHS, stem="imagenet"
    )
    net = randomised(TorchResNet(num_classes=5, naming="torchvision", **arch), seed=3)
    sd = net.state_dict()
    model = our_model(arch, 5)
    converted = convert_torchvision_state_dict(sd, model, seed=4)
    v = converted.variables
    assert converted.initialised_gates == tuple(i.name for i in model.block_infos())
    # Spot checks of the layouts; the forward parity below checks every tensor.
    np.testing.assert_array_equal(
        v["params"]["linear"]["kernel"], sd["fc.weight"].float().numpy().T
    )
    np.testing.assert_array_equal(
        v["params"]["stage2_block0"]["shortcut_conv"]["kernel"],
        sd["layer2.0.downsample.0.weight"].float().numpy().transpose(2, 3, 1, 0),
    )
    np.testing.assert_array_equal(
        v["batch_stats"]["stage4_block0"]["shortcut_bn"]["var"],
        sd["layer4.0.downsample.1.running_var"].float().numpy(),
    )
    # Gates: our initialisation (fc2 bias (0.1, 2), fresh BatchNorm), seeded per block.
    kernels = []
    for info in model.block_infos():
        gate = v["params"][info.name]["gate"]
        np.testing.assert_allclose(gate["fc2"]["bias"], [0.1, 2.0])
        np.testing.assert_array_equal(v["batch_stats"][info.name]["gate"]["fc1bn"]["var"], 1.0)
        assert gate["fc1"]["kernel"].shape == (info.in_features, 16)
        kernels.append(gate["fc1"]["kernel"])
    assert not np.array_equal(kernels[1][:16], kernels[2][:16])
    again = convert_torchvision_state_dict(sd, model, seed=4).variables
    other = convert_torchvision_state_dict(sd, model, seed=5).variables
    fc1 = lambda tree: tree["params"]["stage3_block0"]["gate"]["fc1"]["kernel"]  # noqa: E731
    np.testing.assert_array_equal(fc1(again), fc1(v))
    assert not np.array_equal(fc1(other), fc1(v))
    # With every gate open, the gated model computes the torchvision ResNet.
    x_torch, x = images(2, 32)
    with torch.no_grad():
        ref_logits, _, _ = net(x_torch)
    out = model.apply(v, x, gate_mode="open")
    assert rel_err(out.logits, ref_logits.numpy()) < 1e-4


def test_full_size_torchvision_resnet50_into_the_reference_schedule():
    net = TorchResNet(True, (3, 4, 6, 3), IMAGENET_WIDTHS, "imagenet", 1000, naming="torchvision")
    spec = ModelSpec("resnet50", 1000, (1, 1, 0.8, 1, *[0.5] * 3, 1, *[0.5] * 5, 1, 0.7, 1))
    model = spec.build()
    converted = convert_torchvision_state_dict(net.state_dict(), model)
    infos = model.block_infos()
    assert converted.initialised_gates == tuple(i.name for i in infos if i.gated)
    tree = jax.tree.map(np.shape, converted.variables)
    assert tree == jax.tree.map(lambda a: a.shape, abstract_variables(model))


def random_variables(model, seed):
    """Random float32 variables of ``model``: He-scaled kernels, BN variances in [0.5, 2]."""
    rng = np.random.default_rng(seed)

    def leaf(path, a):
        name = path[-1].key
        if name == "kernel":
            return rng.normal(size=a.shape) / np.sqrt(np.prod(a.shape[:-1]))
        low, high = {"scale": (0.5, 1.5), "var": (0.5, 2.0)}.get(name, (-0.2, 0.2))
        return rng.uniform(low, high, a.shape)

    tree = jax.tree_util.tree_map_with_path(leaf, abstract_variables(model))
    return jax.tree.map(lambda a: np.asarray(a, np.float32), tree)


@pytest.mark.parametrize(
    ("arch", "gated", "size"),
    [
        (
            dict(bottleneck=False, stage_sizes=(2, 2, 2), widths=CIFAR_WIDTHS, stem="cifar"),
            True,
            16,
        ),
        (IMAGENET_SMALL, (False, True, True, False, True), 32),
    ],
    ids=["gated-cifar", "partly-ungated-imagenet"],
)
def test_jax_to_torch_to_jax_is_the_identity_and_loads_into_the_reference(
    arch, gated, size, tmp_path
):
    model = our_model(arch, 6, gated=gated)
    variables = random_variables(model, seed=8)
    path = str(tmp_path / "converted.pth")
    save_torch_state_dict(path, to_reference_state_dict(variables, model))
    state_dict = load_torch_state_dict(path)
    back = convert_reference_state_dict(state_dict, model).variables
    assert jax.tree.structure(back) == jax.tree.structure(variables)
    for ours, theirs in zip(jax.tree.leaves(variables), jax.tree.leaves(back), strict=True):
        np.testing.assert_array_equal(ours, theirs)
    # The file loads strictly into the reference architecture and computes what we compute;
    # our ungated blocks got gates that always open.
    net = TorchResNet(num_classes=6, **arch)
    net.load_state_dict(torch.load(path, weights_only=True)["state_dict"])
    net.double().eval()
    x_torch, x = images(3, size)
    with torch.no_grad():
        ref_logits, ref_gates, _ = net(x_torch)
    out = model.apply(variables, x)
    np.testing.assert_array_equal(np.asarray(out.gates), ref_gates.numpy())
    assert rel_err(out.logits, ref_logits.numpy()) < 1e-4


def test_a_checkpoint_of_another_model_is_refused_listing_every_bad_key(resnet110):
    _, sd = resnet110
    with pytest.raises(ValueError, match="does not fit") as info:
        convert_reference_state_dict(sd, build_model("resnet56_cifar"))
    message = str(info.value)
    layers = [k for k in sd if k.startswith("layer") and not k.endswith("num_batches_tracked")]
    extra = [k for k in layers if int(k.split(".")[1]) >= 9]
    assert f"{len(extra)} unexpected keys" in message
    assert all(k in message for k in extra)
    assert "missing" not in message and "mis-shaped" not in message


def test_missing_and_mis_shaped_keys_are_all_named(resnet110):
    _, sd = resnet110
    sd = dict(sd)
    del sd["layer3.17.fc2.bias"], sd["layer1.0.bn2.running_var"]
    sd["layer2.0.conv1.weight"] = torch.zeros(32, 16, 1, 1)
    sd["linear.weight"] = torch.zeros(11, 64)
    with pytest.raises(ValueError) as info:
        convert_reference_state_dict(sd, build_model("resnet110_cifar"))
    message = str(info.value)
    assert "2 missing keys: layer1.0.bn2.running_var, layer3.17.fc2.bias" in message
    assert "layer2.0.conv1.weight (checkpoint (32, 16, 1, 1), model (32, 16, 3, 3))" in message
    assert "linear.weight (checkpoint (11, 64), model (10, 64))" in message


def test_a_wrong_naming_or_wrong_variables_are_refused():
    net = TorchResNet(False, (1, 1, 1), CIFAR_WIDTHS, "cifar", 10, naming="torchvision")
    with pytest.raises(ValueError) as info:
        convert_reference_state_dict(net.state_dict(), cifar_resnet(8))
    assert "missing keys: " in str(info.value) and "layer1.0.fc1.weight" in str(info.value)
    assert "unexpected keys: fc.bias, fc.weight, layer2.0.downsample.0.weight" in str(info.value)
    model = cifar_resnet(8)
    variables = abstract_variables(cifar_resnet(14))
    with pytest.raises(
        ValueError, match="54 unexpected variables: batch_stats/stage1_block1/bn1/mean"
    ):
        to_reference_state_dict(variables, model)


def test_cli_converts_a_reference_checkpoint_and_back(tmp_path, capsys):
    net = randomised(TorchResNet(False, (1, 1, 1), CIFAR_WIDTHS, "cifar", 100), seed=6)
    sd = net.state_dict()
    src, dst, back = tmp_path / "model_best.pth.tar", tmp_path / "orbax", tmp_path / "back.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in sd.items()}, "epoch": 3}, src)
    argv = [str(src), str(dst), "--model", "resnet8_cifar", "--target-rates", "1,0.5,0.5"]
    assert main([*argv, "--gate-rate-one-blocks", "drop"]) == 0
    assert (
        "dropped the checkpoint's gates of the rate-1 blocks stage1_block0"
        in capsys.readouterr().out
    )
    meta, directory, step = read_meta(str(dst))
    spec = ModelSpec.from_json(meta["model"])
    assert spec == ModelSpec("resnet8_cifar", 100, (1.0, 0.5, 0.5), gate_rate_one_blocks="drop")
    assert meta["converted_from"] == "reference" and meta["source"] == str(src)
    model = spec.build()
    restored = load_variables(directory, step, abstract_variables(model))
    expected = convert_reference_state_dict(sd, model).variables
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, restored), expected)

    assert main(["--to-torch", str(dst), str(back)]) == 0
    assert (
        "always-open gates written for the ungated blocks stage1_block0" in capsys.readouterr().out
    )
    exported = torch.load(back, weights_only=True)["state_dict"]
    original = {k: v.float() for k, v in sd.items() if not k.endswith("num_batches_tracked")}
    assert set(exported) == set(original)
    for key, value in original.items():
        if not key.startswith("layer1.0.fc"):
            torch.testing.assert_close(exported[key], value, rtol=0, atol=0)
    assert exported["layer1.0.fc2.bias"].tolist() == [-1e4, 1e4]

    # The same checkpoint into a deeper model: an error listing the missing keys, exit status 2.
    with pytest.raises(SystemExit) as exit_:
        main([str(src), str(tmp_path / "other"), "--model", "resnet14_cifar"])
    assert exit_.value.code == 2
    assert "missing keys: layer1.1.conv1.weight" in capsys.readouterr().err


def test_cli_converts_a_bare_torchvision_state_dict_with_fresh_gates(tmp_path, capsys):
    net = TorchResNet(False, (2, 2, 2, 2), IMAGENET_WIDTHS, "imagenet", 1000, naming="torchvision")
    src, dst = tmp_path / "resnet18.pth", tmp_path / "orbax"
    torch.save(net.state_dict(), src)
    rates = "1,0.5,0.5,1,0.5,0.5,1,0.5"
    argv = [str(src), str(dst), "--model", "resnet18", "--target-rates", rates]
    assert main([*argv, "--gate-rate-one-blocks", "drop"]) == 0
    out = capsys.readouterr().out
    assert (
        "initialised fresh gates (seed 0) in stage1_block1, stage2_block0, stage3_block0, " in out
    )
    meta, directory, step = read_meta(str(dst))
    assert meta["converted_from"] == "torchvision"
    model = ModelSpec.from_json(meta["model"]).build()
    restored = load_variables(directory, step, abstract_variables(model))
    fc = restored["params"]["linear"]["kernel"]
    np.testing.assert_array_equal(fc, net.fc.weight.detach().numpy().T)
    assert "gate" in restored["params"]["stage4_block1"]
    assert "gate" not in restored["params"]["stage4_block0"]


def test_cli_prints_a_missing_checkpoint_as_one_error_line(tmp_path):
    proc = run_cli("-m", "aig_jax.convert", "--to-torch", str(tmp_path / "none"), "out.pth")
    assert user_error_line(proc) == f"error: no checkpoint directory at {tmp_path / 'none'}"


def test_torch_is_optional_and_not_imported_by_the_package(monkeypatch, tmp_path):
    code = "import sys, aig_jax, aig_jax.convert; assert 'torch' not in sys.modules"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "PYTHONPATH": path})
    monkeypatch.setitem(sys.modules, "torch", None)
    with pytest.raises(ImportError, match=r"pip install -e '\.\[torch\]'"):
        load_torch_state_dict(str(tmp_path / "x.pth"))


def test_cli_keeps_the_gates_of_rate_one_blocks_by_default_as_the_configs(tmp_path, capsys):
    net = randomised(TorchResNet(False, (1, 1, 1), CIFAR_WIDTHS, "cifar", 10), seed=9)
    src, dst = tmp_path / "model_best.pth.tar", tmp_path / "orbax"
    torch.save({"state_dict": net.state_dict()}, src)
    assert (
        main([str(src), str(dst), "--model", "resnet8_cifar", "--target-rates", "1,0.5,0.5"]) == 0
    )
    assert "dropped" not in capsys.readouterr().out
    meta, directory, step = read_meta(str(dst))
    spec = ModelSpec.from_json(meta["model"])
    assert spec.gate_rate_one_blocks == "keep" and spec.gated == (True, True, True)
    restored = load_variables(directory, step, abstract_variables(spec.build()))
    np.testing.assert_array_equal(
        restored["params"]["stage1_block0"]["gate"]["fc2"]["bias"],
        net.state_dict()["layer1.0.fc2.bias"].float().numpy(),
    )
