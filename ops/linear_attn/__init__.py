"""Linear attention ``S_t = S_{t-1} + k_t v_tᵀ``, ``o_t = S_tᵀ (s q_t)``, optionally normalised.

Feature maps (:mod:`lolax.ops.feature_maps`) are applied to q and k by the caller, not the op.
"""

from .chunk import chunk_linear_attn
from .fused_recurrent import fused_recurrent_linear_attn
from .naive import naive_linear_attn

__all__ = ["chunk_linear_attn", "fused_recurrent_linear_attn", "naive_linear_attn"]
