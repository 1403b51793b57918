"""Lightning Attention: simple GLA with a fixed per-head decay that depends on the layer's depth."""

from __future__ import annotations

from .common import checks
from .simple_gla import chunk_simple_gla, fused_recurrent_simple_gla, lightning_g_gamma


def chunk_lightning_attn(q, k, v, layer_idx, num_layers, scale=None, initial_state=None, output_final_state=False,
                         cu_seqlens=None, *, decay="fla_linear", chunk_size=64,
                         implementation=None):
    """:func:`~lolax.ops.simple_gla.chunk_simple_gla` with ``g_gamma = lightning_g_gamma(H, layer_idx,
    num_layers, decay)``.

    ``decay`` names the schedule (:data:`~lolax.ops.simple_gla.LIGHTNING_DECAYS`); the default
    ``"fla_linear"`` is flash-linear-attention's, ``"alibi_slopes"`` the Lightning Attention-2
    release's.  ``implementation`` is :func:`~lolax.ops.simple_gla.chunk_simple_gla`'s.

    >>> import jax
    >>> q, k, v = jax.random.normal(jax.random.key(0), (3, 1, 40, 4, 8))
    >>> chunk_lightning_attn(q, k, v, layer_idx=1, num_layers=4)[0].shape
    (1, 40, 4, 8)
    """
    checks.check_array("q", q)
    g_gamma = lightning_g_gamma(q.shape[2], layer_idx, num_layers, decay)
    return chunk_simple_gla(q, k, v, g_gamma=g_gamma, scale=scale, initial_state=initial_state,
                            output_final_state=output_final_state, cu_seqlens=cu_seqlens, chunk_size=chunk_size,
                            implementation=implementation)


def fused_recurrent_lightning_attn(q, k, v, layer_idx, num_layers, scale=None, initial_state=None,
                                   output_final_state=False, reverse=False, cu_seqlens=None, *,
                                   decay="fla_linear"):
    """Token-by-token Lightning Attention (decoding); see :func:`chunk_lightning_attn`.

    >>> import jax
    >>> q, k, v = jax.random.normal(jax.random.key(0), (3, 1, 1, 4, 8))
    >>> fused_recurrent_lightning_attn(q, k, v, 0, 2, output_final_state=True)[1].shape
    (1, 4, 8, 8)
    """
    checks.check_array("q", q)
    g_gamma = lightning_g_gamma(q.shape[2], layer_idx, num_layers, decay)
    return fused_recurrent_simple_gla(q, k, v, g_gamma=g_gamma, scale=scale, initial_state=initial_state,
                                      output_final_state=output_final_state, reverse=reverse,
                                      cu_seqlens=cu_seqlens)
