"""Token-by-token GLA (decoding form)."""

from __future__ import annotations

import functools

from ops.gla import _api
from ops.simple_gla import _core


def recurrent_gla(q, k, v, g, scale=None, initial_state=None, output_final_state=False,
                  cu_seqlens=None, *, reverse=False):
    """Token-by-token ``lax.scan`` form; same contract as :func:`chunk_gla`.

    A one-token call carrying ``initial_state`` is the decoding step.
    """
    _core.check_bool("reverse", reverse)
    core = functools.partial(_core.recurrent_diag, reverse=reverse)
    return _api.run(core, q, k, v, g, scale, initial_state, output_final_state, cu_seqlens)


fused_recurrent_gla = recurrent_gla
