"""Chunkwise linear attention: the diagonal chunk form with no decay."""

from __future__ import annotations

from ..common import checks
from ..common.diagonal import chunk_diagonal
from .normalize import normalized_inputs, normalized_outputs


def chunk_linear_attn(q, k, v, scale=None, initial_state=None, output_final_state=False, normalize=True,
                      cu_seqlens=None, *, chunk_size=64):
    """Chunkwise linear attention ``S_t = S_{t-1} + k_t v_tᵀ``, ``o_t = S_tᵀ (s q_t)``.

    Args:
      q, k: ``[B, T, H, K]`` (feature maps, if any, already applied); v: ``[B, T, H, V]``.
      scale: multiplies q; None means ``K ** -0.5``.
      initial_state: ``[N, H, K, V]`` float32, or with ``normalize`` the pair
        ``(S [N, H, K, V], z [N, 1, H, K])`` (either part may be the state alone).
      output_final_state: also return the state after each sequence's last token (the pair
        ``(S, z)`` with ``normalize``).
      normalize: divide by ``s q_t · z_t + 1e-10`` with ``z_t = z_0 + Σ_{u<=t} k_u`` (needs a
        positive feature map).  Default True, as in flash-linear-attention.
      cu_seqlens: ``[N + 1]`` int offsets of packed sequences (B == 1).
      chunk_size: tokens per chunk (static).

    Returns:
      ``(o [B, T, H, V] in v's dtype, final_state or None)``.

    >>> import jax, jax.numpy as jnp
    >>> q = k = jax.nn.elu(jax.random.normal(jax.random.key(0), (1, 100, 2, 16))) + 1
    >>> v = jax.random.normal(jax.random.key(1), (1, 100, 2, 8))
    >>> o, (S, z) = chunk_linear_attn(q, k, v, output_final_state=True)
    >>> o.shape, S.shape, z.shape
    ((1, 100, 2, 8), (1, 2, 16, 8), (1, 1, 2, 16))
    """
    size = checks.check_chunk_size(chunk_size)
    x = normalized_inputs(q, k, v, scale, initial_state, output_final_state, normalize, cu_seqlens)
    o, final = chunk_diagonal(x, min(size, x.k.shape[1]))
    return normalized_outputs(x, o, final, normalize)
