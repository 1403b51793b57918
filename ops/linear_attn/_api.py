"""The one wrapper behind every linear_attn entry point: checks, normalisation, dtypes."""

from __future__ import annotations

import jax.numpy as jnp

from ops import _common as cm
from ops.simple_gla import _core

EPS = 1e-10


def run(core, q, k, v, scale, normalize, initial_state, output_final_state, cu_seqlens,
        initial_normalizer):
    """``core(q, k, v, gk, scale, h0, cu_seqlens) -> (o f32, final f32)`` with gk = None."""
    B, T, H, K, V, N, scale = _core.check_common(q, k, v, initial_state, cu_seqlens, scale)
    _core.check_bool("normalize", normalize)
    _core.check_bool("output_final_state", output_final_state)
    if not normalize:
        if initial_normalizer is not None:
            raise ValueError("initial_normalizer is only meaningful with normalize=True")
        o, final = core(q, k, v, None, scale, initial_state, cu_seqlens)
        return o.astype(v.dtype), (final if output_final_state else None)
    if initial_normalizer is not None:
        cm.check_shape("initial_normalizer", initial_normalizer, (N, H, K), "[N, H, K]")
        if initial_normalizer.dtype != jnp.float32:
            raise ValueError(f"initial_normalizer must be float32, got {initial_normalizer.dtype}")
    # The normaliser z_t = z_0 + sum_{u<=t} k_u is one more value column of ones: the state
    # [K, V + 1] carries (S, z) and the extra output column is the denominator s q_t . z_t.
    v_aug = jnp.concatenate([v.astype(jnp.float32), jnp.ones((B, T, H, 1), jnp.float32)], -1)
    h0 = None
    if initial_state is not None or initial_normalizer is not None:
        S0 = jnp.zeros((N, H, K, V), jnp.float32) if initial_state is None else initial_state
        z0 = jnp.zeros((N, H, K), jnp.float32) if initial_normalizer is None else initial_normalizer
        h0 = jnp.concatenate([S0, z0[..., None]], -1)
    o, final = core(q, k, v_aug, None, scale, h0, cu_seqlens)
    o = o[..., :V] / (o[..., V:] + EPS)
    return o.astype(v.dtype), (final[..., :V] if output_final_state else None)
