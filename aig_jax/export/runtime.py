"""Run a ConvNet-AIG exported by ``python -m aig_jax.export`` with nothing but jax and numpy.

This module imports nothing from aig_jax: copy this one file beside a service to serve an
exported model there::

    from runtime import Exported

    model = Exported.load("model.aig")  # verifies every checksum, version and the platform
    out = model(images)  # raw pixels, uint8 [B, S, S, 3]
    out.logits  # float32 [B, K]
    out.decisions  # bool [L, B]: the residual blocks each image executed
    out.macs  # float32 [B]: the multiply-accumulates each image cost

A batch of one runs the batch-1 program, in which the branch of every gated block sits under
``lax.cond`` on the image's decision, so a skipped block costs no time; a larger batch runs the
batched program (any batch size; every branch computed and multiplied by its decisions). The
artefact is a zip file: ``manifest.json`` (what the model expects and returns), its SHA-256 in
``manifest.sha256``, the serialised ``jax.export`` programs (and their StableHLO) and the
weights; ``docs/architecture.md`` of aig-jax describes it.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import zipfile
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import numpy as np

#: The ``format`` field of every manifest.
FORMAT = "aig-jax-export"
#: The newest artefact layout this runtime reads; a newer one is refused, not misread.
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
MANIFEST_CHECKSUM = "manifest.sha256"
#: The batch-1 skipping program and the batched (masked) one.
PROGRAMS = ("batch1", "batched")
#: The JAX backend that runs each export platform.
BACKENDS = {"cpu": "cpu", "cuda": "gpu", "rocm": "gpu", "tpu": "tpu"}


class ArtefactError(ValueError):
    """The artefact cannot be used here: unreadable, corrupt or truncated, written in a newer
    format, or not exported for this platform."""


class Outputs(NamedTuple):
    """What a model returns for B images of L residual blocks and K classes."""

    logits: np.ndarray  # float32 [B, K]
    decisions: np.ndarray  # bool [L, B]; a block without a gate always executes
    macs: np.ndarray  # float32 [B]


def sha256(data: bytes) -> str:
    """The SHA-256 of ``data`` as 64 hex digits."""
    return hashlib.sha256(data).hexdigest()


def read_artefact(path: str) -> tuple[dict[str, Any], dict[str, bytes]]:
    """(manifest, {member name: bytes}) of the artefact at ``path``, every checksum verified.

    Raises :class:`ArtefactError` when the file is missing, not a zip file, truncated,
    corrupt (a checksum differs), or written in a format newer than :data:`FORMAT_VERSION`.
    """
    if not os.path.isfile(path):
        raise ArtefactError(f"no exported model at {path}")
    try:
        with zipfile.ZipFile(path) as archive:
            files = {name: archive.read(name) for name in archive.namelist()}
    except (zipfile.BadZipFile, EOFError, OSError, ValueError) as err:
        raise ArtefactError(f"{path} is corrupt or truncated: {err}") from None
    if MANIFEST not in files or MANIFEST_CHECKSUM not in files:
        raise ArtefactError(f"{path} is not an exported aig-jax model (no {MANIFEST})")
    if files[MANIFEST_CHECKSUM].decode("ascii", "replace").strip() != sha256(files[MANIFEST]):
        raise ArtefactError(f"{path} is corrupt: the checksum of {MANIFEST} differs")
    manifest: dict[str, Any] = json.loads(files[MANIFEST])
    version = manifest.get("format_version")
    if manifest.get("format") != FORMAT or not isinstance(version, int):
        raise ArtefactError(f"{path} is not an exported aig-jax model (format {FORMAT!r})")
    if version > FORMAT_VERSION:
        raise ArtefactError(
            f"{path} was written in format version {version}, newer than this runtime reads "
            f"(up to {FORMAT_VERSION}): use the runtime of the aig-jax that exported it"
        )
    for name, digest in manifest["files"].items():
        if name not in files:
            raise ArtefactError(f"{path} is truncated: {name} is missing")
        if sha256(files[name]) != digest:
            raise ArtefactError(f"{path} is corrupt: the checksum of {name} differs")
    return manifest, files


def check_runnable(manifest: dict[str, Any], platform: str, path: str) -> None:
    """Raise :class:`ArtefactError` unless the programs of ``manifest`` were exported for
    ``platform`` ("cpu", "cuda", "rocm" or "tpu") in a calling convention this JAX runs."""
    exported_for = manifest["platforms"]
    if platform not in BACKENDS:
        raise ArtefactError(f"unknown platform {platform!r}; expected one of {', '.join(BACKENDS)}")
    if platform not in exported_for:
        raise ArtefactError(
            f"{path} was exported for {', '.join(exported_for)}, not {platform}: export it "
            f"again with --platforms {','.join([*exported_for, platform])}"
        )
    low = jax.export.minimum_supported_calling_convention_version
    high = jax.export.maximum_supported_calling_convention_version
    for name in PROGRAMS:
        version = manifest["programs"][name]["calling_convention_version"]
        if not low <= version <= high:
            raise ArtefactError(
                f"{path}: program {name} has calling convention version {version}; JAX "
                f"{jax.__version__} runs versions {low} to {high}: use a JAX release that does"
            )


def _weights(manifest: dict[str, Any], blob: bytes) -> list[np.ndarray]:
    """The weight arrays, in the programs' argument order, read from ``weights.bin``."""
    return [
        np.frombuffer(
            blob, np.dtype(a["dtype"]), count=int(np.prod(a["shape"])), offset=a["offset"]
        ).reshape(a["shape"])
        for a in manifest["weights"]["arrays"]
    ]


class Exported:
    """An exported ConvNet-AIG ready to run: build it with :meth:`load`, call it on images.

    Each compiled program holds the weights as constants; the batched program compiles once
    per batch size it meets, each with its copy, so a server should use a few fixed sizes.
    """

    def __init__(
        self,
        manifest: dict[str, Any],
        programs: dict[str, Any],
        weights: Sequence[np.ndarray],
        device: Any,
    ) -> None:
        self.manifest = manifest
        self.device = device
        self.weights = jax.device_put(list(weights), device)
        gates = manifest["gates"]
        self.thresholds = jax.device_put(np.asarray(gates["thresholds"], np.float32), device)
        # One jit per program (the batched one compiles once per batch size it meets), the
        # weights bound in: XLA compiles them as constants, laid out once rather than at every
        # call, and a call passes two arrays instead of one per weight.
        self._run = {
            name: jax.jit(functools.partial(programs[name].call, self.weights)) for name in PROGRAMS
        }

    @classmethod
    def load(cls, path: str, *, platform: str | None = None) -> Exported:
        """Read, verify and deserialise the artefact at ``path`` for ``platform`` (default:
        this machine's, e.g. "cpu" or "cuda"); the weights go onto its first device.

        Raises :class:`ArtefactError` (see :func:`read_artefact`, :func:`check_runnable`).
        """
        platform = platform or jax.export.default_export_platform()
        manifest, files = read_artefact(path)
        check_runnable(manifest, platform, path)
        try:
            device = jax.devices(BACKENDS.get(platform, platform))[0]
        except RuntimeError:
            raise ArtefactError(f"this machine has no {platform} device") from None
        programs = {
            name: jax.export.deserialize(bytearray(files[manifest["programs"][name]["file"]]))
            for name in PROGRAMS
        }
        weights = _weights(manifest, files[manifest["weights"]["file"]])
        return cls(manifest, programs, weights, device)

    @property
    def image_size(self) -> int:
        """S: the programs take images [B, S, S, channels]."""
        return int(self.manifest["input"]["image_size"])

    @property
    def class_names(self) -> list[str] | None:
        """The K class names, or None when the dataset has none."""
        names = self.manifest["classes"]["names"]
        return None if names is None else [str(n) for n in names]

    def __call__(
        self,
        images: np.ndarray,
        *,
        program: str | None = None,
        thresholds: np.ndarray | None = None,
    ) -> Outputs:
        """Classify raw ``images`` uint8 [B, S, S, channels] (normalised inside the program).

        ``program`` is "batch1" (B = 1 only) or "batched"; by default "batch1" for one image.
        ``thresholds`` [L] on p(execute) replace the artefact's (``manifest["gates"]``): a
        block executes an image where p(execute) > its threshold.
        """
        spec = self.manifest["input"]
        shape = (self.image_size, self.image_size, int(spec["channels"]))
        images = np.asarray(images)
        if images.dtype != np.dtype(spec["dtype"]) or images.ndim != 4 or images.shape[1:] != shape:
            raise ValueError(
                f"expected {spec['dtype']} images [B, {', '.join(map(str, shape))}], got "
                f"{images.dtype} {list(images.shape)}"
            )
        if len(images) == 0:
            raise ValueError("expected at least one image")
        program = program or ("batch1" if len(images) == 1 else "batched")
        if program not in PROGRAMS or (program == "batch1" and len(images) != 1):
            raise ValueError(f"program {program!r} cannot run {len(images)} images")
        thr = self.thresholds
        if thresholds is not None:  # no copy for float32 thresholds already on the device
            thr = jax.numpy.asarray(jax.device_put(thresholds, self.device), np.float32)
            if thr.shape != self.thresholds.shape:
                raise ValueError(f"expected thresholds {list(self.thresholds.shape)}")
        out = self._run[program](thr, jax.device_put(images, self.device))
        return Outputs(*(np.asarray(o) for o in out))
