"""Float32 oracle for GLA (per-key-dimension log decay)."""

from __future__ import annotations

from ops.gla import _api
from ops.simple_gla import _core


def naive_gla(q, k, v, g, scale=None, initial_state=None, output_final_state=False,
              cu_seqlens=None):
    """``S_t = Diag(exp(g_t)) S_{t-1} + k_t v_tᵀ``, ``o_t = S_tᵀ (s q_t)``, plain float32 scan."""
    return _api.run(_core.naive_diag, q, k, v, g, scale, initial_state, output_final_state,
                    cu_seqlens)
