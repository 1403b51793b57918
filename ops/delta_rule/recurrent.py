"""Recurrent delta rule: token-by-token ``lax.scan`` with packing support, for decoding.

A one-token call carrying the state reproduces the full-sequence output::

    o_t, state = recurrent_delta_rule(q[:, t:t+1], k[:, t:t+1], v[:, t:t+1], beta[:, t:t+1],
                                      initial_state=state, output_final_state=True)
"""

from __future__ import annotations

import jax.numpy as jnp

from ops import _common
from ops.delta_rule import _args


def recurrent_core(p: _args.Prepared, cu_seqlens, output_final_state: bool):
    B, T, H, K = p.k.shape
    V = p.v.shape[-1]
    segments = _common.token_segments(B, T, cu_seqlens)
    gated = p.g is not None

    def step(S, x):                                   # S: [R, H, K, V]
        if gated:
            q_t, k_t, v_t, b_t, g_t = x
            S = S * jnp.exp(g_t)[..., None, None]
        else:
            q_t, k_t, v_t, b_t = x
        pred = jnp.einsum("rhk,rhkv->rhv", k_t, S)
        u = b_t[..., None] * (v_t - pred)
        S = S + k_t[..., :, None] * u[..., None, :]
        return S, jnp.einsum("rhk,rhkv->rhv", q_t, S)

    xs = (p.q, p.k, p.v, p.beta) + ((p.g,) if gated else ())
    o, final = _common.scan_tokens(step, segments, xs, p.initial_state, (H, K, V))
    return o.astype(p.out_dtype), (final if output_final_state else None)


def recurrent_delta_rule(q, k, v, beta, scale=None, initial_state=None, output_final_state=False,
                         use_qk_l2norm_in_kernel=False, allow_neg_eigval=False, cu_seqlens=None, *,
                         chunk_size=None, use_qk_l2norm=None):
    """Token-by-token delta rule; same arguments and returns as :func:`chunk_delta_rule`.

    ``chunk_size`` is accepted for signature compatibility and ignored.  Memory of the backward
    pass grows as ``T·H·K·V`` (one state per token); train with ``chunk_delta_rule``.
    """
    p = _args.prepare(q, k, v, None, beta, scale=scale, initial_state=initial_state,
                      use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel, use_qk_l2norm=use_qk_l2norm,
                      allow_neg_eigval=allow_neg_eigval, cu_seqlens=cu_seqlens, gated=False)
    return recurrent_core(p, cu_seqlens, output_final_state)


fused_recurrent_delta_rule = recurrent_delta_rule
