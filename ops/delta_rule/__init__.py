"""DeltaNet: ``S_t = (I - β_t k_t k_tᵀ) S_{t-1} + β_t k_t v_tᵀ``, ``o_t = S_tᵀ (s q_t)``."""

from .chunk import chunk_delta_rule, chunk_transitions
from .fused_recurrent import fused_recurrent_delta_rule
from .naive import naive_delta_rule

__all__ = ["chunk_delta_rule", "fused_recurrent_delta_rule", "naive_delta_rule", "chunk_transitions"]
