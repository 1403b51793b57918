"""Collectives in compiled HLO text: which ones, their shapes, and bytes moved per device.

    text = jax.jit(f).lower(*args).compile().as_text()
    ops = collectives(text)             # [Collective(kind='all-gather', shape=(4, 130), ...)]
    summary(ops)                         # {'all-gather': {'count': 1, 'bytes': ..., 'traffic': ...}}

``bytes`` is the size of each op's result on one device; ops inside ``while`` loops with a
known trip count (``lax.scan``) are counted ``repeats`` times in :func:`summary`.  ``traffic`` estimates what one device
sends (bandwidth-optimal ring algorithms over a group of n devices):

================== ======================================
all-gather         result bytes × (n − 1) / n
reduce-scatter     operand bytes × (n − 1) / n = result × (n − 1)
all-reduce         2 × bytes × (n − 1) / n
all-to-all         bytes × (n − 1) / n
collective-permute bytes (each device sends its block once)
================== ======================================
"""

from __future__ import annotations

import re
from typing import NamedTuple

KINDS = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")

_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4,
                "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16,
                "f8e4m3fn": 1, "f8e5m2": 1}
_ARRAY = re.compile(r"(\w+)\[([\d,]*)\]")
_LINE = re.compile(r"=\s*(?P<shape>\([^()]*\)|\w+\[[\d,]*\](?:\{[^}]*\})?)\s+"
                   r"(?P<kind>" + "|".join(KINDS) + r")(?P<start>-start)?\(")


class Collective(NamedTuple):
    kind: str
    dtype: str
    shape: tuple[int, ...]
    bytes: int          # result bytes on one device (one execution)
    group_size: int     # devices taking part in one group
    traffic: float      # estimated bytes sent per device, times ``repeats``
    line: str
    repeats: int = 1    # executions: product of known trip counts of enclosing while loops
    conditional: bool = False   # inside a branch of a ``conditional`` (``lax.cond``): runs only when taken


_COMP = re.compile(r"^\s*(?:ENTRY\s+)?%?([\w.\-]+)\s*\(.*\)\s*->.*\{\s*$")
_WHILE = re.compile(r"while\(.*?body=%?([\w.\-]+).*?known_trip_count\":\{\"n\":\"(\d+)\"")
_CALLS = re.compile(r"(?:to_apply|calls|body|condition|true_computation|false_computation|"
                    r"branch_computations)=\{?%?([\w.\-, %]+)\}?")


_BRANCHES = re.compile(r"(?:true_computation|false_computation|branch_computations)=\{?%?([\w.\-, %]+)\}?")


def _call_graph(hlo_text: str) -> tuple[dict[str, int], set[str]]:
    """(computation name -> how many times it runs per call of the entry computation, the
    computations that run inside a branch of a ``conditional``).  While loops with a known trip
    count multiply; other calls inherit their caller's count and conditionality."""
    parent: dict[str, tuple[str, int]] = {}
    branch_roots: set[str] = set()
    current = None
    for line in hlo_text.splitlines():
        m = _COMP.match(line)
        if m:
            current = m.group(1)
            continue
        if current is None:
            continue
        w = _WHILE.search(line)
        if w:
            parent[w.group(1)] = (current, int(w.group(2)))
        for c in _CALLS.findall(line):
            for name in c.replace("%", "").split(","):
                name = name.strip()
                if name and name not in parent:
                    parent[name] = (current, 1)
        for c in _BRANCHES.findall(line):
            branch_roots.update(n.strip() for n in c.replace("%", "").split(",") if n.strip())

    def count(name, depth=0):
        if name not in parent or depth > 50:
            return 1
        up, n = parent[name]
        return n * count(up, depth + 1)

    def in_branch(name, depth=0):
        if name in branch_roots:
            return True
        if name not in parent or depth > 50:
            return False
        return in_branch(parent[name][0], depth + 1)

    return {name: count(name) for name in parent}, {name for name in parent if in_branch(name)}


def _group_size(line: str) -> int:
    m = re.search(r"replica_groups=\[(\d+),(\d+)\]<=", line)       # iota form [groups, size]
    if m:
        return int(m.group(2))
    m = re.search(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}", line)   # mesh['a'=8,'b'=1] {'a'}
    if m:
        sizes = {name: int(n) for name, n in re.findall(r"'([^']+)'=(\d+)", m.group(1))}
        size = 1
        for name in re.findall(r"'([^']+)'", m.group(2)):
            size *= sizes.get(name, 1)
        return size
    m = re.search(r"replica_groups=\{\{([\d,]*)\}", line)
    if m:
        return len(m.group(1).split(","))
    m = re.search(r"source_target_pairs=\{(.*?)\}\}?", line)
    if m:
        return max(2, len(re.findall(r"\{\d+,\d+\}", line)))
    return 1


def _traffic(kind: str, nbytes: int, n: int) -> float:
    if n <= 1:
        return 0.0
    if kind == "all-gather" or kind == "all-to-all":
        return nbytes * (n - 1) / n
    if kind == "reduce-scatter":
        return nbytes * (n - 1)
    if kind == "all-reduce":
        return 2 * nbytes * (n - 1) / n
    return float(nbytes)  # collective-permute


def collectives(hlo_text: str) -> list[Collective]:
    """Every collective op in ``hlo_text`` (async ``-start``/``-done`` pairs counted once)."""
    out = []
    reps, branched = _call_graph(hlo_text)
    current = None
    for line in hlo_text.splitlines():
        c = _COMP.match(line)
        if c:
            current = c.group(1)
            continue
        m = _LINE.search(line)
        if not m:
            continue
        kind, shape_txt = m.group("kind"), m.group("shape")
        arrays = _ARRAY.findall(shape_txt)
        if m.group("start") and len(arrays) > 1:       # (operand, result[, ...]) tuple
            arrays = arrays[1:2]
        nbytes, dtype, dims = 0, "", ()
        for dt, d in arrays:
            dims = tuple(int(x) for x in d.split(",") if x)
            size = 1
            for x in dims:
                size *= x
            nbytes += size * _DTYPE_BYTES.get(dt, 4)
            dtype = dt
        n = _group_size(line)
        rep = reps.get(current, 1)
        out.append(Collective(kind, dtype, dims, nbytes, n, rep * _traffic(kind, nbytes, n),
                              line.strip(), rep, current in branched))
    return out


def summary(ops: list[Collective]) -> dict[str, dict[str, float]]:
    """``{kind: {'count', 'bytes', 'traffic'}}`` summed over ops (kinds with no op omitted)."""
    out: dict[str, dict[str, float]] = {}
    for op in ops:
        s = out.setdefault(op.kind, {"count": 0, "bytes": 0, "traffic": 0.0})
        s["count"] += op.repeats
        s["bytes"] += op.bytes * op.repeats
        s["traffic"] += op.traffic
    return out


def compiled_text(fn, *args, **kwargs) -> str:
    """``jax.jit(fn).lower(*args).compile().as_text()`` (``fn`` may already be jitted)."""
    import jax

    jitted = fn if hasattr(fn, "lower") else jax.jit(fn)
    return jitted.lower(*args, **kwargs).compile().as_text()
