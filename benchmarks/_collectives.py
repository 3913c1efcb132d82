"""Bytes a compiled XLA program moves through collectives, read from its HLO text.

Not a test module and not part of the library: ``memory.py --collectives`` uses it.

Each collective op (all-reduce, reduce-scatter, all-gather, all-to-all,
collective-permute; the ``-start`` half of an async pair) counts the bytes of its
result on one device. A ``while`` body counts ``known_trip_count`` times (XLA writes
it for scans; a loop without one counts once and is reported). A ``conditional``
runs one branch: a steady step is counted with each conditional's cheapest branch
and a refresh step with its costliest, so GaLore's refresh (a ``lax.cond``) shows
on its own line.
"""

from __future__ import annotations

import re
from typing import NamedTuple

KINDS = ("all-reduce", "reduce-scatter", "all-gather", "all-to-all", "collective-permute")
_DTYPE_BYTES = {
    "pred": 1,
    "s8": 1,
    "u8": 1,
    "s16": 2,
    "u16": 2,
    "f16": 2,
    "bf16": 2,
    "s32": 4,
    "u32": 4,
    "f32": 4,
    "s64": 8,
    "u64": 8,
    "f64": 8,
    "c64": 8,
    "c128": 16,
}
_HEADER = re.compile(r"^(?:ENTRY )?%(\S+) \(.*\{\s*$")
_OP = re.compile(r"^\s*(?:ROOT )?%\S+ = (.+?) ([a-z][a-z0-9-]*)\(")
_ARRAY = re.compile(r"\b([a-z]+\d*)\[([\d,]*)\]")
_TRIP = re.compile(r'known_trip_count"\s*:\s*\{\s*"n"\s*:\s*"(\d+)"')
_BODY = re.compile(r"\bbody=%([\w.\-]+)")
_CALLS = re.compile(r"\bcalls=%([\w.\-]+)")
_BRANCHES = re.compile(r"\bbranch_computations=\{([^}]*)\}")
_TRUE_FALSE = re.compile(r"\b(?:true|false)_computation=%([\w.\-]+)")


class Bytes(NamedTuple):
    """Per collective kind: bytes on a steady step and on a refresh step (one device)."""

    steady: dict
    refresh: dict
    loops_without_trip_count: int


def shape_bytes(shape: str) -> int:
    """Bytes of an HLO result shape (an array or a tuple of arrays)."""
    total = 0
    for dtype, dims in _ARRAY.findall(shape):
        if dtype not in _DTYPE_BYTES:
            continue
        n = 1
        for d in filter(None, dims.split(",")):
            n *= int(d)
        total += n * _DTYPE_BYTES[dtype]
    return total


def _computations(hlo: str) -> tuple[dict, str]:
    comps, entry, name = {}, None, None
    for line in hlo.splitlines():
        header = _HEADER.match(line)
        if header:
            name = header.group(1)
            comps[name] = []
            if line.startswith("ENTRY"):
                entry = name
        elif line.strip() == "}":
            name = None
        elif name is not None:
            comps[name].append(line)
    if entry is None:
        raise ValueError("no ENTRY computation in the HLO text")
    return comps, entry


def _add(a: dict, b: dict, times: int = 1) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = out.get(k, 0) + times * v
    return out


def collective_bytes(hlo: str) -> Bytes:
    """Collective bytes of the compiled program `hlo` (``compiled.as_text()``)."""
    comps, entry = _computations(hlo)
    memo: dict = {}
    unknown = [0]

    def visit(name: str) -> tuple[dict, dict]:
        if name in memo:
            return memo[name]
        memo[name] = ({}, {})  # recursion guard
        low, high = {}, {}
        for line in comps.get(name, ()):
            op = _OP.match(line)
            if op is None:
                continue
            shape, opcode = op.groups()
            kind = opcode[: -len("-start")] if opcode.endswith("-start") else opcode
            if kind in KINDS:
                b = {kind: shape_bytes(shape)}
                low, high = _add(low, b), _add(high, b)
            if opcode == "while":
                body = _BODY.search(line)
                trip = _TRIP.search(line)
                if trip is None:
                    unknown[0] += 1
                times = int(trip.group(1)) if trip else 1
                if body:
                    b_low, b_high = visit(body.group(1))
                    low, high = _add(low, b_low, times), _add(high, b_high, times)
            elif opcode == "conditional":
                listed = _BRANCHES.search(line)
                branches = (
                    [b.strip().lstrip("%") for b in listed.group(1).split(",")]
                    if listed
                    else _TRUE_FALSE.findall(line)
                )
                costs = [visit(b) for b in branches]
                if costs:
                    total = lambda d: sum(d.values())
                    low = _add(low, min((c[0] for c in costs), key=total))
                    high = _add(high, max((c[1] for c in costs), key=total))
            else:
                for called in _CALLS.findall(line):
                    c_low, c_high = visit(called)
                    low, high = _add(low, c_low), _add(high, c_high)
        memo[name] = (low, high)
        return memo[name]

    steady, refresh = visit(entry)
    return Bytes(steady, refresh, unknown[0])
