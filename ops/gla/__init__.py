"""GLA: a log decay per key dimension, ``S_t = Diag(exp(g_t)) S_{t-1} + k_t v_tᵀ``."""

from .chunk import chunk_gla
from .fused_recurrent import fused_recurrent_gla
from .naive import naive_gla

__all__ = ["chunk_gla", "fused_recurrent_gla", "naive_gla"]
