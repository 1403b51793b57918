"""Token-by-token simple GLA (decoding form)."""

from __future__ import annotations

from ops.simple_gla import _api, _core


def recurrent_simple_gla(q, k, v, g=None, g_gamma=None, scale=None, initial_state=None,
                         output_final_state=False, cu_seqlens=None, *, reverse=False):
    """Token-by-token ``lax.scan`` form; same contract as :func:`chunk_simple_gla`.

    A one-token call carrying ``initial_state`` is the decoding step.
    """
    _core.check_bool("reverse", reverse)

    def core(q, k, v, g, scale, h0, cu):
        return _core.recurrent_diag(q, k, v, g[..., None], scale, h0, cu, reverse=reverse)

    return _api.run(core, q, k, v, g, g_gamma, scale, initial_state, output_final_state,
                    cu_seqlens)


fused_recurrent_simple_gla = recurrent_simple_gla
