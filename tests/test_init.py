"""The "reference" initialisation draws what the reference code's models start from.

The reference is a PyTorch model with the reference's layout, built with PyTorch's default
initialisation (which for convolution and linear weights and biases, U(±1/√fan_in), is still
PyTorch 0.3.1's) and then given :func:`torch_reference.reference_init`: BatchNorm γ re-drawn
U(0, 1) to mimic PyTorch 0.3.1 (current PyTorch sets 1), the gates' last layer as the reference
sets it, and for the ImageNet model the reference's ``ResNet_ImageNet`` loop (He-normal
convolutions over fan-out, BatchNorm2d γ = 1). Per layer, our initial values and the
reference's have the same mean, standard deviation, minimum and maximum within sampling
tolerance: 6 standard errors for the mean and the standard deviation of n draws, and for the
extremes 1.5 standard deviations (the extremes of normal draws scatter) plus four times the
spacing of n draws over their range.
"""

import jax
import numpy as np
import pytest

from aig_jax.model.blocks import BasicBlock, Bottleneck
from aig_jax.model.resnet import CIFAR_WIDTHS, IMAGENET_WIDTHS, resnet
from aig_jax.model.variables import init_variables

torch = pytest.importorskip("torch", reason="PyTorch not installed: pip install -e .[torch]")
from tests import torch_reference as ref  # noqa: E402 (needs torch)

CASES = {
    "cifar": dict(bottleneck=False, stage_sizes=(3, 3, 3), widths=CIFAR_WIDTHS, classes=10),
    "imagenet": dict(
        bottleneck=True, stage_sizes=(1, 1, 1, 1), widths=IMAGENET_WIDTHS, classes=1000
    ),
}


def assert_same_distribution(ours, theirs, what):
    ours, theirs = np.asarray(ours, np.float64).ravel(), np.asarray(theirs, np.float64).ravel()
    if np.all(theirs == theirs[0]):  # constants: β = 0, running statistics, fc2 bias
        np.testing.assert_array_equal(ours, theirs, err_msg=what)
        return
    n, s = theirs.size, theirs.std()
    assert abs(ours.mean() - theirs.mean()) < 6 * s * np.sqrt(2 / n), f"{what}: mean"
    assert abs(ours.std() / s - 1) < 6 / np.sqrt(n), f"{what}: std {ours.std()} vs {s}"
    slack = 1.5 * s + 4 * (theirs.max() - theirs.min()) / n
    assert abs(ours.max() - theirs.max()) < slack, f"{what}: max {ours.max()} vs {theirs.max()}"
    assert abs(ours.min() - theirs.min()) < slack, f"{what}: min {ours.min()} vs {theirs.min()}"


@pytest.mark.parametrize("stem", sorted(CASES))
def test_reference_init_matches_the_reference_models_layer_by_layer(stem):
    case = CASES[stem]
    model = resnet(
        stage_sizes=case["stage_sizes"],
        block_cls=Bottleneck if case["bottleneck"] else BasicBlock,
        widths=case["widths"],
        stem=stem,
        num_classes=case["classes"],
        init="reference",
    )
    ours = init_variables(model, (32, 32, 3), seed=0)
    torch.manual_seed(0)
    net = ref.TorchResNet(
        case["bottleneck"], case["stage_sizes"], case["widths"], stem, case["classes"]
    )
    theirs = ref.variables_of(ref.reference_init(net), model)
    assert jax.tree.structure(ours) == jax.tree.structure(theirs)
    flat = dict(jax.tree_util.tree_flatten_with_path(theirs)[0])
    for path, leaf in jax.tree_util.tree_flatten_with_path(ours)[0]:
        assert_same_distribution(leaf, flat[path], jax.tree_util.keystr(path))


def test_he_normal_is_not_the_reference_cifar_init():
    """The comparison above tells the schemes apart: He-normal fails it on a CIFAR model."""
    case = CASES["cifar"]
    model = resnet(
        stage_sizes=case["stage_sizes"],
        block_cls=BasicBlock,
        widths=case["widths"],
        stem="cifar",
        num_classes=10,
        init="he_normal",
    )
    ours = init_variables(model, (32, 32, 3), seed=0)
    torch.manual_seed(0)
    net = ref.TorchResNet(False, case["stage_sizes"], case["widths"], "cifar", 10)
    theirs = ref.variables_of(ref.reference_init(net), model)
    conv = ("params", "stage2_block1", "conv1", "kernel")
    pick = lambda tree: tree[conv[0]][conv[1]][conv[2]][conv[3]]  # noqa: E731
    with pytest.raises(AssertionError, match="std"):
        assert_same_distribution(pick(ours), pick(theirs), "conv")
