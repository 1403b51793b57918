"""Chunkwise simple GLA (REFERENCE §1.2 with a scalar log decay per head)."""

from __future__ import annotations

from ops import _common as cm
from ops.simple_gla import _api, _core


def chunk_simple_gla(q, k, v, g=None, g_gamma=None, scale=None, initial_state=None,
                     output_final_state=False, cu_seqlens=None, *, chunk_size=64):
    """Chunkwise ``S_t = exp(g_t) S_{t-1} + k_t v_tᵀ``, ``o_t = S_tᵀ (s q_t)``.

    Args:
      q, k: ``[B, T, H, K]``; v: ``[B, T, H, V]``.
      g: ``[B, T, H]`` log decay (``<= 0``), or
      g_gamma: ``[H]`` constant per-head log decay (exactly one of g / g_gamma).
      scale: multiplies q; None means ``K ** -0.5``.
      initial_state: ``[N, H, K, V]`` float32 or None.
      output_final_state: also return the state after each sequence's last token.
      cu_seqlens: ``[N + 1]`` int offsets of packed sequences (B == 1).
      chunk_size: tokens per chunk (static).

    Returns:
      ``(o [B, T, H, V] in v's dtype, final_state [N, H, K, V] float32 or None)``.
    """
    cm.check_chunk_size(chunk_size)

    def core(q, k, v, g, scale, h0, cu):
        return _core.chunk_scalar(q, k, v, g, scale, h0, cu, chunk_size)

    return _api.run(core, q, k, v, g, g_gamma, scale, initial_state, output_final_state,
                    cu_seqlens)
