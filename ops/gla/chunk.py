"""Chunkwise GLA with secondary sub-chunking (REFERENCE §1.2–1.3).

Per-dimension decays make the intra-chunk score ``A_ij = Σ_d s q_id k_jd exp(G_id − G_jd)``
not a plain matmul.  Each chunk of C tokens is split into sub-chunks of c tokens:

* off-diagonal blocks (query sub-chunk I, keys before it): with the reference position n = the
  first token of I, ``A_I,<I = (s Q_I ⊙ exp(G_I − G_n)) (K_<I ⊙ exp(G_n − G_<I))ᵀ``, a real
  matmul whose exponents are both ``<= 0`` (G decreases along the sequence);
* diagonal c×c blocks: elementwise in log space, the exponent masked to 0 above the diagonal
  *before* ``exp``.

Nothing of the form ``exp(G)·exp(−G)`` is ever factored across a chunk, so strong gates only
underflow (to the correct ~0), never overflow.  Then ``O = (s Q ⊙ exp(G)) S_in + A V`` and the
state passes as ``S_next = Diag(exp(G_C)) S + (K ⊙ exp(G_C − G))ᵀ V``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from ops import _common as cm
from ops.gla import _api
from ops.simple_gla import _core
from ops.simple_gla._core import einsum


DIAG_ROWS_PER_BLOCK = 512


def _diag_decay(G):
    m = _core.tril_mask(G.shape[1])[..., None]                       # [c, c, 1]
    return jnp.exp((G[:, :, None, :] - G[:, None, :, :]) * m) * m    # [n, c, c, K]


@jax.custom_vjp
def _diag_one(q, k, G):
    """``A_ij = Σ_d q_id k_jd exp(G_id − G_jd)`` for i >= j within each c×c sub-block.

    q, k, G: ``[n, c, K]``.  The exponent is multiplied by the 0/1 mask before ``exp`` (so it is
    0, not positive, above the diagonal) and the result zeroed after.  The hand-written VJP
    (``dq_i = Σ_j dA_ij k_j E_ij``, ``dk_j = Σ_i dA_ij q_i E_ij``, ``dG = q ⊙ dq − k ⊙ dk``) is
    two fused reductions; autodiff's version was ~10x slower on CPU."""
    return jnp.sum(q[:, :, None, :] * k[:, None, :, :] * _diag_decay(G), axis=-1)


def _diag_one_fwd(q, k, G):
    return _diag_one(q, k, G), (q, k, G)


def _diag_one_bwd(res, dA):
    # Both reductions are laid out with the summed axis minor ([n, i, d, j] for dq, [n, j, d, i]
    # for dk): XLA's CPU reductions vectorise along the minor axis only (3x faster than
    # reducing axis 1 or 2 of [n, c, c, K]).
    q, k, G = res
    m = _core.tril_mask(G.shape[1])
    qt, kt, Gt = (jnp.swapaxes(x, 1, 2) for x in (q, k, G))         # [n, K, c]
    mq = m[:, None, :]                                               # [i, 1, j]
    Eq = jnp.exp((G[:, :, :, None] - Gt[:, None, :, :]) * mq) * mq   # [n, i, d, j]
    dq = jnp.sum(dA[:, :, None, :] * kt[:, None, :, :] * Eq, axis=-1)
    mk = m.T[:, None, :]                                             # [j, 1, i]
    Ek = jnp.exp((Gt[:, None, :, :] - G[:, :, :, None]) * mk) * mk   # [n, j, d, i]
    dk = jnp.sum(jnp.swapaxes(dA, 1, 2)[:, :, None, :] * qt[:, None, :, :] * Ek, axis=-1)
    return dq, dk, q * dq - k * dk


_diag_one.defvjp(_diag_one_fwd, _diag_one_bwd)


def _diag_blocks(q, k, G, rows: int = DIAG_ROWS_PER_BLOCK):
    """:func:`_diag_one` over ``rows`` sub-blocks at a time (``lax.map`` of a checkpointed body).

    The elementwise form needs ``[n, c, c, K]`` temporaries (c·K floats per token, ~1 GiB per
    tensor at T = 64K, H = 4, K = 64); its autodiff kept several of them alive at once (9 GiB
    peak).  Mapping over row blocks bounds them to ``rows·c·c·K`` floats in both passes."""
    n, c, K = q.shape
    if n <= rows:
        return _diag_one(q, k, G)
    nb = -(-n // rows)
    pad = lambda x: jnp.pad(x, ((0, nb * rows - n), (0, 0), (0, 0))).reshape(nb, rows, c, K)
    out = jax.lax.map(jax.checkpoint(lambda x: _diag_one(*x)), (pad(q), pad(k), pad(G)))
    return out.reshape(nb * rows, c, c)[:n]


@functools.partial(jax.checkpoint, static_argnums=(4,))
def _gla_intra(q, k, v, g, sub):
    """Phase 1 for every chunk at once.  q (scaled), k, g: [M, C, K]; v: [M, C, V] (M = NC*R*H).

    Returns (o_intra [M, C, V], dS [M, K, V], decay [M, K])."""
    M, C, K = q.shape
    ns = C // sub
    G = _core.chunk_cumsum(g, -2)

    # Diagonal sub-blocks, elementwise in log space (masked before exp), in row blocks.
    flat = lambda x: x.reshape(M * ns, sub, K)
    A_diag = _diag_blocks(flat(q), flat(k), flat(G)).reshape(M, ns, sub, sub)

    rows = []
    for i in range(ns):
        parts = []
        if i:
            lo, hi = i * sub, (i + 1) * sub
            ref = G[:, lo:lo + 1, :]                                  # G at the first token of I
            qh = q[:, lo:hi, :] * jnp.exp(G[:, lo:hi, :] - ref)
            kh = k[:, :lo, :] * jnp.exp(ref - G[:, :lo, :])
            parts.append(einsum("mik,mjk->mij", qh, kh))
        parts.append(A_diag[:, i])
        if i < ns - 1:
            parts.append(jnp.zeros((M, sub, C - (i + 1) * sub), jnp.float32))
        rows.append(jnp.concatenate(parts, axis=-1) if len(parts) > 1 else parts[0])
    A = jnp.concatenate(rows, axis=-2) if ns > 1 else rows[0]        # [M, C, C]
    o = einsum("mij,mjv->miv", A, v)

    GL = G[:, -1:, :]
    dS = einsum("mck,mcv->mkv", k * jnp.exp(GL - G), v)
    return o, dS, jnp.exp(GL[:, 0, :])


@jax.checkpoint
def _gla_inter(q, g, S_in):
    """Phase 3: (s Q ⊙ exp(G)) S_in for every chunk.  q, g: [M, C, K]; S_in: [M, K, V]."""
    return einsum("mck,mkv->mcv", q * jnp.exp(_core.chunk_cumsum(g, -2)), S_in)


def chunk_gla_core(q, k, v, g, scale, initial_state, cu_seqlens, chunk_size: int, sub: int):
    B, T, H, K = q.shape
    V = v.shape[-1]
    packed = cu_seqlens is not None
    plan = cm.make_chunk_plan(B, T, chunk_size, cu_seqlens)
    R, NC, C = plan.index.shape
    flat = lambda x: _core.flat_chunks(_core.to_chunk_major(x, plan, packed))
    qc, kc, vc, gc = flat(q) * scale, flat(k), flat(v), flat(g)
    o_intra, dS, decay = _gla_intra(qc, kc, vc, gc, sub)
    per_chunk = lambda x: x.reshape((NC, R, H) + x.shape[1:])        # free reshape
    step = lambda S, x: (x[0][..., None] * S + x[1], None)
    S_in, final = _core.scan_states(step, plan, (per_chunk(decay), per_chunk(dS)), initial_state,
                                    (H, K, V), packed)
    o = o_intra + _gla_inter(qc, gc, S_in.reshape(-1, K, V))
    return _core.from_chunk_major(o.reshape(NC, R, H, C, V), plan, packed), final


def chunk_gla(q, k, v, g, scale=None, initial_state=None, output_final_state=False,
              cu_seqlens=None, *, chunk_size=64, sub_chunk_size=16):
    """Chunkwise GLA ``S_t = Diag(exp(g_t)) S_{t-1} + k_t v_tᵀ``, ``o_t = S_tᵀ (s q_t)``.

    Args:
      q, k: ``[B, T, H, K]``; v: ``[B, T, H, V]``.
      g: ``[B, T, H, K]`` per-key-dimension log decay (``<= 0``), e.g. ``logsigmoid(x) / 16``.
      scale: multiplies q; None means ``K ** -0.5``.
      initial_state: ``[N, H, K, V]`` float32 or None.
      output_final_state: also return the state after each sequence's last token.
      cu_seqlens: ``[N + 1]`` int offsets of packed sequences (B == 1).
      chunk_size: tokens per chunk (static).
      sub_chunk_size: tokens per sub-chunk; must divide ``chunk_size`` (a chunk shorter than it
        is one sub-chunk).

    Returns:
      ``(o [B, T, H, V] in v's dtype, final_state [N, H, K, V] float32 or None)``.
    """
    cm.check_chunk_size(chunk_size)
    sub = min(sub_chunk_size, chunk_size) if isinstance(sub_chunk_size, int) else sub_chunk_size
    if not isinstance(sub, int) or sub < 1 or chunk_size % sub:
        raise ValueError(f"sub_chunk_size must be a positive int dividing chunk_size={chunk_size}, "
                         f"got {sub_chunk_size!r}")

    def core(q, k, v, g, scale, h0, cu):
        return chunk_gla_core(q, k, v, g, scale, h0, cu, chunk_size, sub)

    return _api.run(core, q, k, v, g, scale, initial_state, output_final_state, cu_seqlens)
