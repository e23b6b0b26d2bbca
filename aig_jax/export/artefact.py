"""Write an exported model: one zip file with a JSON manifest, the programs and the weights.

The layout (read by :mod:`aig_jax.export.runtime`, described in ``docs/architecture.md``):

- ``manifest.json``: versions, the model, the input it takes, its classes, per-block MACs,
  the gate mode and thresholds, each program's files and platforms, the weights' names,
  shapes, dtypes and offsets, and the SHA-256 of every other member;
- ``manifest.sha256``: the SHA-256 of ``manifest.json``;
- ``programs/<name>.jaxexport``: ``jax.export`` serialisations (``jax.export.deserialize``);
- ``programs/<name>.mlirbc``: the same programs' StableHLO (MLIR bytecode), for runtimes
  other than JAX;
- ``weights.bin``: every weight array, little-endian, C order, at the manifest's offsets.
"""

from __future__ import annotations

import json
import os
import zipfile
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np

from aig_jax import __version__
from aig_jax.export import runtime
from aig_jax.export.programs import PROGRAM_BRANCHES, export_programs, flat_weights
from aig_jax.model.flops import model_cost

#: Every weight starts at a multiple of this many bytes of ``weights.bin``.
ALIGNMENT = 64
#: Execution-rate threshold of argmax gates.
ARGMAX_THRESHOLD = 0.5
GATE_MODES = ("argmax", "calibrated")


def _weights_blob(names: list[str], arrays: list[np.ndarray]) -> tuple[bytes, list[dict]]:
    """``weights.bin`` and its manifest entries (name, shape, dtype, offset, nbytes)."""
    chunks, entries, offset = [], [], 0
    for name, array in zip(names, arrays, strict=True):
        data = np.ascontiguousarray(array, array.dtype.newbyteorder("<")).tobytes()
        pad = -offset % ALIGNMENT
        chunks += [b"\0" * pad, data]
        offset += pad
        entries.append(
            {
                "name": name,
                "shape": list(array.shape),
                "dtype": array.dtype.name,
                "offset": offset,
                "nbytes": len(data),
            }
        )
        offset += len(data)
    return b"".join(chunks), entries


def _thresholds(
    mode: str, thresholds: Sequence[float] | np.ndarray | None, num_blocks: int
) -> list[float]:
    """The [L] thresholds of gate ``mode``: 0.5 for argmax, the given ones for calibrated."""
    if mode not in GATE_MODES:
        raise ValueError(f"gate mode must be one of {GATE_MODES}, got {mode!r}")
    if mode == "argmax":
        if thresholds is not None:
            raise ValueError("thresholds are for gate mode 'calibrated', not 'argmax'")
        return [ARGMAX_THRESHOLD] * num_blocks
    if thresholds is None or len(thresholds) != num_blocks:
        found = None if thresholds is None else len(thresholds)
        raise ValueError(f"gate mode 'calibrated' needs {num_blocks} thresholds, got {found}")
    return [float(np.float32(t)) for t in thresholds]


def export_model(
    path: str,
    model: nn.Module,
    variables: Any,
    *,
    image_size: int,
    preprocess: str,
    mean: Sequence[float],
    std: Sequence[float],
    gate_mode: str = "argmax",
    thresholds: Sequence[float] | np.ndarray | None = None,
    platforms: Sequence[str] = ("cpu",),
    class_names: Sequence[str] | None = None,
    about: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Export ``model`` with ``variables`` ({"params", "batch_stats"}) to the file ``path``
    and return its manifest.

    The programs take uint8 images [B, image_size, image_size, 3] normalised by ``mean`` and
    ``std`` (per channel, 0–1 scale); ``preprocess`` names the evaluation transform ("cifar",
    "imagenet" or "none") a caller applies to images of other sizes. ``gate_mode`` "argmax"
    thresholds p(execute) at 0.5; "calibrated" at ``thresholds`` [L]. ``about`` (JSON-ready:
    the model spec, the checkpoint, the calibration) is kept in the manifest as it is.
    """
    cost = model_cost(model, image_size)
    num_blocks = len(cost.blocks)
    levels = _thresholds(gate_mode, thresholds, num_blocks)
    if class_names is not None and len(class_names) != model.num_classes:
        raise ValueError(f"{len(class_names)} class names for {model.num_classes} classes")
    names, arrays, treedef = flat_weights(variables)
    programs = export_programs(
        model,
        arrays,
        treedef,
        cost,
        image_size=image_size,
        mean=mean,
        std=std,
        platforms=platforms,
    )
    blob, entries = _weights_blob(names, arrays)
    files = {"weights.bin": blob}
    described = {}
    for name, exported in programs.items():
        files[f"programs/{name}.jaxexport"] = bytes(exported.serialize())
        files[f"programs/{name}.mlirbc"] = bytes(exported.mlir_module_serialized)
        described[name] = {
            "file": f"programs/{name}.jaxexport",
            "stablehlo": f"programs/{name}.mlirbc",
            "batch": 1 if name == "batch1" else "b",
            "gated_branch": PROGRAM_BRANCHES[name],
            "calling_convention_version": exported.calling_convention_version,
            "kept_inputs": sorted(exported.module_kept_var_idx),
        }
    manifest = {
        "format": runtime.FORMAT,
        "format_version": runtime.FORMAT_VERSION,
        "aig_jax_version": __version__,
        "jax_version": jax.__version__,
        "platforms": list(platforms),
        "about": about or {},
        "input": {
            "layout": "NHWC",
            "image_size": image_size,
            "channels": 3,
            "dtype": "uint8",
            "mean": [float(m) for m in mean],
            "std": [float(s) for s in std],
            "pixel_max": 255,
            "preprocess": preprocess,
        },
        "classes": {
            "num_classes": model.num_classes,
            "names": None if class_names is None else [str(n) for n in class_names],
        },
        "blocks": [
            {"name": b.name, "gated": b.gated, "branch_macs": b.branch_macs} for b in cost.blocks
        ],
        "macs": {"fixed": cost.fixed_macs, "all_blocks": cost.macs},
        "gates": {"mode": gate_mode, "thresholds": levels},
        "inputs": ["weights (flat list, weights.arrays order)", "thresholds [L]", "images"],
        "outputs": {"logits": "float32 [B, K]", "decisions": "bool [L, B]", "macs": "float32 [B]"},
        "programs": described,
        "weights": {"file": "weights.bin", "alignment": ALIGNMENT, "arrays": entries},
        "files": {name: runtime.sha256(data) for name, data in files.items()},
    }
    text = json.dumps(manifest, indent=1).encode()
    members = {runtime.MANIFEST_CHECKSUM: runtime.sha256(text).encode(), runtime.MANIFEST: text}
    _write_zip(path, {**members, **files})
    return manifest


def _write_zip(path: str, members: dict[str, bytes]) -> None:
    """Write ``members`` (name: bytes) uncompressed to the zip file ``path``, atomically."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    partial = path + ".partial"
    with zipfile.ZipFile(partial, "w", zipfile.ZIP_STORED) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    os.replace(partial, path)
