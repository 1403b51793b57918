"""Recurrent gated delta rule: token-by-token ``lax.scan`` with packing, for decoding."""

from ops.delta_rule import _args
from ops.delta_rule.recurrent import recurrent_core
from ops.gated_delta_rule._doc import ARGS


def recurrent_gated_delta_rule(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False,
                               use_qk_l2norm_in_kernel=False, allow_neg_eigval=False, cu_seqlens=None, *,
                               chunk_size=None, use_qk_l2norm=None):
    p = _args.prepare(q, k, v, g, beta, scale=scale, initial_state=initial_state,
                      use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel, use_qk_l2norm=use_qk_l2norm,
                      allow_neg_eigval=allow_neg_eigval, cu_seqlens=cu_seqlens, gated=True)
    return recurrent_core(p, cu_seqlens, output_final_state)


recurrent_gated_delta_rule.__doc__ = (
    "Token-by-token gated delta rule (decoding; a one-token call carrying the state reproduces the\n"
    "full forward).  Backward memory grows as T·HV·K·V: train with the chunk form.\n" + ARGS)

fused_recurrent_gated_delta_rule = recurrent_gated_delta_rule
