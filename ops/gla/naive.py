"""The float32 oracle of GLA (a log decay per key dimension): the recurrence, token by token."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ..common import checks


def naive_gla(q, k, v, g, scale=None, initial_state=None, output_final_state=False, state_v_first=False,
              cu_seqlens=None, *, gv=None):
    """``S_t = Diag(exp(g_t)) S_{t-1} Diag(exp(gv_t)) + k_t v_tᵀ``, ``o_t = S_tᵀ (s q_t)``, one
    sequence at a time, in float32.

    Same arguments and returns as :func:`~lolax.ops.gla.chunk_gla`, plus ``gv [B, T, H, V]``, a
    log decay per value dimension (the oracle of ``fused_recurrent_gla``'s ``gv``);
    ``cu_seqlens`` must be concrete.

    >>> import jax.numpy as jnp
    >>> q = k = v = jnp.ones((1, 2, 1, 2))
    >>> g = jnp.log(jnp.array([1.0, 0.5])) * jnp.ones((1, 2, 1, 2))
    >>> o, _ = naive_gla(q, k, v, g, scale=1.0)
    >>> o[0, :, 0, 0]
    Array([2. , 3.5], dtype=float32)
    """
    B, T, H, K, V = checks.check_qkv(q, k, v)
    N = checks.check_cu_seqlens(cu_seqlens, B, T)
    checks.check_bool("output_final_state", output_final_state)
    v_first = checks.check_bool("state_v_first", state_v_first)
    checks.check_shape("g", g, (B, T, H, K), "[B, T, H, K]")
    checks.check_log_decay("g", g)
    gk = jnp.asarray(g, jnp.float32)
    gv_ = jnp.zeros((B, T, H, V), jnp.float32)
    if gv is not None:
        checks.check_shape("gv", gv, (B, T, H, V), "[B, T, H, V]")
        checks.check_log_decay("gv", gv)
        gv_ = jnp.asarray(gv, jnp.float32)
    S0 = checks.initial_state_kv(initial_state, N, H, K, V, v_first)
    S0 = jnp.zeros((N, H, K, V), jnp.float32) if S0 is None else S0
    scale = checks.resolve_scale(scale, K)
    out_dtype = v.dtype
    q, k, v = (jnp.asarray(x, jnp.float32) for x in (q, k, v))

    def step(S, x):                                   # S [H, K, V]
        q_t, k_t, v_t, gk_t, gv_t = x                 # [H, K], [H, K], [H, V], [H, K], [H, V]
        S = jnp.exp(gk_t)[:, :, None] * S * jnp.exp(gv_t)[:, None, :] + k_t[:, :, None] * v_t[:, None, :]
        return S, jnp.sum(S * (scale * q_t)[:, :, None], axis=1)

    def run(q, k, v, gk, gv, S):                      # one sequence: [T, H, ...]
        return jax.lax.scan(step, S, (q, k, v, gk, gv))

    if cu_seqlens is None:
        S, o = jax.vmap(run)(q, k, v, gk, gv_, S0)
    else:
        parts = [run(q[0, a:e], k[0, a:e], v[0, a:e], gk[0, a:e], gv_[0, a:e], S0[n])
                 for n, (_, a, e) in enumerate(checks.sequence_spans(cu_seqlens, B, T))]
        S, o = jnp.stack([s for s, _ in parts]), jnp.concatenate([o for _, o in parts])[None]
    final = (jnp.swapaxes(S, -1, -2) if v_first else S) if output_final_state else None
    return o.astype(out_dtype), final
