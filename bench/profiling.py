"""Where a step's time goes, and where its compile time goes, from JAX profiler traces.

``profile_step`` runs a step a few times under ``jax.profiler.trace`` and sums, per step, the
time of every operation of the compiled program that the trace records (GPU/TPU kernels on a
device; the CPU backend's thunks otherwise). Each operation is named by its HLO instruction
(``fusion.12``, ``cudnn-conv.3``, …); the ``op_name`` metadata of that instruction in the
compiled HLO says which part of the model it came from, so the gates' share can be read off.
Summed kernel time well below the step's wall time means the step waits on kernel launches
rather than on arithmetic or memory.

``profile_compile`` traces one compilation: the compiler's named phases (XLA's passes, kernel
code generation, autotuning where the backend has it), each with its time and how often it ran,
which say what makes one model compile slower than another.
"""

from __future__ import annotations

import glob
import re
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Collection, Iterable
from typing import Any

import jax
from jax.profiler import ProfileData

_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+) = .*?metadata=\{[^}]*op_name=\"([^\"]*)\"")


def op_names(hlo_text: str) -> dict[str, str]:
    """Instruction name → ``op_name`` metadata (the JAX name stack) of a compiled HLO module."""
    matches = (_INSTRUCTION.match(line) for line in hlo_text.splitlines())
    return {m.group(1): m.group(2) for m in matches if m}


def _module_name(hlo_text: str) -> str | None:
    match = re.match(r"HloModule\s+([\w.\-]+)", hlo_text)
    return match.group(1) if match else None


def op_durations(
    profile: ProfileData, module: str | None, instructions: Collection[str] = ()
) -> list[tuple[str, float]]:
    """(HLO instruction, seconds) of every recorded operation of ``module`` (None: any module).

    Device planes are read when they hold operations (kernels on a GPU or TPU); otherwise the
    host planes (the CPU backend runs its operations there). A kernel that XLA:GPU launched
    from a command buffer (a CUDA graph) is recorded under the buffer's name; it is named by
    its kernel instead where that is one of ``instructions`` with ``.`` written ``_`` (XLA's
    name for a fusion's kernel), and by the buffer otherwise (library kernels).
    """
    kernels = {name.replace(".", "_"): name for name in instructions}

    def collect(device: bool) -> list[tuple[str, float]]:
        out = []
        for plane in profile.planes:
            if plane.name.startswith("/device:") != device:
                continue
            for line in plane.lines:
                for event in line.events:
                    stats = dict(event.stats)
                    op = stats.get("hlo_op")
                    if op is None or (module is not None and stats.get("hlo_module") != module):
                        continue
                    op = kernels.get(event.name, op) if op not in instructions else op
                    out.append((str(op), event.duration_ns * 1e-9))
        return out

    return collect(device=True) or collect(device=False)


def profile_step(step: Callable[[], Any], hlo_text: str, steps: int = 3) -> dict[str, Any]:
    """Trace ``steps`` calls of ``step`` (already compiled and warmed up) and summarise them.

    Returns, per step: ``ops`` (operations run), ``op_ms`` (their summed time, ms),
    ``gate_op_ms`` (those whose name stack passes through a ``gate`` module), and ``top``: the
    10 instructions with the most time, each ``[instruction, op_name, ms per step]``.
    """
    names = op_names(hlo_text)

    def run() -> None:
        for _ in range(steps):
            jax.block_until_ready(step())

    _, profile = _trace(run)
    durations = op_durations(profile, _module_name(hlo_text), names.keys()) or op_durations(
        profile, None, names.keys()
    )
    per_op: dict[str, float] = defaultdict(float)
    for op, seconds in durations:
        per_op[op] += seconds / steps
    gate = sum(s for op, s in per_op.items() if "/gate/" in names.get(op, ""))
    top = sorted(per_op.items(), key=lambda kv: -kv[1])[:10]
    return {
        "ops": len(durations) / steps,
        "op_ms": 1e3 * sum(per_op.values()),
        "gate_op_ms": 1e3 * gate,
        "top": [[op, names.get(op, ""), 1e3 * s] for op, s in top],
    }


def _trace(run: Callable[[], Any]) -> tuple[Any, ProfileData]:
    """``run()`` under the JAX profiler, Python's function calls not traced: its result and
    the recorded trace."""
    options = jax.profiler.ProfileOptions()
    options.python_tracer_level = 0
    with tempfile.TemporaryDirectory() as logdir:
        with jax.profiler.trace(logdir, profiler_options=options):
            out = run()
        (path,) = glob.glob(f"{logdir}/**/*.xplane.pb", recursive=True)
        return out, ProfileData.from_file(path)


def compile_phases(profile: ProfileData, top: int = 15) -> list[list[Any]]:
    """The ``top`` named host events with the most time: ``[name, seconds, count]`` each.

    Seconds are inclusive (nested events count in their parent too) and summed over threads
    and calls; an event nested in another of the same name on the same thread counts once.
    Python function events (names starting ``$``) are left out.
    """
    seconds: dict[str, float] = defaultdict(float)
    counts: dict[str, int] = defaultdict(int)
    for plane in profile.planes:
        if plane.name.startswith("/device:"):
            continue
        for line in plane.lines:
            _outermost(((e.start_ns, e.duration_ns, e.name) for e in line.events), seconds, counts)
    ranked = sorted(seconds.items(), key=lambda kv: -kv[1])[:top]
    return [[name, s, counts[name]] for name, s in ranked]


def _outermost(
    events: Iterable[tuple[float, float, str]],
    seconds: dict[str, float],
    counts: dict[str, int],
) -> None:
    """Add one thread's ``(start ns, duration ns, name)`` events to ``seconds`` and ``counts``,
    the time of an event inside another of its name counted once."""
    open_events: list[tuple[float, str]] = []  # (end, name) of the events enclosing this one
    for start, duration, name in sorted(events, key=lambda e: (e[0], -e[1])):
        if name.startswith("$"):
            continue
        while open_events and open_events[-1][0] <= start:
            open_events.pop()
        counts[name] += 1
        if all(name != enclosing for _, enclosing in open_events):
            seconds[name] += duration * 1e-9
        open_events.append((start + duration, name))


def profile_compile(
    lowered: Any, top: int = 15, compiler_options: dict[str, Any] | None = None
) -> tuple[Any, dict[str, Any]]:
    """Compile ``lowered`` (a ``jax.stages.Lowered``, with XLA's ``compiler_options`` if any)
    under the profiler.

    Returns the compiled executable and ``{"compile_s": wall seconds, "phases": ...}`` with
    the ``top`` phases of :func:`compile_phases`.
    """

    def timed() -> tuple[Any, float]:
        start = time.perf_counter()
        compiled = lowered.compile(compiler_options=compiler_options)
        return compiled, time.perf_counter() - start

    (compiled, seconds), profile = _trace(timed)
    return compiled, {"compile_s": seconds, "phases": compile_phases(profile, top)}
