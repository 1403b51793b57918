"""Argument handling shared by the GLA entry points."""

from __future__ import annotations

from ops import _common as cm
from ops.simple_gla import _core


def run(core, q, k, v, g, scale, initial_state, output_final_state, cu_seqlens):
    """``core(q, k, v, g [B,T,H,K], scale, h0, cu_seqlens) -> (o f32, final f32)``."""
    B, T, H, K, V, N, scale = _core.check_common(q, k, v, initial_state, cu_seqlens, scale)
    _core.check_bool("output_final_state", output_final_state)
    cm.check_shape("g", g, (B, T, H, K), "[B, T, H, K]")
    o, final = core(q, k, v, g, scale, initial_state, cu_seqlens)
    return o.astype(v.dtype), (final if output_final_state else None)
