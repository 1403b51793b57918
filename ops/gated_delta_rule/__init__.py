"""Gated DeltaNet (GDN): ``S_t = exp(g_t) (I - β_t k_t k_tᵀ) S_{t-1} + β_t k_t v_tᵀ``.

Value heads may outnumber key heads (grouped values, as in Qwen3-Next).
"""

from .chunk import chunk_gated_delta_rule, chunk_gated_transitions
from .fused_recurrent import fused_recurrent_gated_delta_rule
from .naive import naive_gated_delta_rule

__all__ = ["chunk_gated_delta_rule", "fused_recurrent_gated_delta_rule", "naive_gated_delta_rule",
           "chunk_gated_transitions"]
