"""The sequential parts: the state scan over chunks and the token-by-token scan.

Both reset the state to a sequence's initial state (or zeros) where the sequence starts, so a
packed row never carries information across a boundary, and both return the final state of
every sequence.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from .layout import ChunkPlan, TokenSegments

Array = jax.Array


def vary_like(x: Array, refs) -> Array:
    """``x`` typed as varying over every mesh axis that some leaf of ``refs`` varies over.

    Inside ``shard_map(check_vma=True)`` a ``lax.scan`` carry seeded with fresh zeros is typed
    replicated while the body's output varies per device, which the type check rejects.  Outside
    ``shard_map`` nothing varies and ``x`` comes back unchanged.
    """
    missing = frozenset().union(*(_varying_axes(r) for r in jax.tree.leaves(refs))) - _varying_axes(x)
    return jax.lax.pcast(x, tuple(sorted(missing)), to="varying") if missing else x


def _varying_axes(x) -> frozenset:
    aval = jax.typeof(x)
    mat = getattr(aval, "mat", None)            # jax 0.10: aval.mat.varying; older and newer: aval.vma
    return frozenset(getattr(mat, "varying", None) or getattr(aval, "vma", None) or ())


def _initial(initial_state: Array | None, n: int, state_shape: tuple[int, ...], refs) -> Array:
    h0 = jnp.zeros((n,) + state_shape, jnp.float32) if initial_state is None else initial_state
    return vary_like(h0, refs)


def scan_chunk_states(step: Callable, plan: ChunkPlan, xs, initial_state: Array | None,
                      state_shape: tuple[int, ...]) -> tuple[Array, Array]:
    """Runs the chunk recurrence ``S_next = step(S, x_c)`` over the chunk axis.

    Args:
      step: ``(S [R, *state_shape], x_c) -> S_next`` for one chunk column.
      plan: the chunk plan (R rows, NC chunks).
      xs: pytree of per-chunk inputs with leading axes ``[NC, R]`` (chunk-major).
      initial_state: ``[N, *state_shape]`` float32, or None for zeros.
      state_shape: e.g. ``(H, K, V)``.

    Returns:
      ``(incoming [NC, R, *state_shape], final [N, *state_shape])``: the state each chunk starts
      from, and each sequence's state after its last chunk (its initial state if it is empty).
    """
    R = plan.first.shape[0]
    h0 = _initial(initial_state, plan.num_seqs, state_shape, xs)
    if not plan.packed:                                   # one sequence per row: no resets needed
        final, incoming = jax.lax.scan(lambda S, x: (step(S, x), S), h0, xs)
        return incoming, final
    h0_pad = jnp.concatenate([h0, jnp.zeros((1,) + state_shape, jnp.float32)])   # slot N: unused chunks
    expand = (slice(None),) + (None,) * len(state_shape)

    def body(S, inp):
        first, seq, x = inp
        S = jnp.where(first[expand], h0_pad[seq], S)
        S_next = step(S, x)
        return S_next, (S, S_next)

    init = vary_like(jnp.zeros((R,) + state_shape, jnp.float32), xs)
    swap = lambda a: jnp.moveaxis(a, 1, 0)
    _, (incoming, outgoing) = jax.lax.scan(body, init, (swap(plan.first), swap(plan.seq), xs))
    target = jnp.where(swap(plan.last), swap(plan.seq), plan.num_seqs).reshape(-1)
    final = h0.at[target].set(outgoing.reshape((-1,) + state_shape), mode="drop")
    return incoming, final


def scan_tokens(step: Callable, segments: TokenSegments, xs, initial_state: Array | None,
                state_shape: tuple[int, ...], reverse: bool = False) -> tuple[Array, Array]:
    """Token-by-token recurrence ``(S, y_t) = step(S, x_t)``; ``xs`` leaves lead with ``[R, T]``.

    With ``reverse`` every sequence runs from its last token to its first.  Returns
    ``(ys [R, T, ...], final [N, *state_shape])``.
    """
    n = segments.num_seqs
    R = segments.seq.shape[0]
    h0 = _initial(initial_state, n, state_shape, xs)
    expand = (slice(None),) + (None,) * len(state_shape)
    begin, finish = (segments.end, segments.start) if reverse else (segments.start, segments.end)

    def body(S, inp):
        is_begin, seq, x = inp
        S = jnp.where(is_begin[expand], h0[seq], S)
        S, y = step(S, x)
        return S, (y, S)

    move = lambda a: jnp.moveaxis(a, 1, 0)
    init = vary_like(jnp.zeros((R,) + state_shape, jnp.float32), xs)
    _, (ys, states) = jax.lax.scan(body, init, (move(begin), move(segments.seq), jax.tree.map(move, xs)),
                                   reverse=reverse)
    target = jnp.where(finish, segments.seq, n).reshape(-1)
    final = h0.at[target].set(move(states).reshape((-1,) + state_shape), mode="drop")
    return jax.tree.map(move, ys), final
