"""Chunkwise GLA: the diagonal chunk form with a log decay per key dimension, sub-chunked.

With a decay per dimension the intra-chunk score ``A_ij = Σ_d q_id k_jd exp(G_id - G_jd)`` is not
a plain product.  Each chunk of C tokens is split into sub-chunks of c tokens:

* off-diagonal blocks (query sub-chunk I, the keys before it): with n the first token of I,
  ``A_I,<I = (Q_I ⊙ exp(G_I - G_n)) (K_<I ⊙ exp(G_n - G_<I))ᵀ``, a real product whose two
  exponents are both ``<= 0``;
* diagonal c×c blocks: elementwise in log space, the exponent masked before ``exp``.

Nothing of the form ``exp(G) exp(-G)`` is factored across a chunk, so strong gates underflow to
the correct 0 and never overflow.  Resets (``g = -inf``) go through :mod:`..common.decay`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from ..common import checks, decay
from ..common.diagonal import chunk_diagonal
from ..common.diagonal_kernels import chunk_diagonal_dispatch
from ..common.precision import einsum
from ..common.prepare import finish, prepare

ROWS_PER_BLOCK = 128


def _span(G_i, G_j, R_i, R_j, exact: bool):
    """The pairwise log decay; without resets inside the sub-chunk a plain difference suffices."""
    return decay.span(G_i, G_j, R_i, R_j) if exact else G_i - G_j


def _scores(q, k, G, R, exact: bool):
    m = decay.tril_mask(G.shape[1])[..., None]                         # [i, j, 1]
    E = jnp.exp(_span(G[:, :, None], G[:, None], R[:, :, None], R[:, None], exact) * m) * m
    return jnp.sum(q[:, :, None] * k[:, None] * E, axis=-1)


def _score_grads(q, k, G, R, dA, exact: bool):
    # The summed axis is minor in both reductions ([n, i, d, j] for dq, [n, j, d, i] for dk): XLA's
    # CPU reductions vectorise along the minor axis only (3x faster than reducing axis 1 or 2).
    m = decay.tril_mask(G.shape[1])
    qt, kt, Gt, Rt = (jnp.swapaxes(x, 1, 2) for x in (q, k, G, R))     # [n, K, c]
    mq = m[:, None, :]                                                 # [i, 1, j]
    Eq = jnp.exp(_span(G[..., None], Gt[:, None], R[..., None], Rt[:, None], exact) * mq) * mq
    dq = jnp.sum(dA[:, :, None, :] * kt[:, None] * Eq, axis=-1)
    mk = m.T[:, None, :]                                               # [j, 1, i]
    Ek = jnp.exp(_span(Gt[:, None], G[..., None], Rt[:, None], R[..., None], exact) * mk) * mk
    dk = jnp.sum(jnp.swapaxes(dA, 1, 2)[:, :, None, :] * qt[:, None] * Ek, axis=-1)
    return dq, dk


def _resets_inside(R):
    """Whether some pair of tokens of a sub-chunk has a reset between them (R not constant)."""
    return jnp.any(R[:, -1] != R[:, 0])


@jax.custom_vjp
def _diag_block(q, k, G, R):
    """``A_ij = Σ_d q_id k_jd exp(span_d(i, j))`` for i >= j within each c×c sub-block.

    ``q, k, G, R: [n, c, K]``.  The hand-written VJP (``dq_i = Σ_j dA_ij k_j E_ij``,
    ``dk_j = Σ_i dA_ij q_i E_ij``, ``dG = q ⊙ dq - k ⊙ dk``) is two fused reductions; autodiff's
    version was ~10x slower on CPU.  The reset-exact exponent costs a third more time and twice
    the memory in these elementwise blocks, so it only runs (``lax.cond``) when a reset falls
    inside a sub-chunk.
    """
    return jax.lax.cond(_resets_inside(R), functools.partial(_scores, exact=True),
                        functools.partial(_scores, exact=False), q, k, G, R)


def _diag_block_fwd(q, k, G, R):
    return _diag_block(q, k, G, R), (q, k, G, R)


def _diag_block_bwd(res, dA):
    q, k, G, R = res
    dq, dk = jax.lax.cond(_resets_inside(R), functools.partial(_score_grads, exact=True),
                          functools.partial(_score_grads, exact=False), q, k, G, R, dA)
    return dq, dk, q * dq - k * dk, jnp.zeros_like(R)


_diag_block.defvjp(_diag_block_fwd, _diag_block_bwd)


def _diag_blocks(q, k, G, R, rows: int = ROWS_PER_BLOCK):
    """:func:`_diag_block` over ``rows`` sub-blocks at a time (a ``lax.map`` of a checkpointed body).

    The elementwise form needs ``[n, c, c, K]`` temporaries (c·K floats per token, ~1 GiB per
    tensor at T = 64K, H = 4, K = 64); mapping over row blocks bounds them in both passes.
    """
    n, c, K = q.shape
    if n <= rows:
        return _diag_block(q, k, G, R)
    nb = -(-n // rows)
    pad = lambda x: jnp.pad(x, ((0, nb * rows - n), (0, 0), (0, 0))).reshape(nb, rows, c, K)
    out = jax.lax.map(jax.checkpoint(lambda x: _diag_block(*x)), (pad(q), pad(k), pad(G), pad(R)))
    return out.reshape(nb * rows, c, c)[:n]


@functools.partial(jax.checkpoint, static_argnums=(4,))
def _intra(q, k, v, g, sub):
    """Phase 1 of every chunk.  ``q, k, g [M, C, K]``, ``v [M, C, V]``; returns
    ``(o_intra [M, C, V], dS [M, K, V], decay [M, K])``."""
    M, C, K = q.shape
    ns = C // sub
    G, R = decay.chunk_log_decay(g, -2)
    flat = lambda x: x.reshape(M * ns, sub, K)
    A_diag = _diag_blocks(flat(q), flat(k), flat(G), flat(R)).reshape(M, ns, sub, sub)

    rows = []
    for i in range(ns):
        lo, hi = i * sub, (i + 1) * sub
        parts = []
        if i:
            Gn, Rn = G[:, lo:lo + 1], R[:, lo:lo + 1]                  # at the first token of sub-chunk i
            qh = q[:, lo:hi] * jnp.exp(decay.span(G[:, lo:hi], Gn, R[:, lo:hi], Rn))
            kh = k[:, :lo] * jnp.exp(decay.span(Gn, G[:, :lo], Rn, R[:, :lo]))
            parts.append(einsum("mik,mjk->mij", qh, kh))
        parts.append(A_diag[:, i])
        if i < ns - 1:
            parts.append(jnp.zeros((M, sub, C - hi), jnp.float32))
        rows.append(jnp.concatenate(parts, axis=-1) if len(parts) > 1 else parts[0])
    A = jnp.concatenate(rows, axis=-2) if ns > 1 else rows[0]       # [M, C, C]
    o = einsum("mij,mjv->miv", A, v)
    to_end = jnp.exp(decay.span(G[:, -1:], G, R[:, -1:], R))
    dS = einsum("mck,mcv->mkv", k * to_end, v)
    return o, dS, jnp.exp(decay.from_start(G[:, -1], R[:, -1]))


def _chunk_gla_xla(x, C: int, sub: int):
    return chunk_diagonal(x, C, intra=_intra, intra_args=(sub,))


def chunk_gla(q, k, v, g, scale=None, initial_state=None, output_final_state=False, state_v_first=False,
              cu_seqlens=None, *, chunk_size=64, sub_chunk_size=16, implementation=None):
    """Chunkwise GLA ``S_t = Diag(exp(g_t)) S_{t-1} + k_t v_tᵀ``, ``o_t = S_tᵀ (s q_t)``.

    Args:
      q, k: ``[B, T, H, K]``; v: ``[B, T, H, V]``.
      g: ``[B, T, H, K]`` log decay per key dimension (``<= 0``; ``-inf`` resets), e.g.
        ``logsigmoid(x) / 16``.
      scale: multiplies q; None means ``K ** -0.5``.
      initial_state: ``[N, H, K, V]`` float32 (``[N, H, V, K]`` with ``state_v_first``) or None.
      output_final_state: also return the state after each sequence's last token.
      state_v_first: states in ``[N, H, V, K]`` order.
      cu_seqlens: ``[N + 1]`` int offsets of packed sequences (B == 1).
      chunk_size: tokens per chunk (static).
      sub_chunk_size: tokens per sub-chunk, dividing ``chunk_size`` (a chunk shorter than it is
        one sub-chunk).
      implementation: ``"xla"``, ``"pallas"`` or None (the Pallas kernels on TPU and GPU when they
        support the inputs, XLA otherwise); see ``docs/kernels.md``.

    Returns:
      ``(o [B, T, H, V] in v's dtype, final_state float32 or None)``.

    >>> import jax, jax.numpy as jnp
    >>> q, k, v = jax.random.normal(jax.random.key(0), (3, 1, 70, 2, 16))
    >>> g = jax.nn.log_sigmoid(jax.random.normal(jax.random.key(1), (1, 70, 2, 16))) / 16
    >>> o, S = chunk_gla(q, k, v, g, output_final_state=True)
    >>> o.shape, S.shape
    ((1, 70, 2, 16), (1, 2, 16, 16))
    """
    size = checks.check_chunk_size(chunk_size)
    sub = min(sub_chunk_size, size) if isinstance(sub_chunk_size, int) and not isinstance(sub_chunk_size, bool) \
        else sub_chunk_size
    if not isinstance(sub, int) or sub < 1 or size % sub:
        raise ValueError(f"sub_chunk_size must be a positive int dividing chunk_size = {size}, got {sub_chunk_size!r}")
    checks.check_array("g", g)
    x = prepare(q, k, v, gk=g, scale=scale, initial_state=initial_state, output_final_state=output_final_state,
                state_v_first=state_v_first, cu_seqlens=cu_seqlens, names={"gk": "g"})
    T = x.k.shape[1]
    C = min(size, -(-T // sub) * sub)                                 # short inputs: one short chunk
    o, final = chunk_diagonal_dispatch(x, "key", size, sub, implementation, _chunk_gla_xla, (C, sub))
    return finish(x, o, final)
