"""Collective traffic read from a compiled XLA program: bytes per collective kind, and over which axes.

`collective_bytes(compiled_text, mesh)` parses `jax.jit(f).lower(...).compile().as_text()`.
For each collective it sums the result shapes (tuples included) and estimates the bytes each
device sends with the ring algorithm factors: all-reduce 2(n-1)/n, all-gather, reduce-scatter
and all-to-all (n-1)/n of the full (gathered / unscattered) buffer, collective-permute 1.
n is the replica-group size; the group tells which mesh axes the collective runs over.

A collective inside a `while` body runs once per iteration (e.g. the per-layer gradient
all-reduces in the backward pass of a scanned model), so it counts `known_trip_count` times.
A collective inside a `conditional` branch is counted as if its branch ran and is flagged
(`Collective.conditional`), so a caller can amortise it (DiLoCo synchronises every H steps).
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
    count: int = 1  # executions per run of the program (loop trip counts multiplied)
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
    """Mesh axes along which the devices of `group` differ."""
    if mesh is None or len(group) < 2:
        return ()
    ids = np.vectorize(lambda d: d.id)(mesh.devices)
    coords = [np.argwhere(ids == g)[0] for g in group if (ids == g).any()]
    if len(coords) < 2:
        return ()
    coords = np.stack(coords)
    return tuple(name for i, name in enumerate(mesh.axis_names) if len(set(coords[:, i])) > 1)


def _mesh_names(hlo_axes: tuple[tuple[str, int], ...], mesh: Mesh | None) -> dict[str, str]:
    """HLO mesh axis name -> jax mesh axis name.

    The compiler may drop a mesh's size-1 axes and call the rest `axis_0`, `axis_1`, ...; they
    are then the jax mesh's axes larger than 1, in order, with the same sizes.
    """
    if mesh is None or all(name in mesh.axis_names for name, _ in hlo_axes):
        return {}
    big = [(name, size) for name, size in mesh.shape.items() if size > 1]
    if [size for _, size in hlo_axes] == [size for _, size in big]:
        return {hlo: name for (hlo, _), (name, _) in zip(hlo_axes, big)}
    return {}


def _group_and_axes(kind: str, rest: str, mesh: Mesh | None) -> tuple[int, tuple[str, ...]]:
    m = _GROUPS_MESH.search(rest)  # named form: replica_groups=mesh['data'=2,...] {'data','fsdp'}
    if m:
        sizes = {k.strip("'"): int(v) for k, v in re.findall(r"('[^']+'|\w+)=(\d+)", m.group(1))}
        axes = tuple(a.strip().strip("'") for a in m.group(2).split(",") if a.strip())
        names = _mesh_names(tuple(sizes.items()), mesh)
        sizes = {names.get(k, k): v for k, v in sizes.items()}
        axes = tuple(names.get(a, a) for a in axes)
        return math.prod(sizes.get(a, 1) for a in axes), tuple(a for a in axes if sizes.get(a, 1) > 1)
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


_COMPUTATION = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s*\(.*\{\s*$")
_CALLEE = re.compile(r"\b(body|condition|to_apply|calls|true_computation|false_computation)=%?([\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_TRIP_COUNT = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')


def _computations(hlo_text: str) -> tuple[dict[str, list[str]], str | None]:
    """Computation name -> its instruction lines, and the entry computation's name."""
    comps: dict[str, list[str]] = {}
    entry, current = None, None
    for line in hlo_text.splitlines():
        m = _COMPUTATION.match(line)
        if m and not line.startswith(" "):
            current = m.group(2)
            comps[current] = []
            entry = current if m.group(1) else entry
        elif line.startswith("}"):
            current = None
        elif current is not None:
            comps[current].append(line)
    return comps, entry


def _executions(comps: dict[str, list[str]], entry: str | None) -> dict[str, tuple[int, bool]]:
    """Computation -> (runs per program run, whether it is reached through a conditional branch)."""
    runs: dict[str, int] = {}
    in_branch: dict[str, bool] = {}

    def visit(name: str, times: int, branch: bool, depth: int = 0) -> None:
        if name not in comps or depth > 64:
            return
        runs[name] = runs.get(name, 0) + times
        in_branch[name] = in_branch.get(name, False) or branch
        for line in comps[name]:
            trip = _TRIP_COUNT.search(line)
            for role, callee in _CALLEE.findall(line):
                factor = int(trip.group(1)) if role == "body" and trip else 1
                visit(callee, times * factor, branch or role.endswith("_computation"), depth + 1)
            m = _BRANCHES.search(line)
            for callee in re.findall(r"%?([\w.\-]+)", m.group(1)) if m else ():
                visit(callee, times, True, depth + 1)

    if entry is not None:
        visit(entry, 1, False)
    return {name: (runs.get(name, 1), in_branch.get(name, False)) for name in comps}


def parse_collectives(hlo_text: str, mesh: Mesh | None = None) -> list[Collective]:
    """Every collective in the program text (async `-start` ops counted once, `-done` ignored), with its execution count."""
    comps, entry = _computations(hlo_text)
    executions = _executions(comps, entry)
    out = []
    for name, lines in comps.items() if comps else [(None, hlo_text.splitlines())]:
        count, conditional = executions.get(name, (1, False))
        for line in lines:
            m = _OP.match(line)
            if not m:
                continue
            kind, rest = m.group("kind"), m.group("rest")
            is_start = f"{kind}-start(" in line
            size = _shape_bytes(_result_text(m.group("result").strip(), is_start))
            group_size, axes = _group_and_axes(kind, rest, mesh)
            out.append(Collective(kind, size, group_size, axes, count, conditional))
    return out


def collective_bytes(
    hlo_text: str, mesh: Mesh | None = None, over: str | None = None, *, conditional: bool | None = None
) -> dict[str, float]:
    """Estimated bytes sent per device per kind and program run; with `over`, only collectives spanning that mesh axis.

    `conditional`: None counts every collective (a conditional branch as if taken), True only
    those inside conditional branches, False only those outside.
    """
    totals = {k: 0.0 for k in KINDS}
    for c in parse_collectives(hlo_text, mesh):
        if (over is None or over in c.axes) and (conditional is None or c.conditional == conditional):
            totals[c.kind] += c.wire_bytes * c.count
    return totals
