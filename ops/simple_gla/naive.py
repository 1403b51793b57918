"""The float32 oracle of simple GLA (a scalar log decay per head): the recurrence, token by token."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ..common import checks


def naive_simple_gla(q, k, v, g=None, g_gamma=None, scale=None, initial_state=None, output_final_state=False,
                     state_v_first=False, cu_seqlens=None):
    """``S_t = exp(g_t) S_{t-1} + k_t v_tᵀ``, ``o_t = S_tᵀ (s q_t)``, one sequence at a time, in float32.

    Same arguments and returns as :func:`~lolax.ops.simple_gla.chunk_simple_gla`; ``cu_seqlens``
    must be concrete (sequences are looped over in Python).

    >>> import jax.numpy as jnp
    >>> q = k = v = jnp.ones((1, 3, 1, 1))
    >>> o, _ = naive_simple_gla(q, k, v, g_gamma=jnp.log(jnp.array([0.5])), scale=1.0)
    >>> o[0, :, 0, 0]
    Array([1.  , 1.5 , 1.75], dtype=float32)
    """
    B, T, H, K, V = checks.check_qkv(q, k, v)
    N = checks.check_cu_seqlens(cu_seqlens, B, T)
    checks.check_bool("output_final_state", output_final_state)
    v_first = checks.check_bool("state_v_first", state_v_first)
    if g is not None and g_gamma is not None:
        raise ValueError("pass at most one of g [B, T, H] and g_gamma [H], got both")
    if g is not None:
        checks.check_shape("g", g, (B, T, H), "[B, T, H]")
        checks.check_log_decay("g", g)
        log_decay = jnp.asarray(g, jnp.float32)
    elif g_gamma is not None:
        checks.check_shape("g_gamma", g_gamma, (H,), "[H]")
        checks.check_log_decay("g_gamma", g_gamma)
        log_decay = jnp.broadcast_to(jnp.asarray(g_gamma, jnp.float32), (B, T, H))
    else:
        log_decay = jnp.zeros((B, T, H), jnp.float32)
    S0 = checks.initial_state_kv(initial_state, N, H, K, V, v_first)
    S0 = jnp.zeros((N, H, K, V), jnp.float32) if S0 is None else S0
    scale = checks.resolve_scale(scale, K)
    out_dtype = v.dtype
    q, k, v = (jnp.asarray(x, jnp.float32) for x in (q, k, v))

    def step(S, x):                                   # S [H, K, V]
        q_t, k_t, v_t, g_t = x                        # [H, K], [H, K], [H, V], [H]
        S = jnp.exp(g_t)[:, None, None] * S + k_t[:, :, None] * v_t[:, None, :]
        return S, jnp.sum(S * (scale * q_t)[:, :, None], axis=1)

    def run(q, k, v, g, S):                           # one sequence: [T, H, ...]
        return jax.lax.scan(step, S, (q, k, v, g))

    if cu_seqlens is None:
        S, o = jax.vmap(run)(q, k, v, log_decay, S0)
    else:
        parts = [run(q[0, a:e], k[0, a:e], v[0, a:e], log_decay[0, a:e], S0[n])
                 for n, (_, a, e) in enumerate(checks.sequence_spans(cu_seqlens, B, T))]
        S, o = jnp.stack([s for s, _ in parts]), jnp.concatenate([o for _, o in parts])[None]
    final = (jnp.swapaxes(S, -1, -2) if v_first else S) if output_final_state else None
    return o.astype(out_dtype), final
