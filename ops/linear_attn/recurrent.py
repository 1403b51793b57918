"""Token-by-token linear attention (decoding form)."""

from __future__ import annotations

import functools

from ops.linear_attn import _api
from ops.simple_gla import _core


def recurrent_linear_attn(q, k, v, scale=None, normalize=False, initial_state=None,
                          output_final_state=False, cu_seqlens=None, *, initial_normalizer=None,
                          reverse=False):
    """Token-by-token ``lax.scan`` form; same contract as :func:`chunk_linear_attn`.

    A one-token call with ``initial_state`` (and, when normalising, ``initial_normalizer``)
    continues a sequence exactly: this is the decoding step.  ``reverse=True`` runs each
    sequence from its last token to its first.
    """
    _core.check_bool("reverse", reverse)
    core = functools.partial(_core.recurrent_diag, reverse=reverse)
    return _api.run(core, q, k, v, scale, normalize, initial_state, output_final_state,
                    cu_seqlens, initial_normalizer)


fused_recurrent_linear_attn = recurrent_linear_attn
