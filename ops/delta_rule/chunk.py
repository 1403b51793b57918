"""Chunkwise delta rule (WY / UT transform, REFERENCE §1.4), the training default.

Per chunk of C tokens (all chunks at once, batched), with G the in-chunk cumulative log decay
(G ≡ 0 for the plain delta rule) and q already multiplied by the scale:

    A      = tril(Diag(β) (K Kᵀ ⊙ exp(G_i − G_j)), −1)         masked before exp
    T      = (I + A)⁻¹ Diag(β)                                   forward substitution, float32
    W      = T (K ⊙ exp(G)),      U = T V
    P      = (Q Kᵀ) ⊙ exp(G_i − G_j) on i ≥ j, else 0
    Q_eff  = Q ⊙ exp(G) − P W,    O_loc = P U
    K_dec  = K ⊙ exp(G_C − G)

Then the only sequential part, one scan over chunks (states reset at packed-sequence starts):

    S_next = exp(G_C) S + K_decᵀ (U − W S)

and, batched again from the incoming states, ``O = Q_eff S + O_loc``.  The per-chunk K×K
transition ``M = exp(G_C) I − K_decᵀ W`` (``S_next = M S + K_decᵀ U``) is returned by
:func:`chunk_transitions` for sequence parallelism (REFERENCE §3.4).

Memory: the op is wrapped in ``jax.checkpoint``; the backward pass recomputes it, keeping O(T·C)
intra-chunk arrays and one ``[H, K, V]`` state per chunk, i.e. linear in T.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ops import _common
from ops.delta_rule import _args


# ----------------------------------------------------------------------------------------------
# (I + A)^{-1} for strictly lower-triangular A, by forward substitution, with a matmul-only VJP
# ----------------------------------------------------------------------------------------------

@jax.custom_vjp
def unit_tril_inverse(a: jax.Array) -> jax.Array:
    """``(I + tril(a, -1))⁻¹`` over the last two axes, by forward substitution (float32).

    Only the strictly lower triangle of ``a`` is read.  The VJP uses
    ``d(L⁻¹) = −L⁻¹ dL L⁻¹``, i.e. ``dA = tril(−Yᵀ dY Yᵀ, −1)``: two matmuls, no loop.
    """
    return _forward_substitution(a)


def _forward_substitution(a):
    c = a.shape[-1]
    a = jnp.tril(a, -1)
    eye = jnp.eye(c, dtype=a.dtype)

    def body(i, y):
        # Row i of Y = e_i − Σ_{j<i} a[i, j] Y[j]; rows j >= i of y are still zero.
        a_i = jax.lax.dynamic_index_in_dim(a, i, axis=a.ndim - 2, keepdims=False)     # [..., C]
        e_i = jax.lax.dynamic_index_in_dim(eye, i, axis=0, keepdims=False)            # [C]
        row = e_i - jnp.einsum("...j,...jc->...c", a_i, y)
        return jax.lax.dynamic_update_index_in_dim(y, row, i, axis=a.ndim - 2)

    return jax.lax.fori_loop(0, c, body, jnp.zeros_like(a))


def _uti_fwd(a):
    y = _forward_substitution(a)
    return y, y


def _uti_bwd(y, dy):
    yt = jnp.swapaxes(y, -1, -2)
    return (jnp.tril(-(yt @ dy @ yt), -1),)


unit_tril_inverse.defvjp(_uti_fwd, _uti_bwd)


# ----------------------------------------------------------------------------------------------
# Chunk core
# ----------------------------------------------------------------------------------------------

def _intra_chunk(qc, kc, vc, gc, bc):
    """Batched per-chunk quantities.  Inputs ``[..., C, D]`` (heads before C), ``gc, bc [..., C]``.

    Returns ``(W, U, K_dec, decay, Q_eff, O_loc)``; ``decay`` is ``exp(G_C)`` or None (no gate).
    """
    C = kc.shape[-2]
    i = jnp.arange(C)
    strict = i[:, None] > i[None, :]
    causal = i[:, None] >= i[None, :]
    kt = jnp.swapaxes(kc, -1, -2)
    kk = kc @ kt                                                       # (matmul: faster than einsum on CPU)
    qk = None if qc is None else qc @ kt
    if gc is None:
        a = jnp.where(strict, bc[..., :, None] * kk, 0.0)
        p = None if qc is None else jnp.where(causal, qk, 0.0)
        kg, kdec, qg, decay = kc, kc, qc, None
    else:
        G = jnp.cumsum(gc, axis=-1)                                    # [..., C], <= 0, decreasing
        diff = G[..., :, None] - G[..., None, :]                       # G_i - G_j
        d = jnp.exp(jnp.where(causal, diff, 0.0))                      # mask before exp
        a = jnp.where(strict, bc[..., :, None] * kk * d, 0.0)
        p = None if qc is None else jnp.where(causal, qk * d, 0.0)
        eg = jnp.exp(G)[..., None]
        GC = G[..., -1:]
        kg, qg = kc * eg, (None if qc is None else qc * eg)
        kdec = kc * jnp.exp(GC - G)[..., None]
        decay = jnp.exp(GC[..., 0])
    t = unit_tril_inverse(a)                                           # (I + A)^{-1}
    w = t @ (bc[..., None] * kg)
    u = t @ (bc[..., None] * vc)
    if qc is None:
        return w, u, kdec, decay, None, None
    q_eff = qg - p @ w
    o_loc = p @ u
    return w, u, kdec, decay, q_eff, o_loc


def _state_step(S, x):
    """``S_next = decay·S + K_decᵀ (U − W S)`` for one chunk column; S ``[R, H, K, V]``."""
    w, u, kdec, decay = x
    vn = u - w @ S
    S_new = S if decay is None else S * decay[..., None, None]
    return S_new + jnp.swapaxes(kdec, -1, -2) @ vn, None


def _chunk_forward(q, k, v, g, beta, h0, cu_seqlens, *, chunk_size):
    """Float32 core on prepared arrays (q pre-scaled, heads expanded).  Returns ``(o, final)``."""
    B, T, H, K = k.shape
    V = v.shape[-1]
    C = min(chunk_size, T)
    plan = _common.make_chunk_plan(B, T, C, cu_seqlens)
    to_c, from_c = (_to_chunks, _from_chunks) if cu_seqlens is None else (_common.to_chunks, _common.from_chunks)
    heads_first = lambda x: jnp.moveaxis(to_c(x, plan), 3, 2)          # [R, NC, H, C, ...]
    qc, kc, vc, bc = (heads_first(x) for x in (q, k, v, beta))
    gc = None if g is None else heads_first(g)
    w, u, kdec, decay, q_eff, o_loc = _intra_chunk(qc, kc, vc, gc, bc)
    _, incoming, final = _common.scan_chunks(_state_step, plan, (w, u, kdec, decay), h0, (H, K, V))
    o = q_eff @ incoming + o_loc                                       # [R, NC, H, C, V]
    o = from_c(jnp.moveaxis(o, 2, 3), plan)                            # [R, T, H, V]
    return o, final


def _to_chunks(x, plan):
    """Unpacked fast path of ``_common.to_chunks``: zero-pad T and reshape (no gather)."""
    R, NC, C = plan.index.shape
    x = jnp.pad(x, ((0, 0), (0, NC * C - plan.length)) + ((0, 0),) * (x.ndim - 2))
    return x.reshape((R, NC, C) + x.shape[2:])


def _from_chunks(xc, plan):
    return xc.reshape((xc.shape[0], -1) + xc.shape[3:])[:, :plan.length]


def chunk_core(p: _args.Prepared, cu_seqlens, output_final_state: bool, chunk_size: int):
    _common.check_chunk_size(chunk_size)
    fwd = jax.checkpoint(lambda *a: _chunk_forward(*a, chunk_size=chunk_size))
    o, final = fwd(p.q, p.k, p.v, p.g, p.beta, p.initial_state, cu_seqlens)
    return o.astype(p.out_dtype), (final if output_final_state else None)


def transitions_core(p: _args.Prepared, chunk_size: int):
    """``(M [B, NC, H, K, K], S_ext [B, NC, H, K, V])`` with ``S_next = M S + S_ext`` per chunk."""
    _common.check_chunk_size(chunk_size)
    B, T, H, K = p.k.shape
    plan = _common.make_chunk_plan(B, T, min(chunk_size, T))
    heads_first = lambda x: jnp.moveaxis(_to_chunks(x, plan), 3, 2)
    kc, vc, bc = (heads_first(x) for x in (p.k, p.v, p.beta))
    gc = None if p.g is None else heads_first(p.g)
    w, u, kdec, decay, _, _ = _intra_chunk(None, kc, vc, gc, bc)
    kdec_t = jnp.swapaxes(kdec, -1, -2)
    eye = jnp.eye(K, dtype=jnp.float32)
    m = (eye if decay is None else decay[..., None, None] * eye) - kdec_t @ w
    return m, kdec_t @ u


def chunk_transitions(k, v, beta, use_qk_l2norm_in_kernel=False, allow_neg_eigval=False, *,
                      chunk_size=64, use_qk_l2norm=None):
    """Per-chunk affine maps of the DeltaNet state, for sequence parallelism (REFERENCE §3.4).

    Returns ``(M [B, NC, H, K, K], S_ext [B, NC, H, K, V])`` float32 such that chunk c (tokens
    ``[c·C, (c+1)·C)``, the last one partial) maps its incoming state to ``M S + S_ext``.  Unpacked
    batches only.  The product of a rank's ``M`` (later chunks on the left) is its transition.
    """
    p = _args.prepare(jnp.zeros_like(k), k, v, None, beta, scale=1.0, initial_state=None,
                      use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel, use_qk_l2norm=use_qk_l2norm,
                      allow_neg_eigval=allow_neg_eigval, cu_seqlens=None, gated=False)
    return transitions_core(p, chunk_size)


def chunk_delta_rule(q, k, v, beta, scale=None, initial_state=None, output_final_state=False,
                     use_qk_l2norm_in_kernel=False, allow_neg_eigval=False, cu_seqlens=None, *,
                     chunk_size=64, use_qk_l2norm=None):
    """Chunkwise DeltaNet: ``S_t = (I − β_t k_t k_tᵀ) S_{t−1} + β_t k_t v_tᵀ``, ``o_t = S_tᵀ (s·q_t)``.

    Args:
      q, k: ``[B, T, H, K]``; v: ``[B, T, H, V]``; beta: ``[B, T, H]`` (any float dtypes;
        computation in float32).
      scale: multiplies q; None means ``K ** -0.5``.
      initial_state: ``[N, H, K, V]`` float32 or None (zeros).
      output_final_state: also return the ``[N, H, K, V]`` float32 final state.
      use_qk_l2norm_in_kernel: L2-normalise q and k (over K, in float32) before the op;
        ``use_qk_l2norm`` is an accepted alias.
      allow_neg_eigval: use ``2·beta`` instead of ``beta`` (for beta = sigmoid(·) in [0, 1] the step
        becomes [0, 2] and the eigenvalue ``1 − β`` along k reaches [−1, 1]).  Do not combine with
        a beta that is already doubled.
      cu_seqlens: ``[N + 1]`` int offsets of N packed sequences (B must be 1).
      chunk_size: tokens per chunk (static); T need not be a multiple.

    Returns:
      ``(o [B, T, H, V] in v's dtype, final_state [N, H, K, V] float32 or None)``.
    """
    p = _args.prepare(q, k, v, None, beta, scale=scale, initial_state=initial_state,
                      use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel, use_qk_l2norm=use_qk_l2norm,
                      allow_neg_eigval=allow_neg_eigval, cu_seqlens=cu_seqlens, gated=False)
    return chunk_core(p, cu_seqlens, output_final_state, chunk_size)
