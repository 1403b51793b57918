"""The chunk form of the diagonal-decay families (linear_attn, simple_gla, gla).

All three are ``S_t = Diag(exp(g_t)) S_{t-1} + k_t v_tᵀ``, ``o_t = S_tᵀ q_t`` (q scaled) with no
gate, a scalar gate per head or a gate per key dimension.  Per chunk of C tokens, with ``G`` the
in-chunk cumulative log decay (:mod:`.decay`), three phases:

1. batched over every chunk: the intra-chunk output ``(Q Kᵀ ⊙ D) V`` with
   ``D_ij = exp(G_i - G_j)`` for i >= j, the chunk's state contribution
   ``ΔS = (K ⊙ exp(G_C - G))ᵀ V`` and its total decay ``exp(G_C)``;
2. sequential over chunks: ``S_next = exp(G_C) ⊙ S + ΔS`` (:func:`.scan.scan_chunk_states`);
3. batched again: ``O = O_intra + (Q ⊙ exp(G)) S_in``.

Phases 1 and 3 are ``jax.checkpoint``-ed, so the backward pass recomputes their C×C temporaries
and keeps only the inputs and one state per chunk: memory linear in T.  Per-key-dimension gates
need sub-chunking in phase 1, which lives with the GLA family (``gla/chunk.py``) and plugs into
:func:`chunk_diagonal` as ``intra``.
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp

from . import decay
from .layout import flatten_chunks, from_chunk_major, make_chunk_plan, to_chunk_major
from .precision import einsum
from .prepare import Inputs
from .scan import scan_chunk_states

Array = jax.Array


@jax.checkpoint
def intra_scalar(q: Array, k: Array, v: Array, g: Array | None):
    """Phase 1 for no gate or a scalar gate.  ``q, k [M, C, K]``, ``v [M, C, V]``, ``g [M, C]`` or None.

    Returns ``(o_intra [M, C, V], dS [M, K, V], decay [M] or None)``.
    """
    mask = decay.tril_mask(q.shape[-2])
    A = einsum("mik,mjk->mij", q, k)
    if g is None:
        return einsum("mij,mjv->miv", A * mask, v), einsum("mck,mcv->mkv", k, v), None
    G, R = decay.chunk_log_decay(g, -1)
    o = einsum("mij,mjv->miv", A * decay.pairwise_decay(G, R), v)
    to_end = decay.span(G[:, -1:], G, R[:, -1:], R)                  # [M, C]
    dS = einsum("mck,mcv->mkv", k * jnp.exp(to_end)[..., None], v)
    return o, dS, jnp.exp(decay.from_start(G[:, -1], R[:, -1]))


@jax.checkpoint
def inter(q: Array, g: Array | None, S_in: Array) -> Array:
    """Phase 3: ``(Q ⊙ exp(G)) S_in``.  ``q [M, C, K]``, ``g [M, C]``, ``[M, C, K]`` or None, ``S_in [M, K, V]``."""
    if g is not None:
        G, R = decay.chunk_log_decay(g, 1)
        w = jnp.exp(decay.from_start(G, R))
        q = q * (w[..., None] if w.ndim == 2 else w)
    return einsum("mck,mkv->mcv", q, S_in)


def chunk_diagonal(x: Inputs, chunk_size: int, intra: Callable = intra_scalar, intra_args: tuple = ()):
    """The chunk form for ``x.g`` (scalar gate), ``x.gk`` (per key dimension, with GLA's ``intra``)
    or neither.  ``intra(q, k, v, g, *intra_args)`` is phase 1 (a module-level function: it is a
    static argument of the compiled core).  Returns ``(o [B, T, H, V], final [N, H, K, V])`` float32.
    """
    gate = x.g if x.gk is None else x.gk
    return _chunk_diagonal(x.q, x.k, x.v, gate, x.initial_state, x.cu_seqlens, chunk_size, intra, intra_args)


# Compiled as a whole, so that a call outside jit compiles once instead of dispatching every
# primitive (inside an outer jit it is simply inlined).
@functools.partial(jax.jit, static_argnums=(6, 7, 8))
def _chunk_diagonal(q, k, v, gate, h0, cu_seqlens, chunk_size, intra, intra_args):
    B, T, H, K = q.shape
    V = v.shape[-1]
    plan = make_chunk_plan(B, T, chunk_size, cu_seqlens)
    R, NC, C = plan.index.shape
    flat = lambda a: flatten_chunks(to_chunk_major(a, plan))
    qc, kc, vc = flat(q), flat(k), flat(v)
    gc = None if gate is None else flat(gate)
    o_intra, dS, total = intra(qc, kc, vc, gc, *intra_args)

    per_chunk = lambda a: a.reshape((NC, R, H) + a.shape[1:])        # free reshape
    if total is None:
        S_in, final = scan_chunk_states(lambda S, ds: S + ds, plan, per_chunk(dS), h0, (H, K, V))
    else:
        lift = (lambda d: d[..., None, None]) if total.ndim == 1 else (lambda d: d[..., None])
        S_in, final = scan_chunk_states(lambda S, c: lift(c[0]) * S + c[1], plan,
                                        (per_chunk(total), per_chunk(dS)), h0, (H, K, V))
    o = o_intra + inter(qc, gc, S_in.reshape(-1, K, V))
    return from_chunk_major(o.reshape(NC, R, H, C, V), plan), final
