"""Gated DeltaNet (GDN): ``S_t = exp(g_t) (I − β_t k_t k_tᵀ) S_{t−1} + β_t k_t v_tᵀ``.

``chunk_gated_delta_rule``, ``recurrent_gated_delta_rule`` (alias
``fused_recurrent_gated_delta_rule``) and ``naive_gated_delta_rule`` share one signature; value
heads may outnumber key heads (grouped values).  See ``docs/ops_delta_attention.md``.
"""

from ops.gated_delta_rule.chunk import chunk_gated_delta_rule, chunk_gated_transitions
from ops.gated_delta_rule.naive import naive_gated_delta_rule
from ops.gated_delta_rule.recurrent import fused_recurrent_gated_delta_rule, recurrent_gated_delta_rule

__all__ = ["chunk_gated_delta_rule", "recurrent_gated_delta_rule", "fused_recurrent_gated_delta_rule",
           "naive_gated_delta_rule", "chunk_gated_transitions"]
