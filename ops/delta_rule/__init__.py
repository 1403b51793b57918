"""DeltaNet: ``S_t = (I − β_t k_t k_tᵀ) S_{t−1} + β_t k_t v_tᵀ``, ``o_t = S_tᵀ (scale · q_t)``.

``chunk_delta_rule`` (WY/UT chunkwise, training default), ``recurrent_delta_rule`` (alias
``fused_recurrent_delta_rule``; token-by-token, decoding) and ``naive_delta_rule`` (float32
oracle) share one signature; see ``docs/ops_delta_attention.md``.
"""

from ops.delta_rule.chunk import chunk_delta_rule, chunk_transitions, unit_tril_inverse
from ops.delta_rule.naive import naive_delta_rule
from ops.delta_rule.recurrent import fused_recurrent_delta_rule, recurrent_delta_rule

__all__ = ["chunk_delta_rule", "recurrent_delta_rule", "fused_recurrent_delta_rule", "naive_delta_rule",
           "chunk_transitions", "unit_tril_inverse"]
