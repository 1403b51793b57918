"""Shared cores for the diagonal-decay families (linear_attn, simple_gla, gla).

All three are the recurrence ``S_t = Diag(exp(g_t)) S_{t-1} + k_t v_tᵀ``, ``o_t = S_tᵀ (s q_t)``
with a log gate that is absent (linear_attn), a scalar per head (simple_gla) or a vector per key
dimension (gla).  This module holds

* :func:`check_common`: the argument checks every entry point runs;
* :func:`naive_diag`: the float32 oracle (a plain ``lax.scan`` per sequence, no packing tricks);
* :func:`recurrent_diag`: the token-by-token form on the shared packing plumbing (decoding);
* :func:`chunk_scalar`: the chunkwise form for no gate or a scalar gate (REFERENCE §1.2).

The per-dimension chunk form lives in :mod:`ops.gla.chunk`.  Gates are log decays (``g <= 0``);
every exponent evaluated in the chunk forms is ``<= 0`` and masked before ``exp``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from ops import _common as cm

Array = jax.Array
HIGHEST = jax.lax.Precision.HIGHEST


def einsum(spec: str, *xs):
    """float32 einsum at full precision (no TF32/bf16 passes on accelerators)."""
    return jnp.einsum(spec, *xs, precision=HIGHEST, preferred_element_type=jnp.float32)


# ----------------------------------------------------------------------------------------------
# Checks
# ----------------------------------------------------------------------------------------------

def check_common(q, k, v, initial_state, cu_seqlens, scale):
    """Runs the shared checks; returns ``(B, T, H, K, V, N, scale)``."""
    B, T, H, K, V = cm.check_qkv(q, k, v)
    N = cm.check_cu_seqlens(cu_seqlens, B, T)
    cm.check_initial_state(initial_state, N, H, K, V)
    if scale is not None and not isinstance(scale, (int, float)):
        if not (hasattr(scale, "shape") and np.ndim(scale) == 0):
            raise ValueError(f"scale must be a Python number or a scalar, got {type(scale).__name__}")
    return B, T, H, K, V, N, cm.resolve_scale(scale, K)


def check_bool(name: str, value) -> None:
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{name} must be a Python bool, got {value!r}")


# ----------------------------------------------------------------------------------------------
# Naive oracle: one plain scan per sequence, float32
# ----------------------------------------------------------------------------------------------

def _scan_one(q, k, v, gk, scale, h0):
    """q, k, gk: [B, T, H, K] (gk may be None); v: [B, T, H, V]; h0: [B, H, K, V] f32."""

    def step(S, x):
        qt, kt, vt, gt = x
        if gt is not None:
            S = jnp.exp(gt)[..., None] * S
        S = S + kt[..., :, None] * vt[..., None, :]
        o = jnp.sum(S * (scale * qt)[..., :, None], axis=-2)
        return S, o

    move = lambda a: None if a is None else jnp.moveaxis(a, 1, 0)
    S, o = jax.lax.scan(step, h0, (move(q), move(k), move(v), move(gk)))
    return jnp.moveaxis(o, 0, 1), S


def naive_diag(q, k, v, gk, scale, initial_state, cu_seqlens):
    """Float32 oracle for ``S_t = Diag(exp(gk_t)) S_{t-1} + k_t v_tᵀ``.

    ``gk`` is None or broadcastable to ``[B, T, H, K]`` (``[B, T, H, 1]`` for a scalar gate).
    With ``cu_seqlens`` (which must then be concrete) each sequence is run separately.
    Returns ``(o [B, T, H, V] float32, final [N, H, K, V] float32)``.
    """
    f32 = lambda a: None if a is None else jnp.asarray(a, jnp.float32)
    q, k, v, gk = f32(q), f32(k), f32(v), f32(gk)
    B, T, H, K = q.shape
    V = v.shape[-1]
    if cu_seqlens is None:
        h0 = jnp.zeros((B, H, K, V), jnp.float32) if initial_state is None else initial_state
        return _scan_one(q, k, v, gk, scale, h0)
    if isinstance(cu_seqlens, jax.core.Tracer):
        raise ValueError("naive_* ops need a concrete cu_seqlens (they loop over sequences in Python)")
    cu = np.asarray(cu_seqlens)
    N = len(cu) - 1
    outs, finals = [], []
    for n in range(N):
        a, b = int(cu[n]), int(cu[n + 1])
        h0 = (jnp.zeros((1, H, K, V), jnp.float32) if initial_state is None
              else initial_state[n:n + 1])
        if b == a:
            finals.append(h0)
            continue
        sl = lambda x: None if x is None else x[:, a:b]
        o, S = _scan_one(sl(q), sl(k), sl(v), sl(gk), scale, h0)
        outs.append(o)
        finals.append(S)
    return jnp.concatenate(outs, axis=1), jnp.concatenate(finals, axis=0)


# ----------------------------------------------------------------------------------------------
# Recurrent form: token by token on the shared segment plumbing (jit-able with packing)
# ----------------------------------------------------------------------------------------------

def recurrent_diag(q, k, v, gk, scale, initial_state, cu_seqlens, reverse: bool = False):
    """Token-by-token form; same contract as :func:`naive_diag` but jit-able with packing.

    ``reverse=True`` runs every sequence from its last token to its first (FLA's ``reverse``).
    """
    B, T, H, K = q.shape
    V = v.shape[-1]
    seg = cm.token_segments(B, T, cu_seqlens)
    f32 = lambda a: None if a is None else jnp.asarray(a, jnp.float32)
    xs = (f32(q), f32(k), f32(v), f32(gk))

    def step(S, x):
        qt, kt, vt, gt = x
        if gt is not None:
            S = jnp.exp(gt)[..., None] * S
        S = S + kt[..., :, None] * vt[..., None, :]
        o = jnp.einsum("rhkv,rhk->rhv", S, scale * qt, precision=HIGHEST)
        return S, o

    return cm.scan_tokens(step, seg, xs, initial_state, (H, K, V), reverse=reverse)


# ----------------------------------------------------------------------------------------------
# Chunk layout helpers
# ----------------------------------------------------------------------------------------------

def to_chunk_major(x: Array, plan: cm.ChunkPlan, packed: bool) -> Array:
    """``[B, T, H, ...]`` -> ``[NC, R, H, C, ...]`` float32, zeros in padding slots.

    Chunk-major order makes per-chunk quantities ``[NC*R*H, ...]`` reshape for free into the
    ``[NC, R, H, ...]`` layout the state scan consumes and produces (states are as large as q,
    so every avoided transpose matters).  Unpacked batches use pad + reshape (no gather).
    """
    R, NC, C = plan.index.shape
    x = jnp.asarray(x, jnp.float32)
    if packed:
        xc = cm.to_chunks(x, plan)                                   # [R, NC, C, H, ...]
    else:
        T = x.shape[1]
        pad = [(0, 0)] * x.ndim
        pad[1] = (0, NC * C - T)
        xc = jnp.pad(x, pad).reshape((x.shape[0], NC, C) + x.shape[2:])
    return jnp.moveaxis(jnp.moveaxis(xc, 3, 2), 1, 0)                # [NC, R, H, C, ...]


def from_chunk_major(xc: Array, plan: cm.ChunkPlan, packed: bool) -> Array:
    """Inverse of :func:`to_chunk_major`: ``[NC, R, H, C, ...]`` -> ``[R, T, H, ...]``."""
    xc = jnp.moveaxis(jnp.moveaxis(xc, 0, 1), 2, 3)                  # [R, NC, C, H, ...]
    if packed:
        return cm.from_chunks(xc, plan)
    R, NC, C = xc.shape[:3]
    return xc.reshape((R, NC * C) + xc.shape[3:])[:, :plan.length]


def flat_chunks(x: Array) -> Array:
    """``[NC, R, H, C, ...]`` -> ``[M, C, ...]`` with M = NC*R*H.

    The batched phases run on rank-3 arrays: XLA's CPU loop emitter handles high-rank broadcasts
    inside fused reductions badly (the GLA diagonal blocks were ~35x slower at rank 7)."""
    return x.reshape((-1,) + x.shape[3:])


def scan_states(step, plan: cm.ChunkPlan, xs, initial_state, state_shape, packed: bool):
    """Phase 2: the sequential state recurrence over chunk columns.

    ``step(S, x_c) -> (S_next, None)`` with ``S`` ``[R, *state_shape]``; ``xs`` leaves have
    leading ``[NC, R]``.  Returns ``(incoming [NC, R, *state_shape], final [N, *state_shape])``.
    Packed batches go through :func:`ops._common.scan_chunks` (state resets at sequence starts);
    an unpacked batch has one sequence per row, so a plain ``lax.scan`` seeded with the initial
    state does the same job without the per-step reset and the final-state scatter.
    """
    if packed:
        swap = lambda a: jnp.moveaxis(a, 0, 1)
        _, incoming, final = cm.scan_chunks(step, plan, jax.tree.map(swap, xs), initial_state,
                                            state_shape)
        return swap(incoming), final
    R = plan.first.shape[0]
    h0 = cm.vary_like(jnp.zeros((R,) + tuple(state_shape), jnp.float32) if initial_state is None
                      else initial_state, xs)

    def body(S, x):
        return step(S, x)[0], S

    final, incoming = jax.lax.scan(body, h0, xs)
    return incoming, final


def tril_mask(C: int) -> Array:
    """``[C, C]`` float32 mask, 1 where i >= j.

    Masks are applied by multiplication, ``exp(diff * m) * m``: the exponent is 0 (not +large)
    above the diagonal *before* ``exp`` and the product is zeroed after.  (XLA on CPU vectorises
    a multiply by a constant but not a ``select`` against a broadcast constant mask inside a
    fused reduction: ``jnp.where`` there was 5-30x slower.)
    """
    i = np.arange(C)
    return jnp.asarray((i[:, None] >= i[None, :]).astype(np.float32))


def chunk_cumsum(g: Array, axis: int) -> Array:
    """Inclusive cumulative sum along a chunk axis of length C, as a ``[C, C]`` matmul.

    ``jnp.cumsum`` lowers to a reduce-window that XLA may fuse into (and recompute inside) its
    consumers, which made the GLA intra-chunk pass ~50x slower; a dot is never fused that way.
    """
    C = g.shape[axis]
    g = jnp.moveaxis(g, axis, -1)
    G = jnp.einsum("...j,ij->...i", g, tril_mask(C), precision=HIGHEST)
    return jnp.moveaxis(G, -1, axis)


# ----------------------------------------------------------------------------------------------
# Chunk form for no gate / scalar gate (REFERENCE §1.2)
# ----------------------------------------------------------------------------------------------

@jax.checkpoint
def _scalar_intra(q, k, v, g):
    """Phase 1, batched over every chunk.  q, k: [M, C, K] (q already scaled); v: [M, C, V];
    g: [M, C] or None (M = NC*R*H).  Returns (o_intra [M, C, V], dS [M, K, V], decay [M] or None)."""
    C = q.shape[-2]
    mask = tril_mask(C)
    A = einsum("mik,mjk->mij", q, k)
    if g is None:
        return einsum("mij,mjv->miv", A * mask, v), einsum("mck,mcv->mkv", k, v), None
    G = chunk_cumsum(g, -1)                                           # [M, C]
    diff = G[:, :, None] - G[:, None, :]
    A = A * (jnp.exp(diff * mask) * mask)
    o = einsum("mij,mjv->miv", A, v)
    GL = G[:, -1:]
    dS = einsum("mck,mcv->mkv", k * jnp.exp(GL - G)[..., None], v)
    return o, dS, jnp.exp(GL[:, 0])


@jax.checkpoint
def _scalar_inter(q, g, S_in):
    """Phase 3: (s·Q ⊙ exp(G)) S_in for every chunk.  q: [M, C, K]; S_in: [M, K, V]."""
    if g is not None:
        q = q * jnp.exp(chunk_cumsum(g, -1))[..., None]
    return einsum("mck,mkv->mcv", q, S_in)


def chunk_scalar(q, k, v, g, scale, initial_state, cu_seqlens, chunk_size: int):
    """Chunkwise form for ``g`` None (linear attention) or scalar ``[B, T, H]`` (simple GLA).

    Phase 1 (intra-chunk outputs and per-chunk state contributions) and phase 3 (the
    inter-chunk term) are batched over all chunks; phase 2 is the short sequential scan over
    chunks.  Phases 1 and 3 are ``jax.checkpoint``-ed: the backward recomputes their C×C
    temporaries instead of storing them.  Returns ``(o [B, T, H, V] f32, final [N, H, K, V] f32)``.
    """
    B, T, H, K = q.shape
    V = v.shape[-1]
    packed = cu_seqlens is not None
    plan = cm.make_chunk_plan(B, T, chunk_size, cu_seqlens)
    R, NC, C = plan.index.shape
    flat = lambda x: flat_chunks(to_chunk_major(x, plan, packed))
    qc, kc, vc = flat(q) * scale, flat(k), flat(v)
    gc = None if g is None else flat(g)
    o_intra, dS, decay = _scalar_intra(qc, kc, vc, gc)

    per_chunk = lambda x: x.reshape((NC, R, H) + x.shape[1:])        # free reshape
    if decay is None:
        step = lambda S, ds: (S + ds, None)
        xs = per_chunk(dS)
    else:
        step = lambda S, x: (x[0][..., None, None] * S + x[1], None)
        xs = (per_chunk(decay), per_chunk(dS))
    S_in, final = scan_states(step, plan, xs, initial_state, (H, K, V), packed)
    o = o_intra + _scalar_inter(qc, gc, S_in.reshape(-1, K, V))
    return from_chunk_major(o.reshape(NC, R, H, C, V), plan, packed), final
