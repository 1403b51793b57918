"""Token-by-token Gated DeltaNet (decoding), with optional decays per key and value dimension."""

from __future__ import annotations

from ..common.prepare import finish, prepare
from ..common.recurrent import fused_recurrent
from .chunk import gate_arguments


def fused_recurrent_gated_delta_rule(q, k, v, g=None, gk=None, gv=None, beta=None, scale=None, initial_state=None,
                                     output_final_state=False, use_qk_l2norm_in_kernel=False,
                                     use_gate_in_kernel=False, A_log=None, dt_bias=None,
                                     use_beta_sigmoid_in_kernel=False, allow_neg_eigval=False, state_v_first=False,
                                     cu_seqlens=None):
    """Token-by-token gated delta rule:
    ``S_t = exp(g_t) Diag(exp(gk_t)) (I - β_t k_t k_tᵀ) S_{t-1} Diag(exp(gv_t)) + β_t k_t v_tᵀ``
    in the order decay first, then the delta step.

    ``g [B, T, HV]``, ``gk [B, T, HV, K]``, ``gv [B, T, HV, V]`` are log decays (each may be
    None); ``beta=None`` means a step of 1.  The other arguments and the return are those of
    :func:`~lolax.ops.gated_delta_rule.chunk_gated_delta_rule`.  A one-token call carrying the
    state is the decoding step.

    >>> import jax, jax.numpy as jnp
    >>> q, k, v = jax.random.normal(jax.random.key(0), (3, 1, 1, 2, 16))
    >>> o, S = fused_recurrent_gated_delta_rule(q, k, v, jnp.full((1, 1, 2), -0.1), beta=jnp.full((1, 1, 2), 0.5),
    ...                                         use_qk_l2norm_in_kernel=True, output_final_state=True)
    >>> S.shape
    (1, 2, 16, 16)
    """
    x = prepare(q, k, v, g=g, gk=gk, gv=gv, beta=beta, delta_rule=True, scale=scale, initial_state=initial_state,
                output_final_state=output_final_state, cu_seqlens=cu_seqlens, grouped_values=True,
                qk_l2norm=use_qk_l2norm_in_kernel, beta_logits=use_beta_sigmoid_in_kernel,
                allow_neg_eigval=allow_neg_eigval, state_v_first=state_v_first,
                **gate_arguments(use_gate_in_kernel, A_log, dt_bias))
    return finish(x, *fused_recurrent(x))
