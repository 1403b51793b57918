"""Token-by-token GLA (decoding), with decays per key and per value dimension."""

from __future__ import annotations

from ..common import checks
from ..common.prepare import finish, prepare
from ..common.recurrent import fused_recurrent


def fused_recurrent_gla(q, k, v, gk=None, gv=None, scale=None, initial_state=None, output_final_state=False,
                        reverse=False, state_v_first=False, cu_seqlens=None):
    """Token-by-token ``S_t = Diag(exp(gk_t)) S_{t-1} Diag(exp(gv_t)) + k_t v_tᵀ``, ``o_t = S_tᵀ (s q_t)``.

    ``gk [B, T, H, K]`` and ``gv [B, T, H, V]`` are log decays per key and per value dimension
    (either may be None); ``reverse`` runs every sequence from its last token to its first.  The
    other arguments and the return are those of :func:`~lolax.ops.gla.chunk_gla`.  A one-token
    call carrying the state is the decoding step.

    >>> import jax
    >>> q, k, v = jax.random.normal(jax.random.key(0), (3, 1, 1, 2, 16))
    >>> gk = jax.nn.log_sigmoid(q) / 16
    >>> o, S = fused_recurrent_gla(q, k, v, gk, output_final_state=True)
    >>> S.shape
    (1, 2, 16, 16)
    """
    reverse = checks.check_bool("reverse", reverse)
    x = prepare(q, k, v, gk=gk, gv=gv, scale=scale, initial_state=initial_state,
                output_final_state=output_final_state, state_v_first=state_v_first, cu_seqlens=cu_seqlens)
    o, final = fused_recurrent(x, reverse=reverse)
    return finish(x, o, final)
