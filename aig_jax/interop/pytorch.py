"""PyTorch ⇄ Flax weights of ConvNet-AIG ResNets.

Two PyTorch namings are understood:

* ``"reference"``: andreasveit/convnet-aig (``ResNet110_cifar``, ``ResNet50_ImageNet``, ...):
  ``conv1, bn1, layer{s}.{b}.conv{k}/bn{k}, layer{s}.{b}.shortcut.0/.1, layer{s}.{b}.fc1/fc1bn/fc2,
  linear``. Every reference block has a gate, whatever its target rate.
* ``"torchvision"``: ``torchvision.models.resnet*`` (v1.5: the bottleneck's stride is on its
  3×3 convolution, as ours): ``downsample.0/.1`` for the shortcut, ``fc`` for the head, no gates.

:func:`key_map` writes the correspondence down once; both directions are derived from it. A
tensor's layout says how it is transposed: convolutions OIHW ⇄ HWIO, the gate's 1×1
convolutions [out, in, 1, 1] ⇄ Dense [in, out], the head [out, in] ⇄ [in, out]; BatchNorm
``weight, bias, running_mean, running_var`` become ``params`` scale, bias and ``batch_stats``
mean, var (``num_batches_tracked`` is ignored). Our rate-1 blocks have no gate: their reference
gate weights are dropped on the way in and replaced by an always-open gate on the way out.

PyTorch is optional (``pip install -e .[torch]``): only :func:`load_torch_state_dict` and
:func:`save_torch_state_dict` import it; the conversions work on NumPy arrays or tensors.
"""

from __future__ import annotations

import functools
import pickle
from collections.abc import Callable, Iterable, Mapping
from types import ModuleType
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from aig_jax.errors import ConfigError, DataError
from aig_jax.model.resnet import ResNet
from aig_jax.model.variables import abstract_variables

Naming = Literal["reference", "torchvision"]
Path = tuple[str, ...]  # (collection, module, ..., variable), e.g. ("params", "conv1", "kernel")

#: Logit margin of the always-open gate written for our ungated blocks: fc2 has weight 0 and
#: bias (-1e4, +1e4), so "execute" wins for every input, also against the reference's Gumbel
#: noise -log(eps - log(u + eps)), which its eps of 1e-10 bounds to about [-3.2, 37].
OPEN_GATE_LOGIT = 1e4

_SHORTCUT = {"reference": "shortcut", "torchvision": "downsample"}
_HEAD = {"reference": "linear", "torchvision": "fc"}


class Layout(NamedTuple):
    """How one tensor is stored on each side: PyTorch → Flax and back."""

    to_flax: Callable[[np.ndarray], np.ndarray]
    to_torch: Callable[[np.ndarray], np.ndarray]


CONV = Layout(lambda w: w.transpose(2, 3, 1, 0), lambda k: k.transpose(3, 2, 0, 1))
GATE_CONV = Layout(lambda w: w[:, :, 0, 0].T, lambda k: k.T[:, :, None, None])
LINEAR = Layout(lambda w: w.T, lambda k: k.T)
VECTOR = Layout(lambda v: v, lambda v: v)


class Entry(NamedTuple):
    """One tensor: its PyTorch key, its Flax path and layout, and the block whose gate it is."""

    torch_key: str
    path: Path
    layout: Layout
    gate_of: str | None = None


class Converted(NamedTuple):
    """Result of a PyTorch → Flax conversion.

    ``variables`` is ``{"params": ..., "batch_stats": ...}`` of float32 NumPy arrays;
    ``dropped_gates`` names the blocks whose checkpoint gate was discarded (ungated here) and
    ``initialised_gates`` those whose gate was freshly initialised (absent in the checkpoint).
    """

    variables: dict[str, Any]
    dropped_gates: tuple[str, ...]
    initialised_gates: tuple[str, ...]


_LAYOUTS = {"conv": CONV, "gate_conv": GATE_CONV, "linear": LINEAR}


def _layer(kind: str, torch_name: str, path: Path, gate_of: str | None = None) -> list[Entry]:
    """Entries of one PyTorch layer; ``path`` is the Flax module path without the collection."""
    if kind == "bn":
        return [
            Entry(f"{torch_name}.{t}", (collection, *path, f), VECTOR, gate_of)
            for t, collection, f in (
                ("weight", "params", "scale"),
                ("bias", "params", "bias"),
                ("running_mean", "batch_stats", "mean"),
                ("running_var", "batch_stats", "var"),
            )
        ]
    weight = Entry(f"{torch_name}.weight", ("params", *path, "kernel"), _LAYOUTS[kind], gate_of)
    if kind == "conv":
        return [weight]
    return [weight, Entry(f"{torch_name}.bias", ("params", *path, "bias"), VECTOR, gate_of)]


def key_map(model: ResNet, naming: Naming) -> list[Entry]:
    """Every tensor of ``model`` with its PyTorch key under ``naming``, in PyTorch order.

    Gate entries are listed for every block, gated or not (the reference gates all blocks);
    their keys follow the reference naming, torchvision having no gates.
    """
    if naming not in _SHORTCUT:
        raise ConfigError(f"unknown naming {naming!r}; expected one of {sorted(_SHORTCUT)}")
    entries = _layer("conv", "conv1", ("conv1",)) + _layer("bn", "bn1", ("bn1",))
    for info in model.block_infos():
        torch_prefix, path = f"layer{info.stage}.{info.index}", (info.name,)
        specs = info.block_cls.conv_specs(info.in_features, info.features, info.strides)
        for k in range(1, 1 + sum(spec.part == "branch" for spec in specs)):
            entries += _layer("conv", f"{torch_prefix}.conv{k}", (*path, f"conv{k}"))
            entries += _layer("bn", f"{torch_prefix}.bn{k}", (*path, f"bn{k}"))
        if info.downsampling:
            shortcut = f"{torch_prefix}.{_SHORTCUT[naming]}"
            entries += _layer("conv", f"{shortcut}.0", (*path, "shortcut_conv"))
            entries += _layer("bn", f"{shortcut}.1", (*path, "shortcut_bn"))
        gate = (*path, "gate")
        for kind, name in (("gate_conv", "fc1"), ("bn", "fc1bn"), ("gate_conv", "fc2")):
            entries += _layer(kind, f"{torch_prefix}.{name}", (*gate, name), info.name)
    return entries + _layer("linear", _HEAD[naming], ("linear",))


def _check_model(model: Any) -> ResNet:
    if not isinstance(model, ResNet):
        raise ConfigError(
            f"conversion needs an aig_jax.model.resnet.ResNet, got {type(model).__name__}"
        )
    return model


def _describe(model: ResNet) -> str:
    return (
        f"ResNet(stage_sizes={tuple(model.stage_sizes)}, block={model.block_cls.__name__}, "
        f"stem={model.stem!r}, num_classes={model.num_classes})"
    )


def _shape(shape: Iterable[int]) -> str:
    return "(" + ", ".join(str(d) for d in shape) + ")"


def _torch_shape(layout: Layout, flax_shape: tuple[int, ...]) -> tuple[int, ...]:
    # Transposes a zero-size-in-memory broadcast view, so the shape rule is the layout itself.
    return tuple(layout.to_torch(np.broadcast_to(np.float32(0), flax_shape)).shape)


def _raise_problems(what: str, problems: Mapping[str, list[str]]) -> None:
    lines = [
        f"  {len(items)} {kind}: {', '.join(items)}" for kind, items in problems.items() if items
    ]
    if lines:
        raise ConfigError("\n".join([what, *lines]))


def _template(model: ResNet, naming: Naming, in_channels: int) -> dict[Entry, Any]:
    """The ShapeDtypeStruct of every entry of :func:`key_map`, gates of ungated blocks included.

    Raises ``ValueError`` if the key map and the model's variables disagree (a block or gate
    of a fork that does not follow the reference layout).
    """
    abstract = abstract_variables(model.clone(gated=True), (32, 32, in_channels))
    leaves = traverse_util.flatten_dict(abstract)
    entries = key_map(model, naming)
    paths = {e.path for e in entries}
    _raise_problems(
        f"the variables of {_describe(model)} do not follow the {naming} layout:",
        {
            "variables without a PyTorch name": ["/".join(p) for p in leaves if p not in paths],
            "names of absent variables": [e.torch_key for e in entries if e.path not in leaves],
        },
    )
    return {e: leaves[e.path] for e in entries}


def _as_numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch.Tensor, converted without importing torch
        return np.asarray(value.detach().cpu().float().numpy())
    return np.asarray(value)


def _numpy_state_dict(state_dict: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """NumPy copy without DataParallel's ``module.`` prefix and ``num_batches_tracked``."""
    strip = bool(state_dict) and all(k.startswith("module.") for k in state_dict)
    return {
        (k.removeprefix("module.") if strip else k): _as_numpy(v)
        for k, v in state_dict.items()
        if not k.endswith("num_batches_tracked")
    }


def _block_gated(model: ResNet) -> dict[str, bool]:
    return {info.name: info.gated for info in model.block_infos()}


def _kept(template: Mapping[Entry, Any], gated: Mapping[str, bool]) -> dict[Path, tuple[int, ...]]:
    """Flax path → shape of the variables the model has: no gates in its ungated blocks."""
    return {
        e.path: tuple(leaf.shape)
        for e, leaf in template.items()
        if e.gate_of is None or gated[e.gate_of]
    }


def _check_tree(
    flat: Mapping[Path, Any], expected: Mapping[Path, tuple[int, ...]], what: str
) -> None:
    def name(path: Path) -> str:
        return "/".join(path)

    _raise_problems(
        what,
        {
            "missing variables": [name(p) for p in expected if p not in flat],
            "unexpected variables": [name(p) for p in flat if p not in expected],
            "mis-shaped variables": [
                f"{name(p)} (given {_shape(np.shape(v))}, model {_shape(expected[p])})"
                for p, v in flat.items()
                if p in expected and np.shape(v) != expected[p]
            ],
        },
    )


def _fresh_gates(model: ResNet, blocks: set[str], seed: int) -> dict[Path, np.ndarray]:
    """Newly initialised gate variables of ``blocks``, block i from ``fold_in(key(seed), i)``."""
    flat: dict[Path, np.ndarray] = {}
    for i, info in enumerate(model.block_infos()):
        if info.name in blocks:
            key = jax.random.fold_in(jax.random.key(seed), i)
            x = jnp.zeros((1, 1, 1, info.in_features), jnp.float32)
            gate = model.gate_cls(norm=functools.partial(model.norm, use_running_average=True))
            variables = gate.init({"params": key}, x, train=False, mode="argmax")
            for path, value in traverse_util.flatten_dict(dict(variables)).items():
                flat[(path[0], info.name, "gate", *path[1:])] = np.asarray(value)
    return flat


def _from_torch(
    state_dict: Mapping[str, Any], model: ResNet, naming: Naming, seed: int
) -> Converted:
    sd = _numpy_state_dict(state_dict)
    stem = sd.get("conv1.weight")
    in_channels = stem.shape[1] if stem is not None and stem.ndim == 4 else 3
    template = _template(model, naming, in_channels)
    gated = _block_gated(model)
    flat: dict[Path, np.ndarray] = {}
    missing: list[str] = []
    mismatched: list[str] = []
    used: set[str] = set()
    dropped: set[str] = set()
    fresh: set[str] = set()
    for entry, leaf in template.items():
        block = entry.gate_of
        if block is not None and naming == "torchvision":  # torchvision has no gates
            if gated[block]:
                fresh.add(block)
            continue
        used.add(entry.torch_key)
        value = sd.get(entry.torch_key)
        if block is not None and not gated[block]:  # ungated here: the gate is dropped
            if value is not None:
                dropped.add(block)
            continue
        expected = _torch_shape(entry.layout, leaf.shape)
        if value is None:
            missing.append(entry.torch_key)
        elif value.shape != expected:
            mismatched.append(
                f"{entry.torch_key} (checkpoint {_shape(value.shape)}, model {_shape(expected)})"
            )
        else:
            flat[entry.path] = entry.layout.to_flax(value).astype(leaf.dtype)
    _raise_problems(
        f"the {naming} state dict does not fit {_describe(model)}:",
        {
            "missing keys": missing,
            "unexpected keys": sorted(set(sd) - used),
            "mis-shaped tensors": mismatched,
        },
    )
    flat.update(_fresh_gates(model, fresh, seed))
    what = f"the fresh gates of {_describe(model)} do not have the reference gate's layers:"
    _check_tree(flat, _kept(template, gated), what)
    order = [info.name for info in model.block_infos()]
    return Converted(
        traverse_util.unflatten_dict(flat),
        tuple(n for n in order if n in dropped),
        tuple(n for n in order if n in fresh),
    )


def convert_reference_state_dict(state_dict: Mapping[str, Any], model: ResNet) -> Converted:
    """Flax variables of ``model`` from a state dict of the reference PyTorch code.

    ``state_dict`` maps reference keys (optionally prefixed ``module.``) to tensors or arrays,
    e.g. ``layer2.0.conv1.weight`` [out, in, 3, 3]. Gates of blocks that ``model`` leaves
    ungated are dropped (listed in ``dropped_gates``). Raises ``ValueError`` listing every
    missing, unexpected and mis-shaped key.
    """
    return _from_torch(state_dict, _check_model(model), "reference", 0)


def convert_torchvision_state_dict(
    state_dict: Mapping[str, Any], model: ResNet, *, seed: int = 0
) -> Converted:
    """Flax variables of ``model`` from a torchvision ResNet state dict, for fine-tuning.

    torchvision has no gates: the gates of ``model``'s gated blocks are freshly initialised,
    the gate of block i from ``jax.random.fold_in(jax.random.key(seed), i)`` (listed in
    ``initialised_gates``). Raises ``ValueError`` listing every missing, unexpected and
    mis-shaped key.
    """
    return _from_torch(state_dict, _check_model(model), "torchvision", seed)


def _open_gate(path: Path, shape: tuple[int, ...]) -> np.ndarray:
    """A tensor of the always-open gate: fc2 bias (-1e4, 1e4), BN scale/var 1, the rest 0."""
    if path[-2:] == ("fc2", "bias"):
        return np.array([-OPEN_GATE_LOGIT, OPEN_GATE_LOGIT], np.float32)
    return np.full(shape, 1.0 if path[-1] in ("scale", "var") else 0.0, np.float32)


def to_reference_state_dict(variables: Mapping[str, Any], model: ResNet) -> dict[str, np.ndarray]:
    """A state dict of the reference PyTorch code (no ``module.`` prefix) from Flax variables.

    ``variables`` is ``{"params", "batch_stats"}`` of ``model``. The reference gates every
    block, so each of our ungated blocks gets an always-open gate (fc1 and fc2 weights 0,
    fc2 bias (-1e4, +1e4)): the reference then executes it for every image, as we do. Values
    are float32 arrays in PyTorch layout, e.g. ``conv1.weight`` [64, 3, 7, 7];
    ``num_batches_tracked`` is omitted (PyTorch fills it in on loading).
    """
    model = _check_model(model)
    flat = traverse_util.flatten_dict(dict(variables))
    stem = flat.get(("params", "conv1", "kernel"))
    in_channels = np.shape(stem)[2] if stem is not None and np.ndim(stem) == 4 else 3
    template = _template(model, "reference", in_channels)
    gated = _block_gated(model)
    _check_tree(flat, _kept(template, gated), f"the variables do not fit {_describe(model)}:")
    return {
        e.torch_key: np.ascontiguousarray(
            e.layout.to_torch(
                np.asarray(flat[e.path], np.float32)
                if e.path in flat
                else _open_gate(e.path, tuple(leaf.shape))
            )
        )
        for e, leaf in template.items()
    }


def _import_torch() -> ModuleType:
    try:
        import torch
    except ImportError as err:
        raise ImportError(
            "PyTorch checkpoints need the optional dependency torch: pip install -e '.[torch]'"
        ) from err
    return torch


def load_torch_state_dict(path: str) -> dict[str, np.ndarray]:
    """The state dict in a PyTorch file, as float32 NumPy arrays in PyTorch layout.

    Accepts a checkpoint dict with a ``state_dict`` entry (the reference's
    ``model_best.pth.tar``) or a bare state dict (torchvision). Strips DataParallel's
    ``module.`` prefix and drops ``num_batches_tracked``. Loads with ``weights_only=True``:
    pickled code is refused.
    """
    torch = _import_torch()
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise DataError(
            f"{path} holds more than tensors and plain containers, which is not loaded: if you "
            "trust it, re-save its state dict with torch.save(torch.load(path, "
            f"weights_only=False)['state_dict'], new_path) ({err})"
        ) from err
    if isinstance(obj, Mapping) and "state_dict" in obj:
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not all(isinstance(k, str) for k in obj):
        raise DataError(
            f"{path} holds a {type(obj).__name__}, expected a state dict (str → tensor) or a "
            "dict with a 'state_dict' entry"
        )
    return _numpy_state_dict(obj)


def save_torch_state_dict(path: str, state_dict: Mapping[str, np.ndarray]) -> None:
    """Write ``{"state_dict": {key: tensor}}`` with ``torch.save``, as the reference saves."""
    torch = _import_torch()
    tensors = {k: torch.from_numpy(np.array(v, np.float32)) for k, v in state_dict.items()}
    torch.save({"state_dict": tensors}, path)
