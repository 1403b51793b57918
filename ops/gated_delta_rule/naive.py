"""Naive gated delta rule: float32 token loop, the oracle (``cu_seqlens`` must be concrete)."""

from ops.delta_rule import _args
from ops.delta_rule.naive import naive_core
from ops.gated_delta_rule._doc import ARGS


def naive_gated_delta_rule(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False,
                           use_qk_l2norm_in_kernel=False, allow_neg_eigval=False, cu_seqlens=None, *,
                           chunk_size=None, use_qk_l2norm=None):
    p = _args.prepare(q, k, v, g, beta, scale=scale, initial_state=initial_state,
                      use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel, use_qk_l2norm=use_qk_l2norm,
                      allow_neg_eigval=allow_neg_eigval, cu_seqlens=cu_seqlens, gated=True)
    return naive_core(p, cu_seqlens, output_final_state)


naive_gated_delta_rule.__doc__ = "Float32 reference recurrence of the gated delta rule.\n" + ARGS
