"""The collectives of a compiled program, from its HLO text: kind, bytes per step, mesh axes.

Each collective instruction's bytes are its data per device: the result for all-reduce,
all-gather, all-to-all and collective-permute, the operand (result x group size) for
reduce-scatter. Instructions inside a while loop's body count once per iteration
(`known_trip_count`; a layer scan runs its body once per layer). The devices of a replica group
are positions in the mesh's device order, mapped back to the mesh axes along which they differ.

With several slices (a multi-slice mesh: 'data' split across slices, the first axis), the TPU
compiler emits one program per slice: its collectives run inside the slice (device positions
within one slice's block of the mesh), and what crosses the data-centre network (DCN) becomes
`send`s to the megascale runtime, named after the collective they complete
(`_xla_host_transfer_rendezvous="all-reduce_0"`); those count as crossing 'data' over DCN.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Sequence

import numpy as np

KINDS = ("all-gather", "reduce-scatter", "all-reduce", "collective-permute", "all-to-all")
_DTYPE_BYTES = {
    "pred": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "s16": 2, "u16": 2, "f16": 2,
    "bf16": 2, "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16,
}  # fmt: skip
_COMP_HEADER = re.compile(r"^(ENTRY )?%?([\w.\-]+) .*\{\s*$")
_INSTR = re.compile(r"^\s*(?:ROOT )?%?[\w.\-]+ = (.*?) (" + "|".join(KINDS) + r")(-start)?\((.*)$")
_ARRAY = re.compile(r"\b([a-z]+[0-9]*[a-z0-9]*)\[([0-9,]*)\]")
_CALLEES = re.compile(
    r"\b(?:calls|to_apply|body|condition|true_computation|false_computation)=%?([\w.\-]+)"
)
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"')
_MESH_GROUPS = re.compile(
    r"replica_groups=mesh\[([^\]]*)\]"
    r"(?:, device_ids=\(\[([0-9,]+)\]T\(([0-9,]+)\)\))? \{([^}]*)\}"
)
_DCN_SEND = re.compile(
    r"^\s*(?:ROOT )?%?[\w.\-]+ = (.*?) send\(.*_xla_host_transfer_handler_name=\"xla_megascale"
    r".*_xla_host_transfer_rendezvous=\"([a-z\-]+)"
)
_DCN_TYPE = re.compile(r'_xla_megascale_transfer_type="([A-Z_]+)"')
_WHILE = re.compile(r"condition=%?([\w.\-]+), body=%?([\w.\-]+)")
_S32_CONST = re.compile(r"= s32\[\]\S* constant\((\d+)\)")


@dataclasses.dataclass(frozen=True)
class Collective:
    kind: str
    bytes: int  # per device, per execution
    count: int  # executions per step (loop trip counts)
    axes: tuple[str, ...]  # mesh axes the groups span (() = none: a no-op group)
    crosses_dcn: bool
    dims: tuple[int, ...] = ()  # the largest array it produces

    @property
    def step_bytes(self) -> int:
        return self.bytes * self.count


def shape_bytes(shape_text: str) -> int:
    """Bytes of an HLO shape: 'bf16[128,512]{1,0}' or a tuple of them."""
    total = 0
    for dtype, dims in _ARRAY.findall(shape_text):
        if dtype not in _DTYPE_BYTES:
            continue
        total += _DTYPE_BYTES[dtype] * math.prod(int(d) for d in dims.split(",") if d)
    return total


def largest_dims(shape_text: str) -> tuple[int, ...]:
    """Dimensions of the largest array in an HLO shape (a tuple's items included)."""
    arrays = [
        tuple(int(d) for d in dims.split(",") if d)
        for dtype, dims in _ARRAY.findall(shape_text)
        if dtype in _DTYPE_BYTES
    ]
    return max(arrays, key=math.prod, default=())


def parse_groups(attrs: str, num_devices: int) -> list[list[int]]:
    """Device groups of one instruction: replica_groups={{0,1},{2,3}}, the iota form
    replica_groups=[2,2]<=[4] / [2,2]<=[2,2]T(1,0), or source_target_pairs={{0,1},..}."""
    m = re.search(r"source_target_pairs=\{((?:\{[0-9,]*\},?)*)\}", attrs)
    if m:
        return [[int(x) for x in g.split(",") if x] for g in re.findall(r"\{([0-9,]*)\}", m[1])]
    m = _MESH_GROUPS.search(attrs)
    if m:  # mesh['axis_0'=4,'axis_1'=2] {'axis_0'}: groups vary along the listed axes
        named = re.findall(r"'(\w+)'=(\d+)", m[1])
        sizes = [int(n) for _, n in named]
        ids = np.arange(math.prod(sizes))
        if m[2]:
            ids = ids.reshape([int(x) for x in m[2].split(",")])
            ids = ids.transpose([int(x) for x in m[3].split(",")])
        ids = ids.reshape(sizes)
        listed = [i for i, (name, _) in enumerate(named) if f"'{name}'" in m[4]]
        rest = [i for i in range(len(sizes)) if i not in listed]
        size = math.prod(sizes[i] for i in listed)
        return ids.transpose(rest + listed).reshape(-1, size).tolist()
    m = re.search(r"replica_groups=\[([0-9,]+)\]<=\[([0-9,]+)\](?:T\(([0-9,]+)\))?", attrs)
    if m:
        out_shape = [int(x) for x in m[1].split(",")]
        dims = [int(x) for x in m[2].split(",")]
        ids = np.arange(math.prod(dims)).reshape(dims)
        if m[3]:
            ids = ids.transpose([int(x) for x in m[3].split(",")])
        return ids.reshape(out_shape[0], -1).tolist()
    m = re.search(r"replica_groups=\{((?:\{[0-9,]*\},?)*)\}", attrs)
    if m:
        groups = [[int(x) for x in g.split(",") if x] for g in re.findall(r"\{([0-9,]*)\}", m[1])]
        if groups:
            return groups
    return [list(range(num_devices))]  # replica_groups={} or none: every device


def group_axes(
    groups: Sequence[Sequence[int]], mesh_shape: Sequence[int], axis_names: Sequence[str]
) -> tuple[str, ...]:
    """The mesh axes along which the devices of any group differ (positions in the mesh's
    row-major device order)."""
    varying = set()
    for group in groups:
        if len(group) < 2:
            continue
        coords = np.array(np.unravel_index(np.asarray(group), tuple(mesh_shape))).T
        varying.update(int(i) for i in np.nonzero((coords != coords[0]).any(axis=0))[0])
    return tuple(axis_names[i] for i in sorted(varying))


def _computation_counts(lines: Sequence[str]) -> tuple[dict[str, int], list[str]]:
    """How often each computation runs per execution of the entry, and each line's
    computation name. A while body runs `known_trip_count` times, else as many times as the
    one integer constant its condition compares the counter with (a scan's length)."""
    owner, calls, consts, entry, current = [], {}, {}, None, None
    whiles = []  # (caller, condition, body, known trip count or None)
    for line in lines:
        header = _COMP_HEADER.match(line)
        if header and not line.startswith(" "):
            current = header[2]
            calls.setdefault(current, [])
            consts.setdefault(current, [])
            if header[1]:
                entry = current
        owner.append(current)
        if current is None or " = " not in line:
            continue
        const = _S32_CONST.search(line)
        if const:
            consts[current].append(int(const[1]))
        loop = _WHILE.search(line)
        if loop:
            trip = _TRIP.search(line)
            whiles.append((current, loop[1], loop[2], int(trip[1]) if trip else None))
        for callee in _CALLEES.findall(line):
            if not (loop and callee == loop[2]):
                calls[current].append((callee, 1))
        branches = _BRANCHES.search(line)
        if branches:
            for callee in re.findall(r"%?([\w.\-]+)", branches[1]):
                calls[current].append((callee, 1))
    for caller, cond, body, trip in whiles:
        if trip is None:
            trip = consts.get(cond, [1])[0] if len(consts.get(cond, [])) == 1 else 1
        calls[caller].append((body, trip))
    counts = {name: 0 for name in calls}
    if entry is None:
        return counts, owner

    def visit(name: str, times: int, depth: int = 0) -> None:
        if name not in counts or depth > 64:
            return
        counts[name] += times
        for callee, mult in calls[name]:
            visit(callee, times * mult, depth + 1)

    visit(entry, 1)
    return counts, owner


def parse_collectives(
    hlo_text: str, mesh_shape: Sequence[int], axis_names: Sequence[str], slices: int = 1
) -> list[Collective]:
    """Every collective in the compiled module `hlo_text` (see the module docstring) of a mesh
    of `mesh_shape` made of `slices` slices."""
    lines = hlo_text.splitlines()
    counts, owner = _computation_counts(lines)
    local_shape = (mesh_shape[0] // slices, *mesh_shape[1:])  # the devices one program sees
    num_devices = math.prod(local_shape)
    out = []
    for line, comp in zip(lines, owner):
        if comp is None or counts.get(comp, 0) == 0:
            continue
        send = _DCN_SEND.match(line) if slices > 1 else None
        if send:
            typed = _DCN_TYPE.search(line)
            kind = typed[1].lower().replace("_", "-") if typed else send[2]
            item = _tuple_items(send[1])[0] if send[1].startswith("(") else ""
            dcn = (axis_names[0],)
            out.append(
                Collective(kind, shape_bytes(item), counts[comp], dcn, True, largest_dims(item))
            )
            continue
        m = _INSTR.match(line)
        if not m:
            continue
        result, kind, _, attrs = m.groups()
        groups = parse_groups(attrs, num_devices)
        nbytes, produced = shape_bytes(result), result
        if kind == "reduce-scatter":
            nbytes *= max(len(g) for g in groups)
        elif kind in ("all-gather", "collective-permute") and result.startswith("("):
            # async -start results are (operand, result[, scratch]) tuples: count the result
            produced = _tuple_items(result)[1]
            nbytes = shape_bytes(produced)
        axes = group_axes(groups, local_shape, axis_names)
        out.append(Collective(kind, nbytes, counts[comp], axes, False, largest_dims(produced)))
    return out


def _tuple_items(shape_text: str) -> list[str]:
    """Top-level items of a tuple shape '(a, (b, c), d)'."""
    inner, depth, items, start = shape_text.strip()[1:-1], 0, [], 0
    for i, ch in enumerate(inner):
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == "," and depth == 0:
            items.append(inner[start:i])
            start = i + 1
    items.append(inner[start:])
    return [s.strip() for s in items]


def summarize(collectives: Sequence[Collective]) -> list[dict]:
    """Rows (kind, axes, crosses_dcn) -> instructions, executions and bytes per step, largest
    first."""
    rows: dict[tuple, dict] = {}
    for c in collectives:
        key = (c.kind, c.axes, c.crosses_dcn)
        row = rows.setdefault(
            key,
            {"kind": c.kind, "axes": list(c.axes), "dcn": c.crosses_dcn, "ops": 0, "count": 0,
             "bytes_per_step": 0},
        )  # fmt: skip
        row["ops"] += 1
        row["count"] += c.count
        row["bytes_per_step"] += c.step_bytes
    return sorted(rows.values(), key=lambda r: -r["bytes_per_step"])
