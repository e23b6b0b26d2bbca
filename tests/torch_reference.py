"""The reference ConvNet-AIG in PyTorch and its training step, for parity with ours.

Written from the reference code (andreasveit/convnet-aig, PyTorch 0.3.1) for the parity tests
and learning-curve comparisons; it needs ``torch`` (``pip install -e '.[torch]'``), which the
rest of the package does not.

:class:`TorchResNet` has the reference's module names (``conv1``, ``bn1``, ``layerS.I.convK``,
``bnK``, ``shortcut``, gate ``fc1`` → ``fc1bn`` → ``fc2``, head ``linear``), so
:func:`aig_jax.interop.pytorch.to_reference_state_dict` loads into it; with
``naming="torchvision"`` it is an ungated torchvision ResNet (``downsample``, ``fc``).
:func:`train_step` follows the reference's ``train.py`` (CIFAR) and ``train_img.py`` (ImageNet)
line for line: cross-entropy plus λ·target-rate loss with each script's normalisation, hard
Gumbel-softmax gates with the straight-through gradient, SGD with momentum and weight decay on
every parameter, the gate parameters in their own learning-rate group. The Gumbel noise is an
argument, so both sides can use the same draws: :func:`jax_gate_noise` gives the noise our
gates draw in a train step, :func:`torch_gumbel_noise` draws it as the reference does.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn as tnn

from aig_jax.interop.pytorch import convert_reference_state_dict, to_reference_state_dict
from aig_jax.model.gates import GUMBEL_EPS, GateOutput, GumbelGate, gumbel_noise
from aig_jax.model.resnet import ResNet

#: The two reference scripts: ``train.py`` (CIFAR) and ``train_img.py`` (ImageNet).
SCRIPTS = ("cifar", "imagenet")

#: Substring of a parameter name that puts it in the gate learning-rate group, per script.
GATE_GROUP = {"cifar": "fc2", "imagenet": "fc"}


def _check_script(script: str) -> None:
    if script not in SCRIPTS:
        raise ValueError(f"unknown reference script {script!r}; expected one of {SCRIPTS}")


class TorchBlock(tnn.Module):
    """A residual block (basic or bottleneck, stride on the 3×3) with the reference's gate."""

    def __init__(
        self, bottleneck: bool, in_planes: int, planes: int, stride: int, naming: str
    ) -> None:
        super().__init__()
        out_planes = planes * (4 if bottleneck else 1)
        if bottleneck:
            convs = [
                (in_planes, planes, 1, 1),
                (planes, planes, 3, stride),
                (planes, out_planes, 1, 1),
            ]
        else:
            convs = [(in_planes, planes, 3, stride), (planes, planes, 3, 1)]
        self.depth = len(convs)
        for k, (i, o, size, s) in enumerate(convs, 1):
            setattr(self, f"conv{k}", tnn.Conv2d(i, o, size, s, padding=size // 2, bias=False))
            setattr(self, f"bn{k}", tnn.BatchNorm2d(o))
        project = stride != 1 or in_planes != out_planes
        self.shortcut_name = "shortcut" if naming == "reference" else "downsample"
        setattr(
            self,
            self.shortcut_name,
            tnn.Sequential(
                tnn.Conv2d(in_planes, out_planes, 1, stride, bias=False),
                tnn.BatchNorm2d(out_planes),
            )
            if project
            else tnn.Sequential(),
        )
        self.gated = naming == "reference"
        if self.gated:
            self.fc1 = tnn.Conv2d(in_planes, 16, 1)
            self.fc1bn = tnn.BatchNorm1d(16)
            self.fc2 = tnn.Conv2d(16, 2, 1)

    def gate(
        self, x: torch.Tensor, mode: str, noise: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Decisions [B] (1 = execute) and the logit margins |l1 - l0| [B] of x [B, C, H, W].

        ``mode``: "argmax", "open", or "sample" with Gumbel ``noise`` [B, 2]: the reference's
        hard sample ``(one_hot - soft).detach() + soft`` of ``soft = softmax(logits + noise)``.
        """
        ones = torch.ones(x.shape[0], dtype=x.dtype, device=x.device)
        if not self.gated:
            return ones, ones * float("inf")
        w = F.avg_pool2d(x, x.shape[2])  # the reference's pooling: the whole (square) map
        w = F.relu(self.fc1bn(self.fc1(w).flatten(1)))
        logits = self.fc2(w[:, :, None, None]).flatten(1)
        margin = (logits[:, 1] - logits[:, 0]).abs()
        if mode == "sample":
            if noise is None:
                raise ValueError("gate mode 'sample' needs Gumbel noise of shape [B, 2]")
            soft = F.softmax(logits + noise, dim=1)
            hard = torch.zeros_like(soft).scatter_(1, soft.detach().argmax(1, keepdim=True), 1)
            return ((hard - soft.detach()) + soft)[:, 1], margin
        return (ones if mode == "open" else (logits.argmax(1) == 1).to(x.dtype)), margin

    def forward(
        self, x: torch.Tensor, mode: str, noise: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Output [B, C', H', W'], decisions [B] and logit margins [B]."""
        g, margin = self.gate(x, mode, noise)
        out = x
        for k in range(1, self.depth + 1):
            out = getattr(self, f"bn{k}")(getattr(self, f"conv{k}")(out))
            out = F.relu(out) if k < self.depth else out
        out = getattr(self, self.shortcut_name)(x) + out * g[:, None, None, None]
        return F.relu(out), g, margin


class TorchResNet(tnn.Module):
    """CIFAR (3×3 stem) or ImageNet (7×7/2 stem + 3×3/2 max-pool) ResNet, reference names.

    Built with PyTorch's default initialisation; see :func:`reference_init` for the
    reference's.
    """

    def __init__(
        self,
        bottleneck: bool,
        stage_sizes: Sequence[int],
        widths: Sequence[int],
        stem: str,
        num_classes: int,
        naming: str = "reference",
    ) -> None:
        super().__init__()
        self.stem = stem
        size, stride = (3, 1) if stem == "cifar" else (7, 2)
        self.conv1 = tnn.Conv2d(3, widths[0], size, stride, padding=size // 2, bias=False)
        self.bn1 = tnn.BatchNorm2d(widths[0])
        in_planes = widths[0]
        self.stages = len(stage_sizes)
        for s, (n, width) in enumerate(zip(stage_sizes, widths, strict=True), 1):
            blocks = []
            for b in range(n):
                stride = 2 if s > 1 and b == 0 else 1
                blocks.append(TorchBlock(bottleneck, in_planes, width, stride, naming))
                in_planes = width * (4 if bottleneck else 1)
            setattr(self, f"layer{s}", tnn.Sequential(*blocks))
        self.head_name = "linear" if naming == "reference" else "fc"
        setattr(self, self.head_name, tnn.Linear(in_planes, num_classes))

    def forward(
        self,
        x: torch.Tensor,
        mode: str = "argmax",
        open_blocks: Sequence[int] = (),
        noise: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Logits [B, K], decisions [L, B] and gate logit margins [L, B] of x [B, 3, H, W].

        ``noise`` [L, B, 2] is the Gumbel noise of each block's gate in mode "sample"; blocks
        in ``open_blocks`` always execute.
        """
        x = F.relu(self.bn1(self.conv1(x)))
        if self.stem == "imagenet":
            x = F.max_pool2d(x, 3, 2, 1)
        gates: list[torch.Tensor] = []
        margins: list[torch.Tensor] = []
        for s in range(1, self.stages + 1):
            for block in getattr(self, f"layer{s}"):
                i = len(gates)
                block_noise = None if noise is None else noise[i]
                x, g, m = block(x, "open" if i in open_blocks else mode, block_noise)
                gates.append(g)
                margins.append(m)
        logits = getattr(self, self.head_name)(x.mean((2, 3)))
        return logits, torch.stack(gates), torch.stack(margins)


def reference_init(net: TorchResNet) -> TorchResNet:
    """Initialise ``net``, built with current PyTorch's defaults, as the reference's models start.

    Every BatchNorm γ is re-drawn U(0, 1) and β set to 0 (PyTorch 0.3.1's defaults; current
    PyTorch sets γ = 1); the gates' ``fc2`` get weights N(0, 0.001) and bias (0.1, 2). An
    ImageNet-stem model then gets what ``ResNet_ImageNet`` sets: every convolution (the gates'
    included) N(0, 2 / (k·k·C_out)), ``fc2`` N(0, 0.001) again, BatchNorm2d γ = 1, β = 0. Draws
    from PyTorch's global generator (``torch.manual_seed``).
    """
    with torch.no_grad():
        for name, m in net.named_modules():
            if isinstance(m, tnn.BatchNorm1d | tnn.BatchNorm2d):
                m.weight.uniform_(0, 1)
                m.bias.zero_()
            elif name.endswith("fc2"):
                m.weight.normal_(0, 0.001)
                m.bias.copy_(torch.tensor([0.1, 2.0]))
        if net.stem != "imagenet":
            return net
        for name, m in net.named_modules():
            if isinstance(m, tnn.Conv2d):
                n = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                m.weight.normal_(0, (2.0 / n) ** 0.5)
                if name.endswith("fc2"):
                    m.weight.normal_(0, 0.001)
            elif isinstance(m, tnn.BatchNorm2d):
                m.weight.fill_(1)
                m.bias.zero_()
    return net


def torch_gumbel_noise(
    shape: Sequence[int], generator: torch.Generator | None = None
) -> torch.Tensor:
    """Gumbel(0, 1) noise of ``shape`` (e.g. [L, B, 2] for :func:`train_step`), drawn as the
    reference's ``GumbleSoftmax`` does: ``-log(ε - log(u + ε))``, ε = 1e-10, u ~ U(0, 1)."""
    u = torch.rand(tuple(shape), generator=generator)
    return -torch.log(GUMBEL_EPS - torch.log(u + GUMBEL_EPS))


def target_rate_loss(
    gates: torch.Tensor, targets: Sequence[float], script: str = "cifar"
) -> torch.Tensor:
    """The reference's target-rate loss of decisions [L, B] against L target rates.

    ``script="cifar"`` (train.py): ``sum_l (t_l - mean_b z_lb)² / L`` over every layer;
    ``"imagenet"`` (train_img.py): the sum over the layers with ``t_l < 1``, still over L.
    """
    _check_script(script)
    loss = gates.new_zeros(())
    for act, t in zip(gates, targets, strict=True):
        if script == "cifar" or t < 1:
            loss = loss + (t - act.mean()) ** 2
    return loss / len(targets)


def make_optimizer(
    net: tnn.Module,
    *,
    lr: float = 0.1,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    lrfact: float = 1.0,
    script: str = "cifar",
) -> torch.optim.SGD:
    """The reference's SGD: group 0 the gate parameters (``fc2`` in train.py, ``fc*`` in
    train_img.py) at ``lrfact · lr``, group 1 the others at ``lr``; weight decay on both."""
    _check_script(script)
    named = list(net.named_parameters())
    gate = [p for name, p in named if GATE_GROUP[script] in name]
    rest = [p for name, p in named if GATE_GROUP[script] not in name]
    return torch.optim.SGD(
        [
            {"params": gate, "lr": lrfact * lr, "weight_decay": weight_decay},
            {"params": rest, "lr": lr, "weight_decay": weight_decay},
        ],
        momentum=momentum,
    )


def learning_rate(
    epoch: int, *, lr: float = 0.1, lrdecay: int = 30, script: str = "cifar"
) -> float:
    """The reference's learning rate in ``epoch`` (its epochs count from 1): train.py ×0.1 from
    epochs 150 and 250; train_img.py ×0.1 every ``lrdecay`` epochs (``epoch // lrdecay``)."""
    _check_script(script)
    if script == "imagenet":
        return lr * 0.1 ** (epoch // lrdecay)
    return lr * (0.1 if epoch >= 150 else 1.0) * (0.1 if epoch >= 250 else 1.0)


def set_learning_rate(optimizer: torch.optim.SGD, lr: float, lrfact: float = 1.0) -> None:
    """The reference's ``adjust_learning_rate``: gate group ``lrfact · lr``, the rest ``lr``."""
    optimizer.param_groups[0]["lr"] = lrfact * lr
    optimizer.param_groups[1]["lr"] = lr


def train_step(
    net: TorchResNet,
    optimizer: torch.optim.SGD,
    images: torch.Tensor,
    labels: torch.Tensor,
    targets: Sequence[float],
    noise: torch.Tensor,
    *,
    lossfact: float,
    script: str = "cifar",
) -> dict[str, torch.Tensor]:
    """One step of the reference's training loop on images [B, 3, H, W] and labels [B].

    ``noise`` [L, B, 2] is the gates' Gumbel noise. Returns the detached ``loss``, ``ce``,
    ``target_loss`` (before λ = ``lossfact``), ``logits`` [B, K] and ``gates`` [L, B].
    """
    net.train()
    logits, gates, _ = net(images, "sample", noise=noise)
    ce = F.cross_entropy(logits, labels)
    tl = target_rate_loss(gates, targets, script)
    loss = ce + lossfact * tl
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    parts = {"loss": loss, "ce": ce, "target_loss": tl, "logits": logits, "gates": gates}
    return {k: v.detach() for k, v in parts.items()}


def load_variables(net: TorchResNet, variables: Mapping[str, Any], model: ResNet) -> None:
    """Copy our ``{"params", "batch_stats"}`` of ``model`` into ``net`` (reference naming)."""
    state = to_reference_state_dict(variables, model)
    missing, unexpected = net.load_state_dict(
        {k: torch.from_numpy(np.array(v)) for k, v in state.items()}, strict=False
    )
    if unexpected or any(not k.endswith("num_batches_tracked") for k in missing):
        raise ValueError(f"state dict does not fit: missing {missing}, unexpected {unexpected}")


def variables_of(net: TorchResNet, model: ResNet) -> dict[str, Any]:
    """``net``'s weights and running statistics as our ``{"params", "batch_stats"}``."""
    return convert_reference_state_dict(net.state_dict(), model).variables


def momentum_of(net: TorchResNet, optimizer: torch.optim.SGD, model: ResNet) -> Any:
    """The SGD momentum buffers of ``net``'s parameters, laid out as our ``params``."""
    state = dict(net.state_dict())
    for name, p in net.named_parameters():
        state[name] = optimizer.state[p]["momentum_buffer"]
    return convert_reference_state_dict(state, model).variables["params"]


def jax_gate_noise(
    model: ResNet, variables: Mapping[str, Any], images: jax.Array, rng: jax.Array
) -> np.ndarray:
    """The Gumbel noise [L, B, 2] our gates draw from ``rngs={"gumbel": rng}`` (0 for ungated).

    In a train step ``rng`` is ``fold_in(key, step)``. Each gate's call is replaced by one
    that draws its noise exactly as :class:`~aig_jax.model.gates.GumbelGate` does (its first
    ``make_rng("gumbel")``), records it and executes the block; the noise does not depend on
    the weights, only on the key, the gate's path and the batch size.
    """
    drawn: dict[str, np.ndarray] = {}

    def record(next_fun: Any, args: Any, kwargs: Any, context: Any) -> Any:
        module = context.module
        if not isinstance(module, GumbelGate) or context.method_name != "__call__":
            return next_fun(*args, **kwargs)
        ones = jax.numpy.ones(args[0].shape[0], jax.numpy.float32)
        noise = gumbel_noise(module.make_rng("gumbel"), (args[0].shape[0], 2))
        drawn[module.path[-2]] = np.asarray(noise)
        return GateOutput(ones, ones)

    x = jax.numpy.asarray(images)
    with nn.intercept_methods(record):
        model.apply(
            dict(variables),
            x,
            train=True,
            gate_mode="sample",
            rngs={"gumbel": rng},
            mutable=["batch_stats"],
        )
    infos = model.block_infos()
    zeros = np.zeros((x.shape[0], 2), np.float32)
    return np.stack([drawn.get(info.name, zeros) for info in infos])
