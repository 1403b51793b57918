"""The token-by-token form of every family: one ``lax.scan`` step per token, for decoding.

Per head, with the state ``S [K, V]`` and the decays of :class:`~.prepare.Inputs` (each absent
one is 1):

    S <- exp(g_t) * Diag(exp(gk_t)) S Diag(exp(gv_t))         decay
    S <- S + k_t v_tᵀ                                           diagonal families (beta is None)
    S <- S + beta_t k_t (v_t - Sᵀ k_t)ᵀ                         delta rules
    o_t = Sᵀ q_t                                                (q already scaled)

A one-token call that carries the state is exactly one step of the full sequence.  The backward
pass of a ``lax.scan`` keeps one state per token (memory ``T·H·K·V``): train with the chunk forms.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from .layout import token_segments
from .precision import einsum
from .prepare import Inputs
from .scan import scan_tokens

Array = jax.Array


def _step(S, x):
    q, k, v, g, gk, gv, beta = x                                  # [R, H, ...] each (or None)
    if g is not None:
        S = S * jnp.exp(g)[..., None, None]
    if gk is not None:
        S = S * jnp.exp(gk)[..., :, None]
    if gv is not None:
        S = S * jnp.exp(gv)[..., None, :]
    if beta is None:
        S = S + k[..., :, None] * v[..., None, :]
    else:
        error = v - einsum("rhk,rhkv->rhv", k, S)
        S = S + k[..., :, None] * (beta[..., None] * error)[..., None, :]
    return S, einsum("rhk,rhkv->rhv", q, S)


def fused_recurrent(x: Inputs, *, reverse: bool = False) -> tuple[Array, Array]:
    """Runs :class:`Inputs` token by token; returns ``(o [B, T, HV, V], final [N, HV, K, V])`` float32."""
    return _fused_recurrent((x.q, x.k, x.v, x.g, x.gk, x.gv, x.beta), x.initial_state, x.cu_seqlens, reverse)


@functools.partial(jax.jit, static_argnums=(3,))               # one compilation when called outside jit
def _fused_recurrent(xs, h0, cu_seqlens, reverse):
    B, T, HV, K = xs[1].shape
    segments = token_segments(B, T, cu_seqlens)
    return scan_tokens(_step, segments, xs, h0, (HV, K, xs[2].shape[-1]), reverse=reverse)
