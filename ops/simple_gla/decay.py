"""Published per-head decay schedules (log space) and the named conveniences built on them.

* RetNet: ``γ_h = 1 − 2^{−5−h}``, ``g_gamma_h = log(1 − 2^{−5−h})`` (FLA's ``chunk_retention``).
* Lightning Attention, two conventions (REFERENCE §1.3), chosen by name:
  - ``"alibi_slopes"`` (the Lightning Attention-2 repository): ALiBi slopes ``s_h`` (for H a
    power of two ``s_h = 2^{−8(h+1)/H}``; otherwise those of the nearest lower power of two P
    followed by every other slope of the 2P set), times ``(1 − l/(L−1) + 1e-5)`` for layer l of
    L; ``g_gamma_h = −s_h · (1 − l/(L−1) + 1e-5)``.  With L = 1 the factor is ``1 + 1e-5``.
  - ``"fla_linear"`` (FLA's ``chunk_lightning_attn``): ``g_gamma_h = −(8/H)(1 − l/L)·h``;
    head 0 never decays.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from ops.simple_gla.chunk import chunk_simple_gla
from ops.simple_gla.recurrent import recurrent_simple_gla

LIGHTNING_DECAYS = ("alibi_slopes", "fla_linear")


def _check_heads(num_heads) -> None:
    if not isinstance(num_heads, (int, np.integer)) or num_heads < 1:
        raise ValueError(f"num_heads must be a positive int, got {num_heads!r}")


def retnet_g_gamma(num_heads: int) -> jnp.ndarray:
    """RetNet's per-head log decay ``log(1 − 2^{−5−h})``, h = 0..H−1, float32 ``[H]``."""
    _check_heads(num_heads)
    h = np.arange(num_heads, dtype=np.float64)
    return jnp.asarray(np.log1p(-(2.0 ** (-5.0 - h))), jnp.float32)


def alibi_slopes(num_heads: int) -> np.ndarray:
    """ALiBi slopes as in the ALiBi / Lightning Attention repositories (float64 ``[H]``)."""
    _check_heads(num_heads)

    def power_of_two(n):
        return [2.0 ** (-8.0 * (i + 1) / n) for i in range(n)]

    if math.log2(num_heads).is_integer():
        return np.asarray(power_of_two(num_heads))
    p = 2 ** math.floor(math.log2(num_heads))
    extra = power_of_two(2 * p)[0::2][: num_heads - p]
    return np.asarray(power_of_two(p) + extra)


def lightning_g_gamma(num_heads: int, layer_idx: int, num_layers: int,
                      decay: str = "alibi_slopes") -> jnp.ndarray:
    """Lightning Attention's per-head log decay for layer ``layer_idx`` of ``num_layers``."""
    _check_heads(num_heads)
    if not isinstance(num_layers, (int, np.integer)) or num_layers < 1:
        raise ValueError(f"num_layers must be a positive int, got {num_layers!r}")
    if not isinstance(layer_idx, (int, np.integer)) or not 0 <= layer_idx < num_layers:
        raise ValueError(f"layer_idx must be an int in [0, {num_layers}), got {layer_idx!r}")
    if decay == "alibi_slopes":
        frac = 0.0 if num_layers == 1 else layer_idx / (num_layers - 1)
        g = -alibi_slopes(num_heads) * (1.0 - frac + 1e-5)
    elif decay == "fla_linear":
        g = -(8.0 / num_heads) * (1.0 - layer_idx / num_layers) * np.arange(num_heads, dtype=np.float64)
    else:
        raise ValueError(f"decay must be one of {LIGHTNING_DECAYS}, got {decay!r}")
    return jnp.asarray(g, jnp.float32)


def chunk_retention(q, k, v, scale=None, initial_state=None, output_final_state=False,
                    cu_seqlens=None, *, chunk_size=64):
    """RetNet retention: :func:`chunk_simple_gla` with ``g_gamma = retnet_g_gamma(H)``."""
    return chunk_simple_gla(q, k, v, g_gamma=retnet_g_gamma(q.shape[2]), scale=scale,
                            initial_state=initial_state, output_final_state=output_final_state,
                            cu_seqlens=cu_seqlens, chunk_size=chunk_size)


def recurrent_retention(q, k, v, scale=None, initial_state=None, output_final_state=False,
                        cu_seqlens=None):
    """Token-by-token RetNet retention (decoding)."""
    return recurrent_simple_gla(q, k, v, g_gamma=retnet_g_gamma(q.shape[2]), scale=scale,
                                initial_state=initial_state,
                                output_final_state=output_final_state, cu_seqlens=cu_seqlens)


def chunk_lightning_attn(q, k, v, layer_idx, num_layers, scale=None, initial_state=None,
                         output_final_state=False, cu_seqlens=None, *, decay="alibi_slopes",
                         chunk_size=64):
    """Lightning Attention: :func:`chunk_simple_gla` with :func:`lightning_g_gamma`."""
    g_gamma = lightning_g_gamma(q.shape[2], layer_idx, num_layers, decay)
    return chunk_simple_gla(q, k, v, g_gamma=g_gamma, scale=scale, initial_state=initial_state,
                            output_final_state=output_final_state, cu_seqlens=cu_seqlens,
                            chunk_size=chunk_size)


def recurrent_lightning_attn(q, k, v, layer_idx, num_layers, scale=None, initial_state=None,
                             output_final_state=False, cu_seqlens=None, *, decay="alibi_slopes"):
    """Token-by-token Lightning Attention (decoding)."""
    g_gamma = lightning_g_gamma(q.shape[2], layer_idx, num_layers, decay)
    return recurrent_simple_gla(q, k, v, g_gamma=g_gamma, scale=scale,
                                initial_state=initial_state,
                                output_final_state=output_final_state, cu_seqlens=cu_seqlens)
