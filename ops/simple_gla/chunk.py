"""Chunkwise simple GLA: the diagonal chunk form with a scalar log decay per head."""

from __future__ import annotations

from ..common import checks
from ..common.diagonal import chunk_diagonal
from ..common.diagonal_kernels import chunk_diagonal_dispatch
from ..common.prepare import finish, prepare


def chunk_simple_gla(q, k, v, g=None, g_gamma=None, scale=None, initial_state=None, output_final_state=False,
                     state_v_first=False, cu_seqlens=None, *, chunk_size=64, implementation=None):
    """Chunkwise ``S_t = exp(g_t) S_{t-1} + k_t v_tᵀ``, ``o_t = S_tᵀ (s q_t)``.

    Args:
      q, k: ``[B, T, H, K]``; v: ``[B, T, H, V]``.
      g: ``[B, T, H]`` log decay (``<= 0``; ``-inf`` resets the state), or
      g_gamma: ``[H]`` constant log decay per head.  At most one; neither means no decay.
      scale: multiplies q; None means ``K ** -0.5``.
      initial_state: ``[N, H, K, V]`` float32 (``[N, H, V, K]`` with ``state_v_first``) or None.
      output_final_state: also return the state after each sequence's last token.
      state_v_first: states in ``[N, H, V, K]`` order (a layout choice only).
      cu_seqlens: ``[N + 1]`` int offsets of packed sequences (B == 1).
      chunk_size: tokens per chunk (static).
      implementation: ``"xla"``, ``"pallas"`` or None (the Pallas kernels on TPU and GPU when they
        support the inputs, XLA otherwise); see ``docs/kernels.md``.

    Returns:
      ``(o [B, T, H, V] in v's dtype, final_state float32 or None)``.

    >>> import jax, jax.numpy as jnp
    >>> q, k, v = jax.random.normal(jax.random.key(0), (3, 1, 50, 2, 8))
    >>> g = jax.nn.log_sigmoid(jax.random.normal(jax.random.key(1), (1, 50, 2)))
    >>> o, S = chunk_simple_gla(q, k, v, g, output_final_state=True)
    >>> o.shape, S.shape
    ((1, 50, 2, 8), (1, 2, 8, 8))
    """
    size = checks.check_chunk_size(chunk_size)
    x = prepare(q, k, v, g=g, g_gamma=g_gamma, scale=scale, initial_state=initial_state,
                output_final_state=output_final_state, state_v_first=state_v_first, cu_seqlens=cu_seqlens)
    mode = None if x.g is None else "head"
    o, final = chunk_diagonal_dispatch(x, mode, size, 16, implementation, chunk_diagonal,
                                       (min(size, x.k.shape[1]),))
    return finish(x, o, final)
