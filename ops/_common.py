"""Shared plumbing for the op families: argument checks and the chunk/segment layout.

Every family works on the layout ``[B, T, H, D]`` and either a plain batch (``B`` independent
sequences) or a packed batch (``B == 1`` with ``cu_seqlens``).  Both are reduced here to one
*chunk plan*: a static grid ``[R, NC, C]`` of token positions in which no chunk straddles two
sequences, plus per-chunk flags saying where sequences start and end.  Padding slots in the grid
are filled with zeros, which is a neutral token for every family (k = v = 0 writes nothing,
g = 0 decays nothing, beta = 0 leaves the state untouched).
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


# ----------------------------------------------------------------------------------------------
# Argument checks
# ----------------------------------------------------------------------------------------------

def _shape(x) -> tuple[int, ...]:
    return tuple(getattr(x, "shape", ()))


def check_float(name: str, x) -> None:
    dtype = getattr(x, "dtype", None)
    if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"{name} must be a floating-point array, got dtype {dtype}")


def check_qkv(q, k, v, *, allow_grouped_values: bool = False) -> tuple[int, int, int, int, int]:
    """Checks ``q, k: [B, T, H, K]`` and ``v: [B, T, H, V]``; returns ``(B, T, H, K, V)``.

    With ``allow_grouped_values`` v may have ``HV`` heads, a multiple of H (grouped-value GDN).
    """
    for name, x in (("q", q), ("k", k), ("v", v)):
        if len(_shape(x)) != 4:
            raise ValueError(f"{name} must have rank 4 [B, T, H, D], got shape {_shape(x)}")
        check_float(name, x)
    if _shape(q) != _shape(k):
        raise ValueError(f"q and k must have the same shape [B, T, H, K], got q {_shape(q)} and k {_shape(k)}")
    B, T, H, K = q.shape
    if v.shape[:2] != (B, T):
        raise ValueError(f"v must have shape [B={B}, T={T}, H, V] like q, got {_shape(v)}")
    if allow_grouped_values:
        if v.shape[2] % H:
            raise ValueError(f"v heads must be a multiple of q/k heads {H}, got v shape {_shape(v)}")
    elif v.shape[2] != H:
        raise ValueError(f"v must have H={H} heads like q and k, got v shape {_shape(v)}")
    if T < 1:
        raise ValueError(f"sequence length must be at least 1, got q shape {_shape(q)}")
    return B, T, H, K, v.shape[3]


def check_shape(name: str, x, expected: tuple[int, ...], what: str) -> None:
    """Raises ValueError unless ``x.shape == expected``; ``what`` names the layout, e.g. '[B, T, H]'."""
    if x is None:
        raise ValueError(f"{name} is required with shape {what} = {expected}")
    if _shape(x) != tuple(expected):
        raise ValueError(f"{name} must have shape {what} = {tuple(expected)}, got {_shape(x)}")
    check_float(name, x)


def check_initial_state(initial_state, n: int, h: int, k: int, v: int) -> None:
    if initial_state is None:
        return
    check_shape("initial_state", initial_state, (n, h, k, v), "[N, H, K, V]")
    if initial_state.dtype != jnp.float32:
        raise ValueError(f"initial_state must be float32 (states accumulate in float32), got {initial_state.dtype}")


def check_cu_seqlens(cu_seqlens, batch: int, length: int) -> int:
    """Validates packing offsets; returns the number of sequences N (``B`` when unpacked)."""
    if cu_seqlens is None:
        return batch
    if batch != 1:
        raise ValueError(f"cu_seqlens requires a packed batch with B == 1, got B = {batch}")
    shape = _shape(cu_seqlens)
    if len(shape) != 1 or shape[0] < 2:
        raise ValueError(f"cu_seqlens must have shape [N + 1] with N >= 1, got shape {shape}")
    if not jnp.issubdtype(cu_seqlens.dtype, jnp.integer):
        raise ValueError(f"cu_seqlens must be an integer array, got dtype {cu_seqlens.dtype}")
    if not isinstance(cu_seqlens, jax.core.Tracer):
        cu = np.asarray(cu_seqlens)
        if cu[0] != 0 or cu[-1] != length or np.any(np.diff(cu) < 0):
            raise ValueError(
                f"cu_seqlens must start at 0, end at T = {length} and be non-decreasing, got {cu.tolist()}")
    return shape[0] - 1


def resolve_scale(scale: float | None, key_dim: int) -> float:
    return key_dim ** -0.5 if scale is None else scale


def check_chunk_size(chunk_size: int) -> None:
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")


# ----------------------------------------------------------------------------------------------
# Chunk plan: a static [R, NC, C] grid of token positions, no chunk straddling two sequences
# ----------------------------------------------------------------------------------------------

class ChunkPlan(NamedTuple):
    """Where each chunk slot's tokens come from.

    Attributes:
      index: ``[R, NC, C]`` int32 token position within the row's T axis (clamped to a valid
        position for padding slots; use ``valid`` to mask).
      valid: ``[R, NC, C]`` bool, True for real tokens.
      first: ``[R, NC]`` bool, the chunk opens a sequence (its incoming state is that sequence's
        initial state).
      last: ``[R, NC]`` bool, the chunk closes a sequence (its outgoing state is the final state).
      seq: ``[R, NC]`` int32 sequence id in ``[0, N)`` (N for unused chunk slots).
      num_seqs: N.
      length: T.
    """

    index: Array
    valid: Array
    first: Array
    last: Array
    seq: Array
    num_seqs: int
    length: int


def make_chunk_plan(batch: int, length: int, chunk_size: int, cu_seqlens=None) -> ChunkPlan:
    """Builds the chunk grid for a plain batch (R = B rows) or a packed one (R = 1)."""
    C, T = chunk_size, length
    if cu_seqlens is None:
        nc = -(-T // C)
        pos = jnp.arange(nc * C, dtype=jnp.int32).reshape(nc, C)
        valid = pos < T
        index = jnp.minimum(pos, T - 1)
        c = jnp.arange(nc)
        first, last = c == 0, c == nc - 1
        rows = jnp.arange(batch, dtype=jnp.int32)[:, None]
        return ChunkPlan(
            index=jnp.broadcast_to(index, (batch, nc, C)),
            valid=jnp.broadcast_to(valid, (batch, nc, C)),
            first=jnp.broadcast_to(first, (batch, nc)),
            last=jnp.broadcast_to(last, (batch, nc)),
            seq=jnp.broadcast_to(rows, (batch, nc)),
            num_seqs=batch, length=T)
    cu = jnp.asarray(cu_seqlens, jnp.int32)
    n = cu.shape[0] - 1
    lens = cu[1:] - cu[:-1]
    per_seq = (lens + C - 1) // C                                  # chunks per sequence (0 if empty)
    chunk_start = jnp.concatenate([jnp.zeros(1, jnp.int32), jnp.cumsum(per_seq)])  # [N + 1]
    nc = T // C + n                                                # static bound on sum(ceil(len / C))
    slot = jnp.arange(nc, dtype=jnp.int32)
    seq = jnp.clip(jnp.searchsorted(chunk_start, slot, side="right") - 1, 0, n - 1)
    used = slot < chunk_start[-1]
    j = slot - chunk_start[seq]                                    # chunk number within its sequence
    offset = j[:, None] * C + jnp.arange(C, dtype=jnp.int32)[None, :]
    valid = used[:, None] & (offset < lens[seq][:, None])
    index = jnp.clip(cu[seq][:, None] + offset, 0, T - 1)
    first = used & (j == 0)
    last = used & (j == per_seq[seq] - 1)
    seq = jnp.where(used, seq, n)
    return ChunkPlan(index=index[None], valid=valid[None], first=first[None], last=last[None],
                     seq=seq[None], num_seqs=n, length=T)


def to_chunks(x: Array, plan: ChunkPlan) -> Array:
    """``[B, T, ...]`` -> ``[R, NC, C, ...]`` with zeros in padding slots."""
    rows = jnp.arange(plan.index.shape[0])[:, None, None]
    xc = x[rows, plan.index]
    mask = plan.valid.reshape(plan.valid.shape + (1,) * (x.ndim - 2))
    return jnp.where(mask, xc, jnp.zeros((), x.dtype))


def from_chunks(xc: Array, plan: ChunkPlan) -> Array:
    """Inverse of :func:`to_chunks`: ``[R, NC, C, ...]`` -> ``[R, T, ...]`` (padding dropped)."""
    R = xc.shape[0]
    T = plan.length
    flat = xc.reshape((R, -1) + xc.shape[3:])
    target = jnp.where(plan.valid, plan.index, T).reshape(R, -1)    # padding scatters out of range
    rows = jnp.arange(R)[:, None]
    out = jnp.zeros((R, T) + xc.shape[3:], xc.dtype)
    return out.at[rows, target].set(flat, mode="drop")


def vary_like(x: Array, refs) -> Array:
    """``x`` typed as varying over every mesh axis that some leaf of ``refs`` varies over.

    Inside ``shard_map(check_vma=True)`` a ``lax.scan`` carry seeded with fresh zeros is typed
    replicated while the body's output varies per device, which the type check rejects. Outside
    ``shard_map`` (or with ``check_vma=False``) nothing varies and ``x`` comes back unchanged.
    """
    missing = frozenset().union(*(_varying_axes(r) for r in jax.tree.leaves(refs))) - _varying_axes(x)
    return jax.lax.pcast(x, tuple(sorted(missing)), to="varying") if missing else x


def _varying_axes(x) -> frozenset:
    aval = jax.typeof(x)
    mat = getattr(aval, "mat", None)            # jax 0.10: aval.mat.varying; older and newer: aval.vma
    return frozenset(getattr(mat, "varying", None) or getattr(aval, "vma", None) or ())


def scan_chunks(step: Callable, plan: ChunkPlan, xs, initial_state: Array | None,
                state_shape: tuple[int, ...]):
    """Runs ``step`` over the chunk axis, resetting the state at every sequence start.

    Args:
      step: ``(state [R, *state_shape], x_c) -> (new_state, y_c)`` for one chunk column.
      plan: the chunk plan.
      xs: pytree of arrays with leading axes ``[R, NC]``.
      initial_state: ``[N, *state_shape]`` float32 or None (zeros).
      state_shape: per-row state shape, e.g. ``(H, K, V)``.

    Returns:
      ``(ys, incoming, final)``: ``ys`` stacked ``[R, NC, ...]``; ``incoming`` ``[R, NC, *state_shape]``
      the state each chunk started from; ``final`` ``[N, *state_shape]`` the state after each
      sequence's last chunk (the initial state for an empty sequence).
    """
    R = plan.first.shape[0]
    n = plan.num_seqs
    h0 = jnp.zeros((n,) + state_shape, jnp.float32) if initial_state is None else initial_state
    h0 = vary_like(h0, xs)
    h0_pad = jnp.concatenate([h0, jnp.zeros((1,) + state_shape, jnp.float32)])  # row n: unused slots
    expand = (slice(None),) + (None,) * len(state_shape)

    def body(state, inp):
        first, seq, x = inp
        state = jnp.where(first[expand], h0_pad[seq], state)
        new_state, y = step(state, x)
        return new_state, (y, state, new_state)

    move = lambda a: jnp.moveaxis(a, 1, 0)
    init = vary_like(jnp.zeros((R,) + state_shape, jnp.float32), xs)
    _, (ys, incoming, outgoing) = jax.lax.scan(
        body, init, (move(plan.first), move(plan.seq), jax.tree.map(move, xs)))
    ys = jax.tree.map(move, ys)
    incoming, outgoing = move(incoming), move(outgoing)
    target = jnp.where(plan.last, plan.seq, n).reshape(-1)
    final = h0.at[target].set(outgoing.reshape((-1,) + state_shape), mode="drop")
    return ys, incoming, final


# ----------------------------------------------------------------------------------------------
# Token-level segments for the recurrent forms
# ----------------------------------------------------------------------------------------------

class TokenSegments(NamedTuple):
    """Per-token packing info for a row layout ``[R, T]``: sequence id, start and end flags."""

    seq: Array    # [R, T] int32
    start: Array  # [R, T] bool
    end: Array    # [R, T] bool
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
    start = t == cu[seq]
    end = t == cu[seq + 1] - 1
    return TokenSegments(seq[None], start[None], end[None], n)


def scan_tokens(step: Callable, segments: TokenSegments, xs, initial_state: Array | None,
                state_shape: tuple[int, ...], reverse: bool = False):
    """Token-by-token analogue of :func:`scan_chunks` (``xs`` leaves have leading ``[R, T]``).

    Returns ``(ys [R, T, ...], final [N, *state_shape])``.
    """
    n = segments.num_seqs
    R = segments.seq.shape[0]
    h0 = jnp.zeros((n,) + state_shape, jnp.float32) if initial_state is None else initial_state
    h0 = vary_like(h0, xs)
    expand = (slice(None),) + (None,) * len(state_shape)
    begin, finish = (segments.end, segments.start) if reverse else (segments.start, segments.end)

    def body(state, inp):
        is_begin, seq, x = inp
        state = jnp.where(is_begin[expand], h0[seq], state)
        new_state, y = step(state, x)
        return new_state, (y, new_state)

    move = lambda a: jnp.moveaxis(a, 1, 0)
    init = vary_like(jnp.zeros((R,) + state_shape, jnp.float32), xs)
    _, (ys, states) = jax.lax.scan(
        body, init, (move(begin), move(segments.seq), jax.tree.map(move, xs)), reverse=reverse)
    ys = jax.tree.map(move, ys)
    states = move(states)
    target = jnp.where(finish, segments.seq, n).reshape(-1)
    final = h0.at[target].set(states.reshape((-1,) + state_shape), mode="drop")
    return ys, final
