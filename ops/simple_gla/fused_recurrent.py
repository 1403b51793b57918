"""Token-by-token simple GLA (decoding)."""

from __future__ import annotations

from ..common import checks
from ..common.prepare import finish, prepare
from ..common.recurrent import fused_recurrent


def fused_recurrent_simple_gla(q, k, v, g=None, g_gamma=None, scale=None, initial_state=None,
                               output_final_state=False, reverse=False, state_v_first=False, cu_seqlens=None):
    """Token-by-token simple GLA: the arguments of :func:`~lolax.ops.simple_gla.chunk_simple_gla`
    plus ``reverse`` (run every sequence from its last token to its first).

    A one-token call carrying the state is the decoding step.

    >>> import jax, jax.numpy as jnp
    >>> q, k, v = jax.random.normal(jax.random.key(0), (3, 1, 1, 2, 8))
    >>> S = jnp.zeros((1, 2, 8, 8))
    >>> o, S = fused_recurrent_simple_gla(q, k, v, g_gamma=jnp.log(jnp.array([0.9, 0.99])),
    ...                                   initial_state=S, output_final_state=True)
    >>> o.shape, S.shape
    ((1, 1, 2, 8), (1, 2, 8, 8))
    """
    reverse = checks.check_bool("reverse", reverse)
    x = prepare(q, k, v, g=g, g_gamma=g_gamma, scale=scale, initial_state=initial_state,
                output_final_state=output_final_state, state_v_first=state_v_first, cu_seqlens=cu_seqlens)
    o, final = fused_recurrent(x, reverse=reverse)
    return finish(x, o, final)
