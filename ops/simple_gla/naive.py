"""Float32 oracle for simple GLA (scalar log decay per head)."""

from __future__ import annotations

from ops.simple_gla import _api, _core


def _core_naive(q, k, v, g, scale, h0, cu):
    return _core.naive_diag(q, k, v, g[..., None], scale, h0, cu)


def naive_simple_gla(q, k, v, g=None, g_gamma=None, scale=None, initial_state=None,
                     output_final_state=False, cu_seqlens=None):
    """``S_t = exp(g_t) S_{t-1} + k_t v_tᵀ``, ``o_t = S_tᵀ (s q_t)`` as a plain float32 scan."""
    return _api.run(_core_naive, q, k, v, g, g_gamma, scale, initial_state, output_final_state,
                    cu_seqlens)
