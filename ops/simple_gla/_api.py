"""Argument handling shared by the simple_gla entry points."""

from __future__ import annotations

import jax.numpy as jnp

from ops import _common as cm
from ops.simple_gla import _core


def resolve_gate(g, g_gamma, B, T, H):
    """Checks that exactly one of ``g [B, T, H]`` / ``g_gamma [H]`` is given; returns ``[B, T, H]``."""
    if (g is None) == (g_gamma is None):
        raise ValueError("simple_gla needs exactly one of g [B, T, H] (per-token log decay) "
                         "or g_gamma [H] (constant per-head log decay); got "
                         + ("both" if g is not None else "neither"))
    if g is not None:
        cm.check_shape("g", g, (B, T, H), "[B, T, H]")
        return g
    cm.check_shape("g_gamma", g_gamma, (H,), "[H]")
    return jnp.broadcast_to(jnp.asarray(g_gamma, jnp.float32)[None, None, :], (B, T, H))


def run(core, q, k, v, g, g_gamma, scale, initial_state, output_final_state, cu_seqlens):
    """``core(q, k, v, g [B,T,H], scale, h0, cu_seqlens) -> (o f32, final f32)``."""
    B, T, H, K, V, N, scale = _core.check_common(q, k, v, initial_state, cu_seqlens, scale)
    _core.check_bool("output_final_state", output_final_state)
    g = resolve_gate(g, g_gamma, B, T, H)
    o, final = core(q, k, v, g, scale, initial_state, cu_seqlens)
    return o.astype(v.dtype), (final if output_final_state else None)
