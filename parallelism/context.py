"""Which mesh axis, if any, shards the sequence: read by layers while they are traced.

    with parallelism.sequence_parallel(mesh, axis="sequence", attention="ring"):
        loss = jax.jit(loss_fn)(params, batch)   # traced inside the context

Mixer layers call :func:`current_sequence_sharding` at trace time; when it returns a value they
run their op sequence-parallel (LASP-2 for linear layers, ring / Ulysses / all-gather attention
for softmax layers) instead of the single-device op.

The context is read when a function is *traced*, and ``jax.jit`` caches traces without regard to
it: a function first traced outside the context is silently reused inside it. Jit a fresh
function inside the context (``parallelism.rules.shard_step`` and ``in_sequence_parallel`` do).
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Iterator, NamedTuple

import jax

ATTENTION_MODES = ("ring", "ulysses", "allgather")


class SequenceSharding(NamedTuple):
    mesh: jax.sharding.Mesh
    axis: str
    attention: str  # how softmax layers exchange keys and values: one of ATTENTION_MODES


_current: contextvars.ContextVar[SequenceSharding | None] = contextvars.ContextVar(
    "lolax_sequence_sharding", default=None)


@contextlib.contextmanager
def sequence_parallel(mesh: jax.sharding.Mesh, axis: str = "sequence",
                      attention: str = "ring") -> Iterator[SequenceSharding]:
    """Shards the sequence over ``mesh`` axis ``axis`` for layers traced inside the block."""
    if axis not in mesh.axis_names:
        raise ValueError(f"axis {axis!r} is not a mesh axis; the mesh has {mesh.axis_names}")
    if attention not in ATTENTION_MODES:
        raise ValueError(f"attention must be one of {ATTENTION_MODES}, got {attention!r}")
    token = _current.set(SequenceSharding(mesh, axis, attention))
    try:
        yield _current.get()
    finally:
        _current.reset(token)


def current_sequence_sharding() -> SequenceSharding | None:
    return _current.get()
