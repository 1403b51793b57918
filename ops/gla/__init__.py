"""GLA: a log decay per key dimension, ``S_t = Diag(exp(g_t)) S_{t-1} + k_t v_tᵀ``."""

from ops.gla.chunk import chunk_gla
from ops.gla.naive import naive_gla
from ops.gla.recurrent import fused_recurrent_gla, recurrent_gla

__all__ = ["chunk_gla", "recurrent_gla", "fused_recurrent_gla", "naive_gla"]
