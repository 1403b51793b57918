"""Where tokens go: the chunk plan, the chunk-major layout and per-token segment flags.

Every family works on ``[B, T, H, D]`` arrays, either a plain batch (B independent sequences) or a
packed one (``B == 1`` with ``cu_seqlens``).  Both reduce to one *chunk plan*: a static grid
``[R, NC, C]`` of token positions in which no chunk straddles two sequences (R = B rows, or one
packed row), with flags saying which chunks open and close a sequence.  Padding slots hold zeros,
a neutral token for every family (k = v = 0 writes nothing, a log decay of 0 decays nothing,
beta = 0 leaves the state alone).

The chunk forms work in the *chunk-major* layout ``[NC, R, H, C, ...]``: per-chunk quantities
flatten for free to ``[NC·R·H, C, ...]`` (rank-3 batched products, which XLA's CPU emitter
handles far better than high-rank broadcasts) and reshape for free to the ``[NC, R, H, ...]``
the state scan consumes.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

Array = jax.Array


class ChunkPlan(NamedTuple):
    """The chunk grid.

    Attributes:
      index: ``[R, NC, C]`` int32 token position within the row (clamped to a valid position in
        padding slots; ``valid`` marks real tokens).
      valid: ``[R, NC, C]`` bool.
      first: ``[R, NC]`` bool, the chunk opens a sequence (its incoming state is that sequence's
        initial state).
      last: ``[R, NC]`` bool, the chunk closes a sequence (its outgoing state is the final state).
      seq: ``[R, NC]`` int32 sequence id in ``[0, N)`` (N for unused slots).
      num_seqs: N.
      length: T.
      packed: whether the grid came from ``cu_seqlens``.
    """

    index: Array
    valid: Array
    first: Array
    last: Array
    seq: Array
    num_seqs: int
    length: int
    packed: bool


def make_chunk_plan(batch: int, length: int, chunk_size: int, cu_seqlens=None) -> ChunkPlan:
    """The grid for a plain batch (R = B rows) or a packed row (R = 1, NC = T // C + N slots)."""
    C, T = chunk_size, length
    if cu_seqlens is None:
        nc = -(-T // C)
        pos = jnp.arange(nc * C, dtype=jnp.int32).reshape(nc, C)
        c = jnp.arange(nc)
        rows = jnp.arange(batch, dtype=jnp.int32)[:, None]
        grid = lambda x: jnp.broadcast_to(x, (batch,) + x.shape)
        return ChunkPlan(index=grid(jnp.minimum(pos, T - 1)), valid=grid(pos < T), first=grid(c == 0),
                         last=grid(c == nc - 1), seq=jnp.broadcast_to(rows, (batch, nc)),
                         num_seqs=batch, length=T, packed=False)
    cu = jnp.asarray(cu_seqlens, jnp.int32)
    n = cu.shape[0] - 1
    lens = cu[1:] - cu[:-1]
    per_seq = (lens + C - 1) // C                                   # chunks per sequence (0 if empty)
    chunk_start = jnp.concatenate([jnp.zeros(1, jnp.int32), jnp.cumsum(per_seq)])
    nc = T // C + n                                                 # static bound on sum(ceil(len / C))
    slot = jnp.arange(nc, dtype=jnp.int32)
    seq = jnp.clip(jnp.searchsorted(chunk_start, slot, side="right") - 1, 0, n - 1)
    used = slot < chunk_start[-1]
    j = slot - chunk_start[seq]                                     # chunk number within its sequence
    offset = j[:, None] * C + jnp.arange(C, dtype=jnp.int32)[None, :]
    valid = used[:, None] & (offset < lens[seq][:, None])
    index = jnp.clip(cu[seq][:, None] + offset, 0, T - 1)
    first = used & (j == 0)
    last = used & (j == per_seq[seq] - 1)
    seq = jnp.where(used, seq, n)
    return ChunkPlan(index=index[None], valid=valid[None], first=first[None], last=last[None],
                     seq=seq[None], num_seqs=n, length=T, packed=True)


def to_chunk_major(x: Array, plan: ChunkPlan) -> Array:
    """``[R, T, H, ...]`` -> ``[NC, R, H, C, ...]`` with zeros in padding slots (dtype kept)."""
    R, NC, C = plan.index.shape
    if plan.packed:
        rows = jnp.arange(R)[:, None, None]
        xc = x[rows, plan.index]                                    # [R, NC, C, H, ...]
        mask = plan.valid.reshape(plan.valid.shape + (1,) * (x.ndim - 2))
        xc = jnp.where(mask, xc, jnp.zeros((), x.dtype))
    else:
        pad = [(0, 0)] * x.ndim
        pad[1] = (0, NC * C - x.shape[1])
        xc = jnp.pad(x, pad).reshape((R, NC, C) + x.shape[2:])
    return jnp.moveaxis(jnp.moveaxis(xc, 3, 2), 1, 0)


def from_chunk_major(xc: Array, plan: ChunkPlan) -> Array:
    """Inverse of :func:`to_chunk_major`: ``[NC, R, H, C, ...]`` -> ``[R, T, H, ...]``."""
    xc = jnp.moveaxis(jnp.moveaxis(xc, 0, 1), 2, 3)                 # [R, NC, C, H, ...]
    R, NC, C = xc.shape[:3]
    flat = xc.reshape((R, NC * C) + xc.shape[3:])
    if not plan.packed:
        return flat[:, :plan.length]
    target = jnp.where(plan.valid, plan.index, plan.length).reshape(R, -1)   # padding lands out of range
    out = jnp.zeros((R, plan.length) + xc.shape[3:], xc.dtype)
    return out.at[jnp.arange(R)[:, None], target].set(flat, mode="drop")


def flatten_chunks(x: Array) -> Array:
    """``[NC, R, H, C, ...]`` -> ``[NC·R·H, C, ...]`` (a free reshape)."""
    return x.reshape((-1,) + x.shape[3:])


class TokenSegments(NamedTuple):
    """Per-token packing flags of a row layout ``[R, T]``."""

    seq: Array      # [R, T] int32 sequence id
    start: Array    # [R, T] bool, first token of its sequence
    end: Array      # [R, T] bool, last token of its sequence
    num_seqs: int


def token_segments(batch: int, length: int, cu_seqlens=None) -> TokenSegments:
    t = jnp.arange(length, dtype=jnp.int32)
    if cu_seqlens is None:
        seq = jnp.broadcast_to(jnp.arange(batch, dtype=jnp.int32)[:, None], (batch, length))
        start = jnp.broadcast_to(t == 0, (batch, length))
        end = jnp.broadcast_to(t == length - 1, (batch, length))
        return TokenSegments(seq, start, end, batch)
    cu = jnp.asarray(cu_seqlens, jnp.int32)
    n = cu.shape[0] - 1
    seq = jnp.clip(jnp.searchsorted(cu, t, side="right") - 1, 0, n - 1)
    return TokenSegments(seq[None], (t == cu[seq])[None], (t == cu[seq + 1] - 1)[None], n)
