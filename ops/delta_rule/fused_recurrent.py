"""Token-by-token DeltaNet (decoding)."""

from __future__ import annotations

from ..common.prepare import finish, prepare
from ..common.recurrent import fused_recurrent


def fused_recurrent_delta_rule(q, k, v, beta=None, scale=None, initial_state=None, output_final_state=False,
                               use_qk_l2norm_in_kernel=False, cu_seqlens=None, *, use_beta_sigmoid_in_kernel=False,
                               allow_neg_eigval=False, state_v_first=False):
    """Token-by-token DeltaNet; the arguments and return of
    :func:`~lolax.ops.delta_rule.chunk_delta_rule`, with ``beta=None`` meaning a step of 1.

    A one-token call carrying the state is the decoding step.

    >>> import jax, jax.numpy as jnp
    >>> q, k, v = jax.random.normal(jax.random.key(0), (3, 1, 1, 2, 16))
    >>> o, S = fused_recurrent_delta_rule(q, k, v, jnp.full((1, 1, 2), 0.5), output_final_state=True,
    ...                                   use_qk_l2norm_in_kernel=True)
    >>> S.shape
    (1, 2, 16, 16)
    """
    x = prepare(q, k, v, beta=beta, delta_rule=True, scale=scale, initial_state=initial_state,
                output_final_state=output_final_state, cu_seqlens=cu_seqlens, qk_l2norm=use_qk_l2norm_in_kernel,
                beta_logits=use_beta_sigmoid_in_kernel, allow_neg_eigval=allow_neg_eigval, state_v_first=state_v_first)
    return finish(x, *fused_recurrent(x))

