"""The float32 oracle of DeltaNet: the delta rule, token by token."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ..common import checks


def naive_delta_rule(q, k, v, beta, scale=None, initial_state=None, output_final_state=False,
                     use_qk_l2norm_in_kernel=False, cu_seqlens=None, *, use_beta_sigmoid_in_kernel=False,
                     allow_neg_eigval=False, state_v_first=False):
    """``S_t = S_{t-1} + β_t k_t (v_t - S_{t-1}ᵀ k_t)ᵀ``, ``o_t = S_tᵀ (s q_t)``, one sequence at a
    time, in float32.

    Same arguments and returns as :func:`~lolax.ops.delta_rule.chunk_delta_rule`; ``cu_seqlens``
    must be concrete (sequences are looped over in Python).

    >>> import jax.numpy as jnp
    >>> q = k = jnp.ones((1, 2, 1, 1)); v = jnp.array([2.0, 4.0]).reshape(1, 2, 1, 1)
    >>> o, _ = naive_delta_rule(q, k, v, 0.5 * jnp.ones((1, 2, 1)), scale=1.0)
    >>> o[0, :, 0, 0]
    Array([1. , 2.5], dtype=float32)
    """
    B, T, H, K, V = checks.check_qkv(q, k, v)
    N = checks.check_cu_seqlens(cu_seqlens, B, T)
    checks.check_bool("output_final_state", output_final_state)
    v_first = checks.check_bool("state_v_first", state_v_first)
    l2 = checks.check_bool("use_qk_l2norm_in_kernel", use_qk_l2norm_in_kernel)
    logits = checks.check_bool("use_beta_sigmoid_in_kernel", use_beta_sigmoid_in_kernel)
    top = 2.0 if checks.check_bool("allow_neg_eigval", allow_neg_eigval) else 1.0
    checks.check_shape("beta", beta, (B, T, H), "[B, T, H]")
    S0 = checks.initial_state_kv(initial_state, N, H, K, V, v_first)
    S0 = jnp.zeros((N, H, K, V), jnp.float32) if S0 is None else S0
    scale = checks.resolve_scale(scale, K)
    out_dtype = v.dtype
    q, k, v, beta = (jnp.asarray(x, jnp.float32) for x in (q, k, v, beta))
    if logits:
        beta = top * jax.nn.sigmoid(beta)
    else:
        checks.check_range("beta", beta, 0.0, top, f"in [0, {top:g}]")
    if l2:
        q = q / jnp.sqrt(jnp.sum(q * q, axis=-1, keepdims=True) + 1e-6)
        k = k / jnp.sqrt(jnp.sum(k * k, axis=-1, keepdims=True) + 1e-6)

    def step(S, x):                                   # S [H, K, V]
        q_t, k_t, v_t, b_t = x                        # [H, K], [H, K], [H, V], [H]
        prediction = jnp.sum(S * k_t[:, :, None], axis=1)
        S = S + k_t[:, :, None] * (b_t[:, None] * (v_t - prediction))[:, None, :]
        return S, jnp.sum(S * (scale * q_t)[:, :, None], axis=1)

    def run(q, k, v, b, S):                           # one sequence: [T, H, ...]
        return jax.lax.scan(step, S, (q, k, v, b))

    if cu_seqlens is None:
        S, o = jax.vmap(run)(q, k, v, beta, S0)
    else:
        parts = [run(q[0, a:e], k[0, a:e], v[0, a:e], beta[0, a:e], S0[n])
                 for n, (_, a, e) in enumerate(checks.sequence_spans(cu_seqlens, B, T))]
        S, o = jnp.stack([s for s, _ in parts]), jnp.concatenate([o for _, o in parts])[None]
    final = (jnp.swapaxes(S, -1, -2) if v_first else S) if output_final_state else None
    return o.astype(out_dtype), final
