"""Chunkwise linear attention: the diagonal chunk form with no decay."""

from __future__ import annotations

import jax.numpy as jnp

from ..common import checks
from ..common.diagonal import chunk_diagonal
from ..common.diagonal_kernels import chunk_diagonal_dispatch
from .normalize import EPS, augment, key_sums, plain_inputs


def chunk_linear_attn(q, k, v, scale=None, initial_state=None, output_final_state=False, normalize=True,
                      cu_seqlens=None, *, chunk_size=64, implementation=None):
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
      implementation: ``"xla"``, ``"pallas"`` or None (the Pallas kernels on TPU and GPU when they
        support the inputs, XLA otherwise); see ``docs/kernels.md``.

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
    x, z0 = plain_inputs(q, k, v, scale, initial_state, output_final_state, normalize, cu_seqlens)
    C = min(size, x.k.shape[1])
    if normalize:
        o, final = chunk_diagonal_dispatch(x, None, size, 16, implementation, _normalized_xla, (C,),
                                           _normalized_kernels, extra=z0, with_extra=True)
    else:
        o, final = chunk_diagonal_dispatch(x, None, size, 16, implementation, chunk_diagonal, (C,))
    return o.astype(x.out_dtype), (final if x.output_final_state else None)


def _normalized_xla(x, z0, C: int):
    """The XLA form normalises through a value column of ones (its state is ``[S, z]``)."""
    o, final = chunk_diagonal(augment(x, z0), C)
    V = x.v.shape[-1]
    return o[..., :V] / (o[..., V:] + EPS), (final[..., :V], final[..., V][:, None])


def _normalized_kernels(x, z0, o, final):
    """The kernels run without the ones column; the key sums are a segmented scan in XLA."""
    z, z_final = key_sums(x, z0)
    den = jnp.sum(x.q * z, axis=-1, keepdims=True) + EPS
    return o / den, (final, z_final[:, None])
