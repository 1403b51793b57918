"""Published per-head decay schedules, as log decays ``g_gamma [H]`` for simple GLA.

* RetNet: ``γ_h = 1 - 2^(-5-h)``, so ``g_gamma_h = log(1 - 2^(-5-h))``.
* Lightning Attention, two conventions, named in :data:`LIGHTNING_DECAYS`:

  - ``"alibi_slopes"`` (the Lightning Attention-2 release): ALiBi slopes ``s_h`` (for H a power
    of two ``s_h = 2^(-8(h+1)/H)``; otherwise the slopes of the nearest lower power of two P
    followed by every other slope of the 2P set) scaled by ``1 - l/(L-1) + 1e-5`` for layer l of
    L, so deeper layers decay less: ``g_gamma_h = -s_h (1 - l/(L-1) + 1e-5)``;
  - ``"fla_linear"`` (flash-linear-attention's ``chunk_lightning_attn``):
    ``g_gamma_h = -(8/H)(1 - l/L) h``; head 0 never decays.
"""

from __future__ import annotations

import math
from typing import Callable

import jax.numpy as jnp
import numpy as np


def _check_int(name: str, value, lo: int, hi: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < lo or (
            hi is not None and value >= hi):
        span = f"in [{lo}, {hi})" if hi is not None else f">= {lo}"
        raise ValueError(f"{name} must be an int {span}, got {value!r}")


def retnet_g_gamma(num_heads: int) -> jnp.ndarray:
    """RetNet's log decay ``log(1 - 2^(-5-h))`` for h = 0..H-1, float32 ``[H]``.

    >>> retnet_g_gamma(2)
    Array([-0.0317487 , -0.01574836], dtype=float32)
    """
    _check_int("num_heads", num_heads, 1)
    h = np.arange(num_heads, dtype=np.float64)
    return jnp.asarray(np.log1p(-(2.0 ** (-5.0 - h))), jnp.float32)


def alibi_slopes(num_heads: int) -> np.ndarray:
    """ALiBi's per-head slopes (float64 ``[H]``).

    >>> alibi_slopes(4)
    array([0.25      , 0.0625    , 0.015625  , 0.00390625])
    """
    _check_int("num_heads", num_heads, 1)

    def power_of_two(n):
        return [2.0 ** (-8.0 * (i + 1) / n) for i in range(n)]

    if math.log2(num_heads).is_integer():
        return np.asarray(power_of_two(num_heads))
    p = 2 ** math.floor(math.log2(num_heads))
    return np.asarray(power_of_two(p) + power_of_two(2 * p)[0::2][: num_heads - p])


def _alibi_decay(num_heads: int, layer_idx: int, num_layers: int) -> np.ndarray:
    depth = 0.0 if num_layers == 1 else layer_idx / (num_layers - 1)
    return -alibi_slopes(num_heads) * (1.0 - depth + 1e-5)


def _linear_decay(num_heads: int, layer_idx: int, num_layers: int) -> np.ndarray:
    return -(8.0 / num_heads) * (1.0 - layer_idx / num_layers) * np.arange(num_heads, dtype=np.float64) + 0.0


LIGHTNING_DECAYS: dict[str, Callable[[int, int, int], np.ndarray]] = {
    "alibi_slopes": _alibi_decay,
    "fla_linear": _linear_decay,
}
"""Lightning Attention's decay schedules by name: ``(num_heads, layer_idx, num_layers) -> log decay [H]``."""


def lightning_g_gamma(num_heads: int, layer_idx: int, num_layers: int, decay: str) -> jnp.ndarray:
    """Lightning Attention's log decay for layer ``layer_idx`` of ``num_layers``, float32 ``[H]``.

    ``decay`` names the schedule, one of :data:`LIGHTNING_DECAYS`.

    >>> lightning_g_gamma(4, 0, 2, "fla_linear")
    Array([ 0., -2., -4., -6.], dtype=float32)
    """
    _check_int("num_heads", num_heads, 1)
    _check_int("num_layers", num_layers, 1)
    _check_int("layer_idx", layer_idx, 0, num_layers)
    if decay not in LIGHTNING_DECAYS:
        raise ValueError(f"decay must be one of {sorted(LIGHTNING_DECAYS)}, got {decay!r}")
    return jnp.asarray(LIGHTNING_DECAYS[decay](num_heads, layer_idx, num_layers), jnp.float32)
