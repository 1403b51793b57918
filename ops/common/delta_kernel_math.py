"""The per-chunk mathematics of the delta-rule kernels (DeltaNet and Gated DeltaNet).

Same contract as :mod:`.kernel_math` (values of one chunk already loaded, state ``Sᵀ [BV, K]``,
only 2-D products, masks from ``iota`` and reductions), so both Pallas backends run either module.
Per chunk, with ``γ_i = exp(G_i)`` the decay from the chunk start, ``D_ij = exp(G_i - G_j)``
(``i >= j``; all ones without a gate) and ``β`` the step per token (a column ``[C, 1]``):

    A  = strictly-lower(β ⊙ (K Kᵀ ⊙ D)),     T = (I + A)^{-1}          (:func:`unit_tril_inverse`)
    W  = T (β ⊙ K ⊙ γ),   U = T (β ⊙ V),     V' = U - W S
    O  = (Q ⊙ γ) S + ((Q Kᵀ) ⊙ D) V'
    S' = γ_C S + (K ⊙ exp(G_C - G))ᵀ V'

Every value column of the state evolves on its own, so value blocks are independent; the
gradients of ``q, k, β`` and of the log decay are sums over value blocks (partial per block).

The backward differentiates that chunk by hand (``docs/ops_delta.md``): from ``dO`` and the
cotangent of the leaving state it returns ``dq, dk, dv``, the cotangent of the entering state,
``dβ`` and ``dG``, the gradient of the in-chunk cumulative log decay ``G`` (every place ``G``
enters: ``D`` in the scores and in ``A``, ``γ`` on q and in ``W``, the decays to the chunk end).
The caller turns ``dG`` into the gate's gradient by a reverse cumulative sum inside each chunk.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from .kernel_math import F32, ChunkGates, _decay_state, _scaled, dot, iota
from .kernel_math import chunk_gates as _gate_decays

Array = jax.Array


class DeltaChunk(NamedTuple):
    """The decays and the step of one chunk."""

    gates: ChunkGates
    beta: Array            # [C, 1] float32


def chunk_gates(mode, values) -> DeltaChunk:
    """Decays (``mode`` None or ``"head"``, see :func:`.kernel_math.chunk_gates`) and the step,
    from the loaded extra inputs (the head gate's tables, then ``beta [C, 1]``)."""
    return DeltaChunk(_gate_decays(mode, values[:-1]), values[-1].astype(F32))


def unit_tril_inverse(A: Array, products: str) -> Array:
    """``(I + A)^{-1}`` for strictly lower-triangular ``A [C, C]`` (C a power of two).

    Block doubling: with ``X`` the inverse of the diagonal blocks of size s, the inverse over
    blocks of size 2s is ``X - X A_s X``, ``A_s`` the part of ``A`` joining the two halves of
    each 2s block.  log2(C) levels of two products each, the same sums as block forward
    substitution (no power series, so no growth beyond the inverse's own entries).
    """
    C = A.shape[0]
    i, j = iota((C, C), 0), iota((C, C), 1)
    pair = lambda s: ((i & ~(2 * s - 1)) == (j & ~(2 * s - 1))) & ((i & ~(s - 1)) != (j & ~(s - 1))) & (i > j)
    X = jnp.where(i == j, 1.0, 0.0) - jnp.where(pair(1), A, 0.0)
    s = 2
    while s < C:
        X = X - dot(dot(X, jnp.where(pair(s), A, 0.0), products=products), X, products=products)
        s *= 2
    return X


def _pairwise(gates: ChunkGates, C: int) -> Array:
    """``D [C, C]`` with zeros above the diagonal."""
    if gates.pairwise is not None:
        return gates.pairwise
    return jnp.where(iota((C, C), 0) >= iota((C, C), 1), 1.0, 0.0)


class _Transform(NamedTuple):
    D: Array
    KK: Array
    A: Array
    T: Array
    bkg: Array      # β ⊙ K ⊙ γ
    bv: Array       # β ⊙ V
    W: Array
    U: Array


def _transform(k, v, ch: DeltaChunk, products: str) -> _Transform:
    C = k.shape[0]
    strict = iota((C, C), 0) > iota((C, C), 1)
    D = _pairwise(ch.gates, C)
    KK = dot(k, k, (1, 1), products)
    A = jnp.where(strict, ch.beta * KK * D, 0.0)
    T = unit_tril_inverse(A, products)
    bkg = ch.beta * _scaled(k, ch.gates.from_start).astype(F32)
    bv = ch.beta * v.astype(F32)
    return _Transform(D, KK, A, T, bkg, bv, dot(T, bkg, products=products), dot(T, bv, products=products))


def chunk_wy(k, ch: DeltaChunk, products: str):
    """``(T [C, C], W [C, K])`` of one chunk: the parts of the transform that do not involve V."""
    C = k.shape[0]
    strict = iota((C, C), 0) > iota((C, C), 1)
    A = jnp.where(strict, ch.beta * dot(k, k, (1, 1), products) * _pairwise(ch.gates, C), 0.0)
    T = unit_tril_inverse(A, products)
    return T, dot(T, ch.beta * _scaled(k, ch.gates.from_start).astype(F32), products=products)


def chunk_new_values(T, W, k, v, ch: DeltaChunk, ST, products: str):
    """From a chunk's stored ``T`` and ``W``: ``(V' = T (β ⊙ V) - W S [C, BV], Sᵀ after the chunk)``."""
    Vn = dot(T, ch.beta * v.astype(F32), products=products) - dot(W, ST, (1, 1), products)
    return Vn, _decay_state(ST, ch.gates.total) + dot(Vn, _scaled(k, ch.gates.to_end), (0, 0), products)


def chunk_output(q, k, Vn, ch: DeltaChunk, ST, products: str):
    """A chunk's output from its new values ``V'`` and entering state: ``(Q ⊙ γ) S + P V'``."""
    P = dot(q, k, (1, 1), products) * _pairwise(ch.gates, q.shape[0])
    return dot(_scaled(q, ch.gates.from_start), ST, (1, 1), products) + dot(P, Vn, products=products)


def chunk_local_dv(q, k, do, ch: DeltaChunk, products: str):
    """The part of ``dV'`` within the chunk, ``Pᵀ dO [C, BV]`` (no state involved)."""
    P = dot(q, k, (1, 1), products) * _pairwise(ch.gates, q.shape[0])
    return dot(P, do, (0, 0), products)


def chunk_light_state_grad(q, k, W, do, local_dv, ch: DeltaChunk, dST, products: str):
    """The entering state's cotangent from the stored ``W`` and ``Pᵀ dO``:
    ``γ_C dS' + (Q ⊙ γ)ᵀ dO - Wᵀ dV'`` with ``dV' = Pᵀ dO + (K ⊙ e^{G_C - G}) dS'``."""
    dVn = local_dv + dot(_scaled(k, ch.gates.to_end), dST, (1, 1), products)
    return (_decay_state(dST, ch.gates.total) + dot(do, _scaled(q, ch.gates.from_start), (0, 0), products)
            - dot(dVn, W, (0, 0), products))


def chunk_forward(q, k, v, ch: DeltaChunk, ST, mode, sub: int, products: str):
    """One chunk forward: ``(o [C, BV] float32, Sᵀ after the chunk [BV, K] float32)``."""
    p = products
    t = _transform(k, v, ch, p)
    Vn = t.U - dot(t.W, ST, (1, 1), p)
    P = dot(q, k, (1, 1), p) * t.D
    o = dot(_scaled(q, ch.gates.from_start), ST, (1, 1), p) + dot(P, Vn, products=p)
    return o, _decay_state(ST, ch.gates.total) + dot(Vn, _scaled(k, ch.gates.to_end), (0, 0), p)


def chunk_state(k, v, ch: DeltaChunk, ST, products: str):
    """The state after one chunk, ``Sᵀ [BV, K]`` float32, without the chunk's outputs."""
    t = _transform(k, v, ch, products)
    Vn = t.U - dot(t.W, ST, (1, 1), products)
    return _decay_state(ST, ch.gates.total) + dot(Vn, _scaled(k, ch.gates.to_end), (0, 0), products)


def _new_values_grad(q, k, do, ch: DeltaChunk, t: _Transform, dST, products: str):
    """``(P, dV')``: the scores and the cotangent of ``V' = U - W S``."""
    P = dot(q, k, (1, 1), products) * t.D
    dVn = dot(P, do, (0, 0), products) + dot(_scaled(k, ch.gates.to_end), dST, (1, 1), products)
    return P, dVn


def chunk_state_grad(q, k, v, do, ch: DeltaChunk, ST, dST, products: str):
    """The cotangent of the state entering a chunk from the one leaving it, ``dSᵀ [BV, K]``."""
    t = _transform(k, v, ch, products)
    _, dVn = _new_values_grad(q, k, do, ch, t, dST, products)
    return (_decay_state(dST, ch.gates.total) + dot(do, _scaled(q, ch.gates.from_start), (0, 0), products)
            - dot(dVn, t.W, (0, 0), products))


def _row_to_column(r: Array) -> Array:
    """``[1, C]`` -> ``[C, 1]`` by a masked sum (no transpose)."""
    C = r.shape[1]
    return jnp.sum(jnp.where(iota((C, C), 0) == iota((C, C), 1), r, 0.0), axis=1, keepdims=True)


def _sum_all(x: Array) -> Array:
    return jnp.sum(jnp.sum(x, axis=1, keepdims=True), axis=0, keepdims=True)


def chunk_backward(q, k, v, do, ch: DeltaChunk, ST, dST, mode, sub: int, products: str):
    """One chunk backward.  ``ST``: the state entering the chunk; ``dST``: the cotangent of the
    state leaving it.  Returns ``(dq, dk, dv, dSᵀ entering, (dβ [C, 1], dG [C, 1] with a gate))``,
    all float32; dq, dk, dβ and dG are this value block's share."""
    p = products
    C = q.shape[0]
    causal = iota((C, C), 0) >= iota((C, C), 1)
    strict = iota((C, C), 0) > iota((C, C), 1)
    g = ch.gates
    beta = ch.beta
    t = _transform(k, v, ch, p)
    Vn = t.U - dot(t.W, ST, (1, 1), p)
    P, dVn = _new_values_grad(q, k, do, ch, t, dST, p)
    qg, kd = _scaled(q, g.from_start), _scaled(k, g.to_end)

    dP = jnp.where(causal, dot(do, Vn, (1, 1), p), 0.0)
    dPD = dP * t.D
    dqg = dot(do, ST, products=p)                                      # d(Q ⊙ γ)
    dkd = dot(Vn, dST, products=p)                                     # d(K ⊙ exp(G_C - G))
    dW = -dot(dVn, ST, products=p)
    TdU = dot(t.T, dVn, (0, 0), p)                                     # Tᵀ dU
    TdW = dot(t.T, dW, (0, 0), p)                                      # Tᵀ dW
    dkg = beta * TdW                                                   # d(K ⊙ γ)
    dT = dot(dVn, t.bv, (1, 1), p) + dot(dW, t.bkg, (1, 1), p)
    dA = jnp.where(strict, -dot(dot(t.T, dT, (0, 0), p), t.T, (1, 1), p), 0.0)
    E = dA * t.D * beta

    dq = dot(dPD, k, products=p) + _scaled(dqg, g.from_start)
    dk = (dot(dPD, q, (0, 0), p) + _scaled(dkd, g.to_end) + _scaled(dkg, g.from_start)
          + dot(E, k, products=p) + dot(E, k, (0, 0), p))
    dv = beta * TdU
    kg = _scaled(k, g.from_start).astype(F32)
    dbeta = (jnp.sum(TdU * v.astype(F32), axis=1, keepdims=True) + jnp.sum(TdW * kg, axis=1, keepdims=True)
             + jnp.sum(dA * t.KK * t.D, axis=1, keepdims=True))
    dST_prev = (_decay_state(dST, g.total) + dot(do, qg, (0, 0), p) - dot(dVn, t.W, (0, 0), p))
    if mode is None:
        return dq, dk, dv, dST_prev, (dbeta,)

    M = dP * P + dA * t.A
    kd_term = kd.astype(F32) * dkd
    dG = (jnp.sum(M, axis=1, keepdims=True) - _row_to_column(jnp.sum(M, axis=0, keepdims=True))
          + jnp.sum(qg.astype(F32) * dqg, axis=1, keepdims=True) + jnp.sum(kg * dkg, axis=1, keepdims=True)
          - jnp.sum(kd_term, axis=1, keepdims=True))
    at_end = _sum_all(kd_term) + jnp.exp(g.total) * _sum_all(ST * dST)
    dG = dG + jnp.where(iota((C, 1), 0) == C - 1, at_end, 0.0)
    return dq, dk, dv, dST_prev, (dbeta, dG)
