"""Simple GLA: a scalar log decay per head, ``S_t = exp(g_t) S_{t-1} + k_t v_tᵀ``.

Covers RetNet (:mod:`lolax.ops.retention`), Lightning Attention (:mod:`lolax.ops.lightning_attn`)
with the schedules of :mod:`.decay`, and Mamba2/SSD (``q = C``, ``k = B``, ``v = Δ·x``,
``g = Δ·a``, ``scale = 1``).
"""

from .chunk import chunk_simple_gla
from .decay import LIGHTNING_DECAYS, alibi_slopes, lightning_g_gamma, retnet_g_gamma
from .fused_recurrent import fused_recurrent_simple_gla
from .naive import naive_simple_gla

__all__ = ["chunk_simple_gla", "fused_recurrent_simple_gla", "naive_simple_gla", "retnet_g_gamma",
           "lightning_g_gamma", "alibi_slopes", "LIGHTNING_DECAYS"]
