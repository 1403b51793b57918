"""The per-chunk mathematics of the diagonal-decay kernels, shared by the TPU and GPU backends.

Every function here works on the values of one chunk already loaded from memory (``[C, K]``,
``[C, BV]``, the state ``[BV, K]``) and uses only what both Pallas lowerings (Mosaic and Triton)
accept: 2-D products, elementwise maps, masks built from ``iota``, reductions along one axis and
one rank-3 reshape.  No value is sliced (Triton cannot); a row is taken out of a block by a masked
reduction instead.

The state is kept as ``Sᵀ [BV, K]`` (value-major), so a decay per key dimension is a row
``[1, K]`` broadcast over it.  Gates follow :mod:`.decay`: a log gate below ``RESET_LOG_DECAY``
is an exact reset, counted in ``R`` and priced ``RESET_PENALTY`` per reset crossed.

Gate modes: ``None`` (linear attention), ``"head"`` (one log decay per head and token; its
in-chunk sums ``G, R`` arrive precomputed as a column ``[C, 1]`` and a row ``[1, C]``), ``"key"``
(GLA, one log decay per key dimension, raw ``g [C, K]``; summed here and sub-chunked so that no
exponent is ever positive).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from .decay import RESET_LOG_DECAY, RESET_PENALTY

Array = jax.Array
F32 = jnp.float32


PRODUCTS = ("f32", "bf16_split", "bf16")
"""How the kernels multiply: ``"f32"`` (float32 inputs: float32 operands at ``HIGHEST``);
``"bf16_split"`` (bf16 inputs: bf16 operands, and a float32 operand, such as a state or a decayed
key, as the sum of two bf16 parts, its rounding and the rounding of the remainder, so that the
product keeps about 16 bits); ``"bf16"`` (every operand rounded to one bf16 part)."""


def _parts(x: Array) -> list[Array]:
    if x.dtype == jnp.bfloat16:
        return [x]
    hi = x.astype(jnp.bfloat16)
    return [hi, (x - hi.astype(F32)).astype(jnp.bfloat16)]


def dot(a: Array, b: Array, contract: tuple[int, int] = (1, 0), products: str = "f32") -> Array:
    """A 2-D product with float32 accumulation: ``a @ b`` (``(1, 0)``), ``a @ bᵀ`` (``(1, 1)``) or
    ``aᵀ @ b`` (``(0, 0)``), with operands as :data:`PRODUCTS` says.  Split operands cost two
    (or, both split, three) bf16 products; the product of the two small parts is left out."""
    dims = (((contract[0],), (contract[1],)), ((), ()))
    if products == "f32":
        hi = (jax.lax.Precision.HIGHEST,) * 2
        return jax.lax.dot_general(a.astype(F32), b.astype(F32), dims, precision=hi, preferred_element_type=F32)
    if products == "bf16":
        return jax.lax.dot_general(a.astype(jnp.bfloat16), b.astype(jnp.bfloat16), dims, preferred_element_type=F32)
    out = None
    for i, x in enumerate(_parts(a)):
        for j, y in enumerate(_parts(b)):
            if i + j < 2:
                term = jax.lax.dot_general(x, y, dims, preferred_element_type=F32)
                out = term if out is None else out + term
    return out


def iota(shape: tuple[int, ...], axis: int) -> Array:
    return jax.lax.broadcasted_iota(jnp.int32, shape, axis)


def take_row(x: Array, i: int) -> Array:
    """Row ``i`` of ``x [C, D]`` as ``[1, D]``, by a masked sum (no slicing)."""
    return jnp.sum(jnp.where(iota(x.shape, 0) == i, x, 0.0), axis=0, keepdims=True)


def take_in_sub(x: Array, sub: int, p: int) -> Array:
    """``[C, D]`` whose row ``i`` is row ``start(i) + p`` of ``x``, ``start(i)`` the first row of
    ``i``'s sub-chunk of ``sub`` rows."""
    C, D = x.shape
    x3 = x.reshape(C // sub, sub, D)
    picked = jnp.sum(jnp.where(iota(x3.shape, 1) == p, x3, 0.0), axis=1, keepdims=True)
    return jnp.broadcast_to(picked, x3.shape).reshape(C, D)


def _sub_start(C: int, sub: int) -> Array:
    """``[C, 1]``: the first row of each row's sub-chunk (bit masks: Mosaic's signed ``//`` needs a chip)."""
    i = iota((C, 1), 0)
    return i - (i & (sub - 1))


def span(G_i, G_j, R_i, R_j) -> Array:
    """Log decay from token j to token i (``<= 0`` for ``j <= i``)."""
    return (G_i - G_j) - RESET_PENALTY * (R_i - R_j)


class ChunkGates(NamedTuple):
    """The decays of one chunk, per token (a column ``[C, 1]`` or, per key, ``[C, K]``)."""

    from_start: Array | None   # log decay from the chunk start to each token
    to_end: Array | None       # log decay from each token to the chunk end
    total: Array | None        # log decay over the whole chunk ([1, 1] or [1, K])
    pairwise: Array | None     # [C, C] decay matrix (head mode), or None
    G: Array | None            # in-chunk cumulative finite log decay (key mode)
    R: Array | None            # in-chunk cumulative reset count (key mode)


def chunk_gates(mode, gates) -> ChunkGates:
    """The decays of one chunk from the kernel's gate inputs (see the module docstring)."""
    if mode is None:
        return ChunkGates(None, None, None, None, None, None)
    if mode == "head":
        Gc, Rc, Gr, Rr = gates
        C = Gc.shape[0]
        causal = iota((C, C), 0) >= iota((C, C), 1)
        pair = jnp.exp(jnp.where(causal, span(Gc, Gr, Rc, Rr), 0.0))
        G_last, R_last = take_row(Gc, C - 1), take_row(Rc, C - 1)
        return ChunkGates(Gc - RESET_PENALTY * Rc, span(G_last, Gc, R_last, Rc),
                          G_last - RESET_PENALTY * R_last, jnp.where(causal, pair, 0.0), None, None)
    g = gates[0].astype(F32)
    C = g.shape[0]
    resets = g < RESET_LOG_DECAY
    tril = (iota((C, C), 0) >= iota((C, C), 1)).astype(F32)
    G = dot(tril, jnp.where(resets, 0.0, g))
    R = dot(tril, resets.astype(F32))
    G_last, R_last = take_row(G, C - 1), take_row(R, C - 1)
    return ChunkGates(G - RESET_PENALTY * R, span(G_last, G, R_last, R), G_last - RESET_PENALTY * R_last,
                      None, G, R)


def _off_diagonal_factors(G, R, n: int):
    """For the sub-chunk starting at row n: ``exp`` of the decays token -> n and n -> token,
    clamped at 0 (rows where a factor would exceed 1 are masked by the caller)."""
    Gn, Rn = take_row(G, n), take_row(R, n)
    return (jnp.exp(jnp.minimum(span(G, Gn, R, Rn), 0.0)), jnp.exp(jnp.minimum(span(Gn, G, Rn, R), 0.0)))


def _diag_terms(G, R, sub: int, p: int, partner_later: bool):
    """For every row ``i`` and its partner ``j = start(i) + p`` in the same sub-chunk: whether the
    pair counts (``j <= i``, or ``j >= i`` when ``partner_later``) and ``exp`` of the decay
    between them."""
    C, K = G.shape
    offset = iota((C, 1), 0) & (sub - 1)                           # sub is a power of two
    valid = offset <= p if partner_later else offset >= p
    Gp, Rp = take_in_sub(G, sub, p), take_in_sub(R, sub, p)
    exponent = span(Gp, G, Rp, R) if partner_later else span(G, Gp, R, Rp)
    return valid, jnp.exp(jnp.where(valid, exponent, 0.0))


def scores(q: Array, k: Array, gates: ChunkGates, mode, sub: int, products: str) -> Array:
    """The masked intra-chunk scores ``A [C, C]``: ``A_ij = Σ_d q_id k_jd exp(decay_d(j -> i))``."""
    C = q.shape[0]
    rows, cols = iota((C, C), 0), iota((C, C), 1)
    causal = rows >= cols
    if mode != "key":
        A = dot(q, k, (1, 1), products)
        return jnp.where(causal, A, 0.0) if mode is None else A * gates.pairwise
    qf, kf = q.astype(F32), k.astype(F32)
    G, R = gates.G, gates.R
    A = jnp.zeros((C, C), F32)
    for n in range(sub, C, sub):
        to_n, from_n = _off_diagonal_factors(G, R, n)
        block = (rows >= n) & (rows < n + sub) & (cols < n)
        A = jnp.where(block, dot(qf * to_n, kf * from_n, (1, 1), products), A)
    start = _sub_start(C, sub)
    for p in range(sub):
        valid, E = _diag_terms(G, R, sub, p, partner_later=False)
        column = jnp.sum(qf * take_in_sub(kf, sub, p) * E, axis=1, keepdims=True)
        A = jnp.where(cols == start + p, jnp.where(valid, column, 0.0), A)
    return A


def score_grads(q: Array, k: Array, dA: Array, dAT: Array, gates: ChunkGates, mode, sub: int, products: str):
    """``(dq, dk)`` of :func:`scores` for the cotangent ``dA`` (and its transpose ``dAT``), both
    already masked to ``i >= j``."""
    if mode != "key":
        if mode == "head":
            dA = dA * gates.pairwise
        return dot(dA, k, products=products), dot(dA, q, (0, 0), products)
    C, K = q.shape
    rows, cols = iota((C, C), 0), iota((C, C), 1)
    qf, kf = q.astype(F32), k.astype(F32)
    G, R = gates.G, gates.R
    dq = jnp.zeros((C, K), F32)
    dk = jnp.zeros((C, K), F32)
    for n in range(sub, C, sub):
        to_n, from_n = _off_diagonal_factors(G, R, n)
        block = (rows >= n) & (rows < n + sub) & (cols < n)
        dAb = jnp.where(block, dA, 0.0)
        dq = dq + dot(dAb, kf * from_n, products=products) * to_n
        dk = dk + dot(dAb, qf * to_n, (0, 0), products) * from_n
    start = _sub_start(C, sub)
    for p in range(sub):
        valid, E = _diag_terms(G, R, sub, p, partner_later=False)
        a = jnp.sum(jnp.where(cols == start + p, dA, 0.0), axis=1, keepdims=True)
        dq = dq + jnp.where(valid, a, 0.0) * take_in_sub(kf, sub, p) * E
        valid, E = _diag_terms(G, R, sub, p, partner_later=True)
        a = jnp.sum(jnp.where(cols == start + p, dAT, 0.0), axis=1, keepdims=True)
        dk = dk + jnp.where(valid, a, 0.0) * take_in_sub(qf, sub, p) * E
    return dq, dk


def _scaled(x: Array, log_decay: Array | None) -> Array:
    """``x ⊙ exp(log_decay)``: float32 when decayed, else x as loaded."""
    return x if log_decay is None else x.astype(F32) * jnp.exp(log_decay)


def _decay_state(ST: Array, total: Array | None) -> Array:
    return ST if total is None else ST * jnp.exp(total)


def chunk_forward(q, k, v, gates: ChunkGates, ST, mode, sub: int, products: str):
    """One chunk forward: ``(o [C, BV] float32, Sᵀ after the chunk [BV, K] float32)``.

    ``q`` is already scaled; ``ST`` is the state entering the chunk.
    """
    A = scores(q, k, gates, mode, sub, products)
    o = dot(A, v, products=products) + dot(_scaled(q, gates.from_start), ST, (1, 1), products)
    ST_next = _decay_state(ST, gates.total) + dot(v, _scaled(k, gates.to_end), (0, 0), products)
    return o, ST_next


def chunk_backward(q, k, v, do, gates: ChunkGates, ST, dST, mode, sub: int, products: str):
    """One chunk backward.  ``ST``: the state entering the chunk; ``dST``: the cotangent of the
    state leaving it.  Returns ``(dq, dk, dv, dSᵀ entering, ())``, all float32 (the empty tuple:
    no per-token gradients besides these, unlike :func:`.delta_kernel_math.chunk_backward`)."""
    C = q.shape[0]
    causal = iota((C, C), 0) >= iota((C, C), 1)
    p = products
    A = scores(q, k, gates, mode, sub, p)
    dA = jnp.where(causal, dot(do, v, (1, 1), p), 0.0)
    dAT = jnp.where(iota((C, C), 1) >= iota((C, C), 0), dot(v, do, (1, 1), p), 0.0) if mode == "key" else None
    dq, dk = score_grads(q, k, dA, dAT, gates, mode, sub, p)
    qs, ks = _scaled(q, gates.from_start), _scaled(k, gates.to_end)
    dqs = dot(do, ST, products=p)                                    # [C, K]
    dks = dot(v, dST, products=p)                                    # [C, K]
    if gates.from_start is not None:
        dqs = dqs * jnp.exp(gates.from_start)
        dks = dks * jnp.exp(gates.to_end)
    dv = dot(A, do, (0, 0), p) + dot(ks, dST, (1, 1), p)
    dST_prev = _decay_state(dST, gates.total) + dot(do, qs, (0, 0), p)
    return dq + dqs, dk + dks, dv, dST_prev, ()


def chunk_state(k, v, gates: ChunkGates, ST, products: str):
    """The state after one chunk, ``Sᵀ [BV, K]`` float32, without the chunk's outputs."""
    return _decay_state(ST, gates.total) + dot(v, _scaled(k, gates.to_end), (0, 0), products)


def chunk_state_grad(q, k, v, do, gates: ChunkGates, ST, dST, products: str):
    """The cotangent of the state entering a chunk from the one leaving it, ``dSᵀ [BV, K]``
    (``k``, ``v`` and the entering state ``ST`` are not needed here: pass None)."""
    return _decay_state(dST, gates.total) + dot(do, _scaled(q, gates.from_start), (0, 0), products)
