"""RetNet retention: simple GLA with RetNet's fixed per-head decay ``γ_h = 1 - 2^(-5-h)``."""

from __future__ import annotations

from .common import checks
from .simple_gla import chunk_simple_gla, fused_recurrent_simple_gla, retnet_g_gamma


def chunk_retention(q, k, v, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None, *,
                    chunk_size=64, implementation=None):
    """:func:`~lolax.ops.simple_gla.chunk_simple_gla` with ``g_gamma = retnet_g_gamma(H)`` (and its
    ``implementation``).

    >>> import jax
    >>> q, k, v = jax.random.normal(jax.random.key(0), (3, 1, 40, 4, 8))
    >>> chunk_retention(q, k, v)[0].shape
    (1, 40, 4, 8)
    """
    checks.check_array("q", q)
    return chunk_simple_gla(q, k, v, g_gamma=retnet_g_gamma(q.shape[2]), scale=scale,
                            initial_state=initial_state, output_final_state=output_final_state,
                            cu_seqlens=cu_seqlens, chunk_size=chunk_size, implementation=implementation)


def fused_recurrent_retention(q, k, v, scale=None, initial_state=None, output_final_state=False, reverse=False,
                              state_v_first=False, cu_seqlens=None):
    """Token-by-token retention (decoding); see :func:`chunk_retention`.

    >>> import jax
    >>> q, k, v = jax.random.normal(jax.random.key(0), (3, 1, 1, 4, 8))
    >>> fused_recurrent_retention(q, k, v, output_final_state=True)[1].shape
    (1, 4, 8, 8)
    """
    checks.check_array("q", q)
    return fused_recurrent_simple_gla(q, k, v, g_gamma=retnet_g_gamma(q.shape[2]), scale=scale,
                                      initial_state=initial_state, output_final_state=output_final_state,
                                      reverse=reverse, state_v_first=state_v_first, cu_seqlens=cu_seqlens)
