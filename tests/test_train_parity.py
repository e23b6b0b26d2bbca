"""Our train step equals the reference's (PyTorch) train step, step for step.

From the same weights (converted with :mod:`aig_jax.interop.pytorch`), the same batches and the
same Gumbel noise (the noise our gates draw, from :func:`torch_reference.jax_gate_noise`, fed
to the PyTorch gates), three SGD steps of :func:`aig_jax.train.step.make_train_step` with
:func:`aig_jax.train.optim.make_optimizer` and three of
:func:`tests.torch_reference.train_step` give the same loss, cross-entropy,
target-rate loss and gate decisions at every step, and the same parameters, momentum buffers
and BatchNorm running statistics after each. And the configs' learning rate is the scripts' in
every epoch.

Two cases: a CIFAR basic-block model with train.py's loss (every layer counted, divided by L)
and a gate-``fc2`` learning-rate group; a bottleneck ImageNet-stem model whose first block has
target 1 and keeps its gate (as the reference's), with train_img.py's loss (layers with target
1 left out, the sum still divided by L, ``normalize="all"``) and its ``fc*`` learning-rate group.

Both sides run in float32 and sum convolutions in different orders, so every tensor differs
by rounding, which the steps amplify (most through the gates' small, cancelling gradients): the
losses are compared to a relative 1e-4, parameters, momentum buffers and running statistics to
1e-3 of each tensor's largest magnitude (at least of 1e-4: the gates' fc1 biases get no
gradient through the following BatchNorm and stay at rounding noise). That is well above the
rounding after three steps and below what a real difference changes: leaving out weight decay
moves momentum buffers by over 4e-3 of their size, PyTorch's unbiased running variance moves the
gates' BatchNorm variance (8 values per feature) by 1/7 of the batch term, a gate learning-rate
factor of 2 or 3 doubles or triples its parameters' updates. Gate decisions must be equal
exactly (the reference's ``(one_hot - soft) + soft`` may sit one ulp below 1, so its decisions
are rounded first). The bottleneck model gets 64×64 inputs, so its last stage still sees 2×2
maps: at 1×1, BatchNorm over a batch of 8 makes three steps at learning rate 0.1 chaotic
enough to amplify the rounding past any useful tolerance. It starts from ``init="he_normal"``:
from the reference's ImageNet initialisation its third step is as ill-conditioned (PyTorch alone
in float32 and in float64 parts by 1e-2 there); the CIFAR case starts from the reference's
initialisation (γ ~ U(0, 1)).
"""

import importlib

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from aig_jax.model.blocks import BasicBlock, Bottleneck
from aig_jax.model.resnet import resnet
from aig_jax.model.variables import init_variables
from aig_jax.train.optim import learning_rate_schedule, make_optimizer
from aig_jax.train.state import TrainState
from aig_jax.train.step import make_train_step

torch = pytest.importorskip("torch", reason="PyTorch not installed: pip install -e .[torch]")
from tests import torch_reference as ref  # noqa: E402 (needs torch)

STEPS = 3
BATCH = 8
LOSS_RTOL = 1e-4
TENSOR_TOL = 1e-3  # of the tensor's largest magnitude
SCALE_FLOOR = 1e-4  # for tensors that stay near 0, e.g. gate fc1 biases (BN cancels them)

CASES = {
    "cifar-basic": dict(
        bottleneck=False,
        stage_sizes=(1, 1, 1),
        widths=(16, 32, 64),
        stem="cifar",
        size=16,
        targets=(0.6, 0.6, 0.6),
        target_weight=2.0,
        normalize="gated",
        weight_decay=5e-4,
        gate_lr_factor=3.0,
        gate_lr_params="fc2",
        script="cifar",
        init="reference",
    ),
    "imagenet-bottleneck": dict(
        bottleneck=True,
        stage_sizes=(1, 1, 1, 1),
        widths=(8, 16, 16, 32),
        stem="imagenet",
        size=64,
        targets=(1.0, 0.5, 0.7, 0.5),
        target_weight=1.0,
        normalize="all",
        weight_decay=1e-4,
        gate_lr_factor=2.0,
        gate_lr_params="gate",
        script="imagenet",
        init="he_normal",
    ),
}


def batches(case, seed=0):
    """STEPS batches of NCHW float32 images (a colour cast per image) and labels."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(STEPS):
        cast = 2 * torch.randn(BATCH, 3, 1, 1, generator=gen)
        x = torch.randn(BATCH, 3, case["size"], case["size"], generator=gen) + cast
        out.append((x, torch.randint(0, 10, (BATCH,), generator=gen)))
    return out


def close(ours, theirs, what):
    ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
    scale = max(float(np.max(np.abs(theirs))), SCALE_FLOOR)
    err = float(np.max(np.abs(ours - theirs))) / scale
    assert err < TENSOR_TOL, f"{what}: max |ours - reference| = {err:.2e} of max |reference|"


def compare_trees(ours, theirs, what):
    flat_ours = jax.tree_util.tree_flatten_with_path(ours)[0]
    flat_theirs = dict(jax.tree_util.tree_flatten_with_path(theirs)[0])
    assert len(flat_ours) == len(flat_theirs)
    for path, leaf in flat_ours:
        close(leaf, flat_theirs[path], f"{what} {jax.tree_util.keystr(path)}")


def trace_of(opt_state):
    """The momentum buffers in our optimiser state (optax.trace's)."""
    traces = [
        s.trace
        for s in jax.tree.leaves(opt_state, is_leaf=lambda s: isinstance(s, optax.TraceState))
        if isinstance(s, optax.TraceState)
    ]
    assert len(traces) == 1
    return traces[0]


@pytest.mark.parametrize("name", sorted(CASES))
def test_three_sgd_steps_equal_the_reference_training_step(name):
    case = CASES[name]
    model = resnet(
        stage_sizes=case["stage_sizes"],
        block_cls=Bottleneck if case["bottleneck"] else BasicBlock,
        widths=case["widths"],
        stem=case["stem"],
        num_classes=10,
        init=case["init"],
    )
    config = ml_collections.ConfigDict(
        dict(
            learning_rate=0.1,
            lr_boundaries_epochs=(),
            lr_decay=0.1,
            warmup_epochs=0.0,
            momentum=0.9,
            nesterov=False,
            weight_decay=case["weight_decay"],
            gate_lr_factor=case["gate_lr_factor"],
            gate_lr_params=case["gate_lr_params"],
        )
    )
    tx = make_optimizer(config, learning_rate_schedule(config, steps_per_epoch=10))
    variables = init_variables(model, (case["size"], case["size"], 3), seed=1)
    state = TrainState(
        jnp.zeros((), jnp.int32),
        variables["params"],
        variables["batch_stats"],
        tx.init(variables["params"]),
    )
    train_step = make_train_step(
        model,
        tx,
        np.asarray(case["targets"], np.float32),
        target_weight=case["target_weight"],
        normalize=case["normalize"],
        donate=False,
    )

    net = ref.TorchResNet(case["bottleneck"], case["stage_sizes"], case["widths"], case["stem"], 10)
    ref.load_variables(net, variables, model)
    optimizer = ref.make_optimizer(
        net, weight_decay=case["weight_decay"], lrfact=case["gate_lr_factor"], script=case["script"]
    )
    # What the reference's adjust_learning_rate sets at the start of its first epoch.
    lr = ref.learning_rate(1, script=case["script"])
    ref.set_learning_rate(optimizer, lr, lrfact=case["gate_lr_factor"])

    key = jax.random.key(7)
    for step, (x, labels) in enumerate(batches(case)):
        images = jnp.asarray(x.numpy().transpose(0, 2, 3, 1))
        rng = jax.random.fold_in(key, step)  # what the train step draws its noise from
        noise = ref.jax_gate_noise(model, state.variables, images, rng)
        (ours, _) = model.apply(
            state.variables,
            images,
            train=True,
            gate_mode="sample",
            rngs={"gumbel": rng},
            mutable=["batch_stats"],
        )
        state, metrics = train_step(
            state, {"image": images, "label": jnp.asarray(labels.numpy())}, key
        )
        out = ref.train_step(
            net,
            optimizer,
            x,
            labels,
            case["targets"],
            torch.from_numpy(noise),
            lossfact=case["target_weight"],
            script=case["script"],
        )
        for k in ("loss", "ce", "target_loss"):
            np.testing.assert_allclose(
                float(metrics[k]), float(out[k]), rtol=LOSS_RTOL, err_msg=f"step {step}: {k}"
            )
        # The reference's (one_hot - soft) + soft can be one ulp below 1.
        decisions = np.round(out["gates"].numpy())
        np.testing.assert_array_equal(np.asarray(ours.gates), decisions)
        np.testing.assert_array_equal(np.mean(decisions, axis=1), metrics["gate_rates"])
        assert 0 < decisions.mean() < 1, "every gate decided alike: the check would be weak"
        theirs = ref.variables_of(net, model)
        compare_trees(state.params, theirs["params"], f"step {step}: params")
        compare_trees(state.batch_stats, theirs["batch_stats"], f"step {step}: batch_stats")
        compare_trees(
            trace_of(state.opt_state),
            ref.momentum_of(net, optimizer, model),
            f"step {step}: momentum",
        )


@pytest.mark.parametrize(
    ("config", "script", "epochs"),
    [("cifar10_resnet110_aig", "cifar", 349), ("imagenet_resnet50_aig", "imagenet", 99)],
)
def test_learning_rate_of_every_epoch_is_the_reference_scripts(config, script, epochs):
    """The reference trains epochs 1 … N-1 of ``range(1, N)`` (349 on CIFAR, 99 on ImageNet),
    setting the rate of each at its start; our epoch e (from 0) is its epoch e + 1."""
    c = importlib.import_module(f"configs.{config}").get_config()
    assert c.num_epochs == epochs
    schedule = learning_rate_schedule(c, steps_per_epoch=10)
    ours = [float(schedule(10 * e + s)) for e in range(epochs) for s in (0, 9)]
    theirs = [ref.learning_rate(e + 1, script=script) for e in range(epochs) for _ in (0, 9)]
    np.testing.assert_allclose(ours, theirs, rtol=1e-6)


def test_torch_gumbel_noise_is_standard_gumbel():
    """Mean γ ≈ 0.5772 and variance π²/6 over 200,000 draws (standard errors 0.003, 0.01)."""
    g = ref.torch_gumbel_noise((100_000, 2), torch.Generator().manual_seed(0)).double()
    assert g.shape == (100_000, 2)
    assert abs(float(g.mean()) - 0.5772) < 0.02
    assert abs(float(g.var()) - np.pi**2 / 6) < 0.06
