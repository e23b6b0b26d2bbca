"""What one run of a compiled program launches, counted from what XLA's compiler wrote.

:func:`kernel_launches` counts the kernels (and copies) of the optimised HLO module: the device
work of a step, one entry per kernel. Loops count their body once per iteration (the HLO's
known trip count; 1 if unknown) and their condition once more than that; a conditional counts
its costliest branch.

:func:`compiled_kernels` counts what the GPU compiler generated code for: the kernels in the
PTX it dumped. XLA reuses one kernel for identical fusions, so the count falls when repeated
blocks compile to the same code, and kernel code generation takes time in proportion.
"""

from __future__ import annotations

import functools
import os
import re

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
