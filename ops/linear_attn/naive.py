"""Float32 oracle for (optionally normalised) linear attention."""

from __future__ import annotations

from ops.linear_attn import _api
from ops.simple_gla import _core


def naive_linear_attn(q, k, v, scale=None, normalize=False, initial_state=None,
                      output_final_state=False, cu_seqlens=None, *, initial_normalizer=None):
    """``S_t = S_{t-1} + k_t v_tᵀ``, ``o_t = S_tᵀ (s q_t)`` as a plain float32 scan.

    Same contract as :func:`ops.linear_attn.chunk_linear_attn`; ``cu_seqlens`` must be concrete
    (sequences are looped over in Python).
    """
    return _api.run(_core.naive_diag, q, k, v, scale, normalize, initial_state,
                    output_final_state, cu_seqlens, initial_normalizer)
