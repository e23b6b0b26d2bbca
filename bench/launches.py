"""What one run of a compiled program launches, counted from what XLA's compiler wrote.

Two views of the same train step:

* :func:`kernel_launches` counts the kernels (and copies) of the optimised HLO module: the
  device work of a step, one entry per kernel.
* :func:`thunk_launches` reads the GPU compiler's thunk sequence (the executable's plan, after
  its thunk passes): XLA:GPU records runs of kernels into CUDA graphs ("command buffers") that
  the host launches with one call, and launches the rest (cuDNN convolutions, library custom
  calls, loop control) one by one. A step bound by launch overhead follows the host's calls;
  the kernels inside graphs cost the device a short gap each instead.

A third figure is what the compiler generated code for: :func:`compiled_kernels` counts the
kernels in the PTX it dumped. XLA reuses one kernel for identical fusions, so the count falls
when repeated blocks compile to the same code, and kernel code generation takes time in
proportion.

Loops count their body once per iteration (the HLO's known trip count; 1 if unknown) and their
condition once more than that; a conditional counts its costliest branch.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
from typing import NamedTuple

#: Instructions that launch nothing (bookkeeping); the ``-done`` half of an async pair is
#: left out too.
NO_LAUNCH = frozenset(
    "parameter constant get-tuple-element tuple bitcast after-all opt-barrier "
    "add-dependency partition-id replica-id".split()
)


def _computations(hlo_text: str) -> tuple[dict[str, list[tuple[str, str]]], str]:
    """The ``(opcode, line)`` of each instruction per computation of an HLO module's text, and
    the name of its entry computation."""
    computations: dict[str, list[tuple[str, str]]] = {}
    entry, current = "", None
    for line in hlo_text.splitlines():
        header = re.match(r"(ENTRY )?%?([\w.\-]+) \(.*\{\s*$", line)
        if header:
            current = computations.setdefault(header.group(2), [])
            entry = header.group(2) if header.group(1) else entry
            continue
        inst = re.match(r"\s+(?:ROOT )?%?[\w.\-]+ = (.*)$", line)
        if current is None or not inst:
            continue
        rest = inst.group(1)
        depth, i = 0, 0  # skip the shape: a tuple's has spaces inside its parentheses
        while i < len(rest) and (depth or rest[i] != " "):
            depth += {"(": 1, ")": -1}.get(rest[i], 0)
            i += 1
        current.append((rest[i + 1 :].split("(", 1)[0], line))
    return computations, entry


def _trip_count(line: str) -> int:
    """The known trip count of a ``while`` instruction's line (1 if XLA does not know it)."""
    trip = re.search(r'"known_trip_count":\{"n":"(\d+)"', line)
    return int(trip.group(1)) if trip else 1


def trip_counts(hlo_text: str) -> dict[str, int]:
    """The known trip count of every ``while`` instruction of an HLO module, by name."""
    found = re.finditer(r"^\s+(?:ROOT )?%?([\w.\-]+) = .* while\(.*$", hlo_text, re.MULTILINE)
    return {m.group(1): _trip_count(m.group(0)) for m in found}


def kernel_launches(hlo_text: str) -> int:
    """Kernels (and copies) that one run of a compiled HLO module launches: every instruction
    of its entry computation that computes, a ``while`` loop's body and condition once per
    iteration (its known trip count; 1 if unknown), a ``call``'s callee and a
    ``conditional``'s costliest branch."""
    computations, entry = _computations(hlo_text)

    @functools.cache
    def launches(name: str) -> int:
        total = 0
        for opcode, line in computations.get(name, []):
            if opcode in NO_LAUNCH or opcode.endswith("-done"):
                continue
            if opcode == "while":
                body = re.search(r"body=%?([\w.\-]+)", line)
                cond = re.search(r"condition=%?([\w.\-]+)", line)
                n = _trip_count(line)
                c = launches(cond.group(1)) if cond else 0
                total += n * ((launches(body.group(1)) if body else 0) + c) + c
            elif opcode == "call":
                callee = re.search(r"to_apply=%?([\w.\-]+)", line)
                total += launches(callee.group(1)) if callee else 1
            elif opcode == "conditional":
                branches = re.findall(r"%([\w.\-]+)", line.split("branch_computations=", 1)[-1])
                total += max((launches(b) for b in branches if b in computations), default=1)
            else:
                total += 1
        return total

    return launches(entry)


@dataclasses.dataclass(frozen=True)
class Launches:
    """What one run of a thunk sequence launches: CUDA graphs, other launches from the host,
    and the kernels (and copies) inside the graphs."""

    graphs: int = 0
    other: int = 0
    graph_kernels: int = 0

    def __add__(self, o: Launches) -> Launches:
        return Launches(
            self.graphs + o.graphs, self.other + o.other, self.graph_kernels + o.graph_kernels
        )

    def __mul__(self, n: int) -> Launches:
        return Launches(self.graphs * n, self.other * n, self.graph_kernels * n)


NONE = Launches()


class Thunk(NamedTuple):
    """One line of a thunk sequence: its kind, id, nested thunks (a graph's contents, a fused
    thunk's parts) and labelled sections (a loop's ``condition`` and ``body``)."""

    kind: str
    id: int
    children: list[Thunk]
    sections: dict[str, list[Thunk]]


_THUNK = re.compile(r"^( *)(\d+): (k\w+)")
_SECTION = re.compile(r"^( *)([\w ]+):\s*$")


def parse_thunks(text: str) -> list[Thunk]:
    """The thunks of XLA:GPU's ``*.thunk_sequence_after_thunk_passes.txt`` dump as a tree.

    A nested thunk is indented below its parent; a loop's thunks follow ``condition:`` and
    ``body:`` lines, indented further.
    """
    lines = [line for line in text.splitlines() if _THUNK.match(line) or _SECTION.match(line)]

    def indent(i: int) -> int:
        return len(lines[i]) - len(lines[i].lstrip(" "))

    def block(i: int, deeper_than: int) -> tuple[list[Thunk], int]:
        """The thunks from line ``i`` on that are indented more than ``deeper_than`` and at
        the indentation of the first of them, with what they contain."""
        out: list[Thunk] = []
        level = indent(i) if i < len(lines) else 0
        while i < len(lines) and indent(i) > deeper_than and indent(i) == level:
            m = _THUNK.match(lines[i])
            if m is None:  # a section label belongs to the thunk before this block
                break
            thunk = Thunk(m.group(3), int(m.group(2)), [], {})
            i += 1
            if i < len(lines) and _THUNK.match(lines[i]) and indent(i) > level:
                children, i = block(i, level)
                thunk.children.extend(children)
            while i < len(lines) and (s := _SECTION.match(lines[i])) and indent(i) >= level:
                thunks, i = block(i + 1, indent(i))
                thunk.sections[s.group(2).strip()] = thunks
            out.append(thunk)
        return out, i

    return block(0, -1)[0]


def thunk_names(metadata_text: str) -> dict[int, str]:
    """The HLO instruction each thunk id stands for, from XLA:GPU's ``*.thunk_metadata.txt``."""
    found = re.finditer(r'profile_annotation: "([^"]+)"\s+thunk_id: (\d+)', metadata_text)
    return {int(m.group(2)): m.group(1) for m in found}


def thunk_launches(thunks: list[Thunk], trips: dict[int, int]) -> Launches:
    """What one run of ``thunks`` launches (see :class:`Launches`); ``trips`` gives the trip
    count of a loop thunk by its id (1 where missing)."""

    def launches(thunk: Thunk, in_graph: bool) -> Launches:
        """``thunk``'s launches; inside a graph, what would be a launch is a graph kernel."""

        def run(thunks: list[Thunk]) -> Launches:
            return sum((launches(t, in_graph) for t in thunks), NONE)

        if thunk.kind == "kCommandBuffer":
            return Launches(graphs=1) + sum((launches(t, True) for t in thunk.children), NONE)
        if thunk.kind == "kSequential":
            return run(thunk.children)
        if thunk.kind == "kWhile":
            cond = run(thunk.sections.get("condition", []))
            return (run(thunk.sections.get("body", [])) + cond) * trips.get(thunk.id, 1) + cond
        if thunk.sections:  # a conditional: its costliest branch
            branches = [run(ts) for ts in thunk.sections.values()]
            return max(branches, key=lambda b: (b.graphs + b.other, b.graph_kernels))
        if thunk.kind.endswith("Done"):
            return NONE
        return Launches(graph_kernels=1) if in_graph else Launches(other=1)

    return sum((launches(t, False) for t in thunks), NONE)


def dumped_launches(dump_dir: str, hlo_text: str) -> Launches | None:
    """:func:`thunk_launches` of the one GPU executable whose thunk sequence XLA dumped into
    ``dump_dir`` (``--xla_dump_to``): the sequence after XLA's thunk passes, or the sequence
    itself when no pass changed it. ``hlo_text`` is its optimised HLO, for loop trip counts.
    None when no thunk sequence was dumped (XLA:CPU writes none)."""
    files = os.listdir(dump_dir)
    for suffix in (".thunk_sequence_after_thunk_passes.txt", ".thunk_sequence.txt"):
        found = sorted(f for f in files if f.endswith(suffix))
        if found:
            break
    else:
        return None
    if len(found) > 1:
        raise ValueError(f"{dump_dir} holds the thunk sequences of several programs: {found}")
    with open(os.path.join(dump_dir, found[0])) as f:
        thunks = parse_thunks(f.read())
    metadata = os.path.join(dump_dir, found[0].replace(suffix, ".thunk_metadata.txt"))
    names = {}
    if os.path.exists(metadata):
        with open(metadata) as f:
            names = thunk_names(f.read())
    loops = trip_counts(hlo_text)
    return thunk_launches(thunks, {i: loops[n] for i, n in names.items() if n in loops})


def compiled_kernels(dump_dir: str) -> int | None:
    """Kernels the GPU compiler generated code for, from the PTX it dumped into ``dump_dir``
    (``--xla_dump_to``): the entry points of all ``.ptx`` files. XLA reuses one kernel for
    fusions with the same code, so this is at most the number of kernels a step launches.
    None when no PTX was dumped (XLA:CPU writes none)."""
    found = [f for f in os.listdir(dump_dir) if f.endswith(".ptx")]
    if not found:
        return None
    entries = 0
    for name in found:
        with open(os.path.join(dump_dir, name)) as f:
            entries += sum(1 for line in f if line.startswith(".visible .entry "))
    return entries
