"""Simple GLA: a scalar log decay per head, ``S_t = exp(g_t) S_{t-1} + k_t v_tᵀ``.

Covers RetNet retention and Lightning Attention (:mod:`ops.simple_gla.decay`) and Mamba2/SSD
(``q = C``, ``k = B``, ``v = Δ·x``, ``g = Δ·a``, ``scale = 1``).
"""

from ops.simple_gla.chunk import chunk_simple_gla
from ops.simple_gla.decay import (LIGHTNING_DECAYS, alibi_slopes, chunk_lightning_attn,
                                  chunk_retention, lightning_g_gamma, recurrent_lightning_attn,
                                  recurrent_retention, retnet_g_gamma)
from ops.simple_gla.naive import naive_simple_gla
from ops.simple_gla.recurrent import fused_recurrent_simple_gla, recurrent_simple_gla

__all__ = ["chunk_simple_gla", "recurrent_simple_gla", "fused_recurrent_simple_gla",
           "naive_simple_gla", "chunk_retention", "recurrent_retention", "chunk_lightning_attn",
           "recurrent_lightning_attn", "retnet_g_gamma", "lightning_g_gamma", "alibi_slopes",
           "LIGHTNING_DECAYS"]
