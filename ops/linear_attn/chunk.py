"""Chunkwise linear attention (REFERENCE §1.2 with g = 0)."""

from __future__ import annotations


from ops import _common as cm
from ops.linear_attn import _api
from ops.simple_gla import _core


def chunk_linear_attn(q, k, v, scale=None, normalize=False, initial_state=None,
                      output_final_state=False, cu_seqlens=None, *, chunk_size=64,
                      initial_normalizer=None):
    """Chunkwise linear attention ``S_t = S_{t-1} + k_t v_tᵀ``, ``o_t = S_tᵀ (s q_t)``.

    Args:
      q, k: ``[B, T, H, K]`` (feature maps, if any, already applied by the caller).
      v: ``[B, T, H, V]``.
      scale: multiplies q; None means ``K ** -0.5``.
      normalize: divide by ``s q_t · z_t + 1e-10`` with ``z_t = z_0 + Σ_{u≤t} k_u`` (FLA's
        normalisation; needs a positive feature map).  Default False.
      initial_state: ``[N, H, K, V]`` float32 or None (zeros).
      output_final_state: return the state after the last token of each sequence.
      cu_seqlens: ``[N + 1]`` int offsets of packed sequences (requires B == 1).
      chunk_size: tokens per chunk (static).
      initial_normalizer: ``[N, H, K]`` float32 ``z_0`` (only with ``normalize=True``; zeros if
        None).  The final normaliser is not returned: it is ``z_0 + k.sum(axis=1)`` per
        sequence, which the caller carries alongside the state for decoding.

    Returns:
      ``(o [B, T, H, V] in v's dtype, final_state [N, H, K, V] float32 or None)``.  With
      ``normalize=True`` the final state is the unnormalised S.
    """
    cm.check_chunk_size(chunk_size)
    core = lambda q, k, v, g, s, h0, cu: _core.chunk_scalar(q, k, v, None, s, h0, cu, chunk_size)
    return _api.run(core, q, k, v, scale, normalize, initial_state, output_final_state,
                    cu_seqlens, initial_normalizer)
