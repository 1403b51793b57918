"""The chunk form of the delta rules (DeltaNet and Gated DeltaNet): the WY / UT transform.

Per chunk of C tokens, with ``G`` the in-chunk cumulative log decay (``G = 0`` for DeltaNet) and
``D_ij = exp(G_i - G_j)`` for i >= j (:mod:`.decay`), all chunks at once:

    A      = strictly-lower(Diag(β) (K Kᵀ ⊙ D))
    T      = (I + A)^{-1} Diag(β)                     (:func:`.solve_tril.unit_tril_inverse`)
    W      = T (K ⊙ exp(G)),      U = T V
    P      = (Q Kᵀ) ⊙ D                               (q already scaled)
    Q_eff  = Q ⊙ exp(G) - P W,    O_loc = P U,    K_dec = K ⊙ exp(G_C - G)

then the only sequential part, one scan over chunks, ``S_next = exp(G_C) S + K_decᵀ (U - W S)``,
and, batched again from the incoming states, ``O = Q_eff S_in + O_loc``.  ``docs/ops_delta.md``
derives it.  The chunk's affine map of the state, ``S_next = M S + K_decᵀ U`` with
``M = exp(G_C) I - K_decᵀ W``, is :func:`transitions`.

The whole forward is ``jax.checkpoint``-ed: the backward recomputes it, keeping O(T·C)
intra-chunk arrays and one state per chunk, i.e. memory linear in T.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from . import decay
from .layout import flatten_chunks, from_chunk_major, make_chunk_plan, to_chunk_major
from .precision import matmul
from .prepare import Inputs
from .scan import scan_chunk_states
from .solve_tril import unit_tril_inverse

Array = jax.Array


def intra(q: Array | None, k: Array, v: Array, g: Array | None, beta: Array):
    """Per-chunk quantities.  ``q, k [M, C, K]``, ``v [M, C, V]``, ``g, beta [M, C]`` (g may be None).

    Returns ``(W, U, K_dec, total decay [M] or None, Q_eff, O_loc)`` (the last two None without q).
    """
    C = k.shape[-2]
    strict = decay.tril_mask(C) - jnp.eye(C, dtype=jnp.float32)
    kt = jnp.swapaxes(k, -1, -2)
    if g is None:
        D = decay.tril_mask(C)
        kg, kdec, qg, total = k, k, q, None
    else:
        G, R = decay.chunk_log_decay(g, -1)
        D = decay.pairwise_decay(G, R)
        start = jnp.exp(decay.from_start(G, R))[..., None]
        kg, qg = k * start, (None if q is None else q * start)
        kdec = k * jnp.exp(decay.span(G[..., -1:], G, R[..., -1:], R))[..., None]
        total = jnp.exp(decay.from_start(G[..., -1], R[..., -1]))
    a = beta[..., :, None] * matmul(k, kt) * D * strict
    t = unit_tril_inverse(a)
    w = matmul(t, beta[..., None] * kg)
    u = matmul(t, beta[..., None] * v)
    if q is None:
        return w, u, kdec, total, None, None
    p = matmul(q, kt) * D
    return w, u, kdec, total, qg - matmul(p, w), matmul(p, u)


def _state_step(S, x):
    """``S_next = decay S + K_decᵀ (U - W S)`` for one chunk column; S ``[R, H, K, V]``."""
    w, u, kdec, total = x
    S_new = S if total is None else S * total[..., None, None]
    return S_new + matmul(jnp.swapaxes(kdec, -1, -2), u - matmul(w, S))


@functools.partial(jax.jit, static_argnums=(7,))            # one compilation when called outside jit
@functools.partial(jax.checkpoint, static_argnums=(7,))
def _forward(q, k, v, g, beta, h0, cu_seqlens, chunk_size):
    B, T, H, K = k.shape
    V = v.shape[-1]
    plan = make_chunk_plan(B, T, min(chunk_size, T), cu_seqlens)
    R, NC, C = plan.index.shape
    flat = lambda a: flatten_chunks(to_chunk_major(a, plan))
    w, u, kdec, total, q_eff, o_loc = intra(flat(q), flat(k), flat(v), None if g is None else flat(g),
                                            flat(beta))
    per_chunk = lambda a: None if a is None else a.reshape((NC, R, H) + a.shape[1:])
    xs = tuple(per_chunk(a) for a in (w, u, kdec, total))
    S_in, final = scan_chunk_states(_state_step, plan, xs, h0, (H, K, V))
    o = matmul(q_eff, S_in.reshape(-1, K, V)) + o_loc
    return from_chunk_major(o.reshape(NC, R, H, C, V), plan), final


def chunk_delta(x: Inputs, chunk_size: int) -> tuple[Array, Array]:
    """The chunk form on :class:`Inputs` (``x.g`` or None; no ``gk``/``gv``).  Returns float32
    ``(o [B, T, HV, V], final [N, HV, K, V])``."""
    return _forward(x.q, x.k, x.v, x.g, x.beta, x.initial_state, x.cu_seqlens, chunk_size)


def transitions(x: Inputs, chunk_size: int) -> tuple[Array, Array]:
    """``(M [B, NC, HV, K, K], S_ext [B, NC, HV, K, V])`` with ``S_next = M S + S_ext`` per chunk.

    Chunk c covers tokens ``[c·C, (c+1)·C)`` (the last one partial); unpacked batches only.
    """
    return _transitions(x.k, x.v, x.g, x.beta, chunk_size)


@functools.partial(jax.jit, static_argnums=(4,))
def _transitions(k, v, g, beta, chunk_size):
    B, T, H, K = k.shape
    plan = make_chunk_plan(B, T, min(chunk_size, T))
    R, NC, C = plan.index.shape
    flat = lambda a: flatten_chunks(to_chunk_major(a, plan))
    w, u, kdec, total, _, _ = intra(None, flat(k), flat(v), None if g is None else flat(g), flat(beta))
    kdec_t = jnp.swapaxes(kdec, -1, -2)
    eye = jnp.eye(K, dtype=jnp.float32)
    m = (eye if total is None else total[:, None, None] * eye) - matmul(kdec_t, w)
    to_batch_major = lambda a: jnp.moveaxis(a.reshape((NC, R, H) + a.shape[1:]), 0, 1)
    return to_batch_major(m), to_batch_major(matmul(kdec_t, u))
