"""Log-space decays inside a chunk: cumulative sums, masked decay matrices, resets.

A log gate ``g_t <= 0`` decays the state by ``exp(g_t)``.  Over a span of tokens ``(j, i]`` the
decay is ``exp(G_i - G_j)`` with ``G`` the cumulative sum of ``g`` from the chunk start, and the
chunk forms only ever evaluate such differences for ``j <= i``, so every exponent is ``<= 0``:
strong gates underflow to the correct 0 and never overflow.

**Resets.**  A gate of ``-inf`` (allowed: ``exp(-inf) = 0`` wipes the state) would make ``G``
``-inf`` and ``G_i - G_j`` NaN, and a very negative finite gate puts a large offset into ``G``
that costs the differences after it their precision.  So every gate below
:data:`RESET_LOG_DECAY` (its decay ``exp(g)`` is below 1e-35, zero at float32 resolution) is
treated as an exact reset: it is taken out of ``G`` and counted in a second cumulative sum ``R``
of resets, and the span exponent becomes ``(G_i - G_j) - RESET_PENALTY * (R_i - R_j)``.  Both
terms are exact differences, the first is unchanged where no reset intervenes, and the second
drives ``exp`` to exactly 0 where one does.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from .precision import einsum

Array = jax.Array

RESET_LOG_DECAY = -80.0
"""Log gates below this (decay < 1.8e-35) are exact resets."""

RESET_PENALTY = 1e4
"""Added to the negated exponent once per reset crossed: ``exp(-1e4)`` is 0 in float32."""


def split_resets(g: Array) -> tuple[Array, Array]:
    """``(g_finite, resets)`` float32: the gate with resets replaced by 0, and a 0/1 reset flag."""
    g = jnp.asarray(g, jnp.float32)
    resets = g < RESET_LOG_DECAY
    return jnp.where(resets, 0.0, g), resets.astype(jnp.float32)


def tril_mask(size: int) -> Array:
    """``[C, C]`` float32, 1 where i >= j.

    Masks are applied by multiplication, ``exp(x * m) * m``: the exponent is 0 (not large)
    above the diagonal *before* ``exp`` and the product is zeroed after.  (XLA on CPU
    vectorises a multiply by a constant but not a select against a broadcast constant mask
    inside a fused reduction: ``jnp.where`` there was 5-30x slower.)
    """
    i = np.arange(size)
    return jnp.asarray((i[:, None] >= i[None, :]).astype(np.float32))


def chunk_cumsum(x: Array, axis: int) -> Array:
    """Inclusive cumulative sum along a chunk axis, as a ``[C, C]`` triangular product.

    ``jnp.cumsum`` lowers to a reduce-window that XLA may fuse into, and recompute inside, its
    consumers (it made GLA's intra-chunk pass ~50x slower on CPU); a dot is never fused that way.
    """
    x = jnp.moveaxis(x, axis, -1)
    return jnp.moveaxis(einsum("...j,ij->...i", x, tril_mask(x.shape[-1])), -1, axis)


def chunk_log_decay(g: Array, axis: int) -> tuple[Array, Array]:
    """``(G, R)``: in-chunk cumulative finite log decay and cumulative reset count along ``axis``."""
    g_finite, resets = split_resets(g)
    return chunk_cumsum(g_finite, axis), chunk_cumsum(resets, axis)


def span(G_i: Array, G_j: Array, R_i: Array, R_j: Array) -> Array:
    """The log decay from token j to token i (``j <= i``): always ``<= 0``, ``-1e4`` or less across a reset."""
    return (G_i - G_j) - RESET_PENALTY * (R_i - R_j)


def from_start(G: Array, R: Array) -> Array:
    """The log decay from the chunk start to each token (exact: 0 resets, or at least -1e4)."""
    return G - RESET_PENALTY * R


def pairwise_decay(G: Array, R: Array) -> Array:
    """``[..., C, C]`` decay matrix ``D_ij = exp(span(i, j))`` for ``i >= j``, 0 above the diagonal.

    ``G, R: [..., C]`` from :func:`chunk_log_decay`; the exponent is masked before ``exp``.
    """
    m = tril_mask(G.shape[-1])
    diff = span(G[..., :, None], G[..., None, :], R[..., :, None], R[..., None, :])
    return jnp.exp(diff * m) * m


def decay_from_start(g: Array, axis: int = 1) -> Array:
    """``exp(sum of g from the start of axis up to and including each position)``, reset-exact.

    Used where a whole block of tokens (one device's share of a sequence) is corrected by the
    state that entered it: the correction to token t is ``(q_t ⊙ decay_from_start_t)ᵀ S_in``.
    """
    g_finite, resets = split_resets(g)
    return jnp.exp(from_start(jnp.cumsum(g_finite, axis), jnp.cumsum(resets, axis)))
