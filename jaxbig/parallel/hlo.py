"""Collective traffic read from a compiled XLA program: bytes per collective kind, and over which axes.

`collective_bytes(compiled_text, mesh)` parses `jax.jit(f).lower(...).compile().as_text()`.
For each collective it sums the result shapes (tuples included) and estimates the bytes each
device sends with the ring algorithm factors: all-reduce 2(n-1)/n, all-gather, reduce-scatter
and all-to-all (n-1)/n of the full (gathered / unscattered) buffer, collective-permute 1.
n is the replica-group size; the group tells which mesh axes the collective runs over.

A collective inside a loop body runs once per iteration: `Collective.count` is how many times
it runs per call of the program (the product of the `known_trip_count`s of the while loops
around it, e.g. the layer scan's L), and `collective_bytes` counts every run. A collective inside
a `conditional` branch is counted as if its branch ran and is flagged (`Collective.conditional`),
so a caller can amortise it (DiLoCo synchronises every H steps).
"""

from __future__ import annotations

import dataclasses
import math
import re

import numpy as np
from jax.sharding import Mesh

KINDS = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")

_DTYPE_BYTES = {
    "pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4,
    "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16, "f8e4m3fn": 1, "f8e5m2": 1, "s4": 0.5, "u4": 0.5,
}  # fmt: skip
_SHAPE = re.compile(r"\b(" + "|".join(sorted(_DTYPE_BYTES, key=len, reverse=True)) + r")\[([0-9,]*)\]")
_OP = re.compile(
    r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(?P<result>.+?)\s+(?P<kind>" + "|".join(KINDS) + r")(?:-start)?\((?P<rest>.*)$"
)
_GROUPS_LIST = re.compile(r"replica_groups=\{((?:\{[0-9,]*\},?)*)\}")
_GROUPS_IOTA = re.compile(r"replica_groups=\[([0-9,]+)\]<=\[([0-9,]+)\](?:T\(([0-9,]+)\))?")
_PAIRS = re.compile(r"source_target_pairs=\{((?:\{[0-9,]+\},?)*)\}")


@dataclasses.dataclass
class Collective:
    kind: str
    result_bytes: float  # bytes of the op's result on one device
    group_size: int  # devices in one replica group
    axes: tuple[str, ...]  # mesh axes the group spans (empty when unknown)
    count: int = 1  # runs per call of the program (loop trip counts multiplied); 1 outside loops
    count_known: bool = True  # False if an enclosing loop's trip count is not known at compile time
    promoted: bool = False  # a reduction the XLA CPU backend widened (bf16 -> f32); half the bytes elsewhere
    conditional: bool = False  # inside a conditional branch: runs only when that branch is taken

    @property
    def wire_bytes(self) -> float:
        """Estimated bytes one device sends for this op."""
        n = self.group_size
        if self.kind == "collective-permute":
            return self.result_bytes
        if n <= 1:
            return 0.0
        if self.kind == "all-reduce":
            return self.result_bytes * 2 * (n - 1) / n
        if self.kind == "reduce-scatter":  # result is the scattered shard; the buffer is n times larger
            return self.result_bytes * (n - 1)
        return self.result_bytes * (n - 1) / n  # all-gather (result is gathered), all-to-all


def _shape_bytes(text: str) -> float:
    total = 0.0
    for dtype, dims in _SHAPE.findall(text):
        total += _DTYPE_BYTES[dtype] * math.prod(int(d) for d in dims.split(",") if d)
    return total


_GROUPS_MESH = re.compile(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}")


def _groups(rest: str) -> list[list[int]] | None:
    """Device-id groups from the explicit `{{0,1},{2,3}}` or iota `[4,2]<=[8]T(..)` forms."""
    m = _GROUPS_IOTA.search(rest)
    if m:
        dims = [int(x) for x in m.group(2).split(",")]
        ids = np.arange(math.prod(dims)).reshape(dims)
        if m.group(3):
            ids = ids.transpose([int(x) for x in m.group(3).split(",")])
        return ids.reshape([int(x) for x in m.group(1).split(",")]).tolist()
    m = _GROUPS_LIST.search(rest)
    if m and m.group(1):
        return [[int(x) for x in g.split(",") if x] for g in re.findall(r"\{([0-9,]*)\}", m.group(1))]
    return None


def _axes_of(group: list[int], mesh: Mesh | None) -> tuple[str, ...]:
    """Mesh axes along which the devices of `group` differ (ids index the device assignment, i.e. the mesh's devices in order)."""
    if mesh is None or len(group) < 2:
        return ()
    ids = np.arange(mesh.devices.size).reshape(mesh.devices.shape)
    coords = [np.argwhere(ids == g)[0] for g in group if (ids == g).any()]
    if len(coords) < 2:
        return ()
    coords = np.stack(coords)
    return tuple(name for i, name in enumerate(mesh.axis_names) if len(set(coords[:, i])) > 1)


def _group_and_axes(kind: str, rest: str, mesh: Mesh | None) -> tuple[int, tuple[str, ...]]:
    m = _GROUPS_MESH.search(rest)  # named form: replica_groups=mesh['data'=2,...] {'data','fsdp'}
    if m:
        sizes = {k.strip("'"): int(v) for k, v in re.findall(r"('[^']+'|\w+)=(\d+)", m.group(1))}
        axes = tuple(a.strip().strip("'") for a in m.group(2).split(",") if a.strip())
        size = math.prod(sizes.get(a, 1) for a in axes)
        if mesh is not None and not set(sizes) <= set(mesh.axis_names):
            # Anonymous axes (`mesh['axis_0'=2,'axis_1'=4] {'axis_1'}`): an iota of the device
            # assignment reshaped to these sizes; the group is one line along the named axes.
            names = list(sizes)
            ids = np.arange(math.prod(sizes.values())).reshape(list(sizes.values()))
            index = tuple(slice(None) if n in axes else 0 for n in names)
            return size, _axes_of(ids[index].reshape(-1).tolist(), mesh)
        return size, tuple(a for a in axes if sizes.get(a, 1) > 1)
    if kind == "collective-permute":
        m = _PAIRS.search(rest)
        pairs = [[int(x) for x in p.split(",")] for p in re.findall(r"\{([0-9,]+)\}", m.group(1))] if m else []
        moving = [p for p in pairs if p[0] != p[1]]
        axes = sorted({a for p in moving for a in _axes_of(p, mesh)})
        return (2 if moving else 1), tuple(axes)
    groups = _groups(rest)
    if not groups:
        return 1, ()
    return len(groups[0]), _axes_of(groups[0], mesh)


def _result_text(result: str, is_start: bool) -> str:
    """An async `-start` op returns (operands, outputs): keep the outputs."""
    if not is_start or not result.startswith("(("):
        return result
    depth = 0
    for i, ch in enumerate(result):
        depth += ch == "("
        depth -= ch == ")"
        if depth == 1 and ch == ")":
            return result[i + 1 :]
    return result


_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?(?P<name>[\w.\-]+)\s*\(.*->.*\{\s*$")
_CALLEES = re.compile(r"\b(?:calls|to_apply|body|condition|true_computation|false_computation)=%?([\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')
_WHILE_BODY = re.compile(r"\bbody=%?([\w.\-]+)")


def _computations(hlo_text: str) -> tuple[dict[str, list[str]], str | None]:
    """{computation name: its instruction lines}, and the ENTRY computation's name."""
    comps: dict[str, list[str]] = {}
    entry, current = None, None
    for line in hlo_text.splitlines():
        m = _COMPUTATION.match(line)
        if m and not line.startswith(" "):
            current = m.group("name")
            comps[current] = []
            if line.startswith("ENTRY"):
                entry = current
        elif line.startswith("}"):
            current = None
        elif current is not None:
            comps[current].append(line)
    if not comps:  # a fragment (instruction lines only): one computation, run once
        comps[""] = hlo_text.splitlines()
    return comps, entry


def _run_counts(comps: dict[str, list[str]], entry: str | None) -> dict[str, tuple[int, bool, bool]]:
    """Per computation: runs per program call, whether every trip count was known, and whether it
    is reached through a conditional branch."""
    if entry is None:
        return {name: (1, True, False) for name in comps}
    edges: dict[str, list[tuple[str, int, bool, bool]]] = {name: [] for name in comps}
    for name, lines in comps.items():
        for line in lines:
            callees = _CALLEES.findall(line)
            branches = [c.strip().lstrip("%") for group in _BRANCHES.findall(line) for c in group.split(",") if c.strip()]
            is_cond = " conditional(" in line
            body = _WHILE_BODY.search(line) if " while(" in line else None
            trip = _TRIP.search(line) if body else None
            for callee in callees + branches:
                if callee not in comps:
                    continue
                if body and callee == body.group(1):
                    edges[name].append((callee, int(trip.group(1)) if trip else 1, trip is not None, False))
                else:  # a while condition runs trip+1 times, but holds no collectives worth counting
                    edges[name].append((callee, 1, True, is_cond))
    counts: dict[str, list] = {}

    def visit(name: str, n: int, known: bool, conditional: bool, depth: int = 0) -> None:
        if depth > 64:  # pragma: no cover - HLO call graphs are acyclic and shallow
            raise ValueError(f"HLO call graph deeper than 64 at {name}")
        c = counts.setdefault(name, [0, True, False])
        c[0] += n
        c[1] = c[1] and known
        c[2] = c[2] or conditional
        for callee, trip, trip_known, branch in edges[name]:
            visit(callee, n * trip, known and trip_known, conditional or branch, depth + 1)

    visit(entry, 1, True, False)
    return {name: (c[0], c[1], c[2]) for name, c in counts.items()}


def parse_collectives(hlo_text: str, mesh: Mesh | None = None) -> list[Collective]:
    """Every collective in the program text (async `-start` ops counted once, `-done` ignored), with its run count."""
    comps, entry = _computations(hlo_text)
    runs = _run_counts(comps, entry)
    out = []
    for name, lines in comps.items():
        count, known, conditional = runs.get(name, (1, True, False))
        for line in lines:
            m = _OP.match(line)
            if not m:
                continue
            kind, rest = m.group("kind"), m.group("rest")
            is_start = f"{kind}-start(" in line
            size = _shape_bytes(_result_text(m.group("result").strip(), is_start))
            group_size, axes = _group_and_axes(kind, rest, mesh)
            promoted = re.search(r"to_apply=%?[\w.\-]*_promoted\b", rest) is not None
            out.append(Collective(kind, size, group_size, axes, count, known, promoted, conditional))
    return out


def collective_bytes(
    hlo_text: str, mesh: Mesh | None = None, over: str | None = None, *, conditional: bool | None = None
) -> dict[str, float]:
    """Estimated bytes sent per device per kind and program call (loop iterations included); with
    `over`, only collectives spanning that mesh axis.

    `conditional`: None counts every collective (a conditional branch as if taken), True only
    those inside conditional branches, False only those outside.
    """
    totals = {k: 0.0 for k in KINDS}
    for c in parse_collectives(hlo_text, mesh):
        if (over is None or over in c.axes) and (conditional is None or c.conditional == conditional):
            totals[c.kind] += c.wire_bytes * c.count
    return totals
