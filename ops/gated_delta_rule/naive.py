"""The float32 oracle of Gated DeltaNet: the gated delta rule, token by token."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ..common import checks


def naive_gated_delta_rule(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False,
                           use_qk_l2norm_in_kernel=False, use_beta_sigmoid_in_kernel=False,
                           allow_neg_eigval=False, state_v_first=False, cu_seqlens=None, *, gk=None, gv=None,
                           use_gate_in_kernel=False, A_log=None, dt_bias=None):
    """``S_t = exp(g_t) (I - β_t k_t k_tᵀ) S_{t-1} + β_t k_t v_tᵀ``, ``o_t = S_tᵀ (s q_t)``, one
    sequence at a time, in float32.

    Same arguments and returns as :func:`~lolax.ops.gated_delta_rule.chunk_gated_delta_rule`; ``g``
    may also be None (no scalar decay), and ``gk [B, T, HV, K]`` / ``gv [B, T, HV, V]`` decay the
    state per key / value dimension first (the oracle of ``fused_recurrent_gated_delta_rule``'s
    ``gk`` and ``gv``).  ``cu_seqlens`` must be concrete.

    >>> import jax.numpy as jnp
    >>> q = k = jnp.ones((1, 2, 1, 1)); v = jnp.array([2.0, 4.0]).reshape(1, 2, 1, 1)
    >>> g = jnp.log(0.5) * jnp.ones((1, 2, 1))
    >>> o, _ = naive_gated_delta_rule(q, k, v, g, jnp.ones((1, 2, 1)), scale=1.0)
    >>> o[0, :, 0, 0]
    Array([2., 4.], dtype=float32)
    """
    B, T, H, K, V = checks.check_qkv(q, k, v, grouped_values=True)
    HV = v.shape[2]
    heads = "[B, T, HV]" if HV != H else "[B, T, H]"
    N = checks.check_cu_seqlens(cu_seqlens, B, T)
    checks.check_bool("output_final_state", output_final_state)
    v_first = checks.check_bool("state_v_first", state_v_first)
    l2 = checks.check_bool("use_qk_l2norm_in_kernel", use_qk_l2norm_in_kernel)
    logits = checks.check_bool("use_beta_sigmoid_in_kernel", use_beta_sigmoid_in_kernel)
    top = 2.0 if checks.check_bool("allow_neg_eigval", allow_neg_eigval) else 1.0
    checks.check_shape("beta", beta, (B, T, HV), heads)
    S0 = checks.initial_state_kv(initial_state, N, HV, K, V, v_first)
    S0 = jnp.zeros((N, HV, K, V), jnp.float32) if S0 is None else S0
    scale = checks.resolve_scale(scale, K)
    out_dtype = v.dtype

    if checks.check_bool("use_gate_in_kernel", use_gate_in_kernel):
        checks.check_shape("g", g, (B, T, HV), heads)
        checks.check_shape("A_log", A_log, (HV,), "[HV]")
        bias = 0.0 if dt_bias is None else jnp.asarray(dt_bias, jnp.float32)
        g = -jnp.exp(jnp.asarray(A_log, jnp.float32)) * jax.nn.softplus(jnp.asarray(g, jnp.float32) + bias)
    decays = []
    for name, x, shape in (("g", g, (B, T, HV)), ("gk", gk, (B, T, HV, K)), ("gv", gv, (B, T, HV, V))):
        if x is None:
            x = jnp.zeros(shape, jnp.float32)
        checks.check_shape(name, x, shape, "[B, T, HV" + ("]" if x.ndim == 3 else ", D]"))
        checks.check_log_decay(name, x)
        decays.append(jnp.asarray(x, jnp.float32))

    q, k, v, beta = (jnp.asarray(x, jnp.float32) for x in (q, k, v, beta))
    if logits:
        beta = top * jax.nn.sigmoid(beta)
    else:
        checks.check_range("beta", beta, 0.0, top, f"in [0, {top:g}]")
    if l2:
        q = q / jnp.sqrt(jnp.sum(q * q, axis=-1, keepdims=True) + 1e-6)
        k = k / jnp.sqrt(jnp.sum(k * k, axis=-1, keepdims=True) + 1e-6)
    q, k = jnp.repeat(q, HV // H, axis=2), jnp.repeat(k, HV // H, axis=2)   # value head hv reads hv // (HV/H)

    def step(S, x):                                   # S [HV, K, V]
        q_t, k_t, v_t, b_t, g_t, gk_t, gv_t = x
        S = jnp.exp(g_t)[:, None, None] * jnp.exp(gk_t)[:, :, None] * S * jnp.exp(gv_t)[:, None, :]
        prediction = jnp.sum(S * k_t[:, :, None], axis=1)
        S = S + k_t[:, :, None] * (b_t[:, None] * (v_t - prediction))[:, None, :]
        return S, jnp.sum(S * (scale * q_t)[:, :, None], axis=1)

    def run(S, *xs):                                  # one sequence: [T, HV, ...]
        return jax.lax.scan(step, S, xs)

    inputs = (q, k, v, beta, *decays)
    if cu_seqlens is None:
        S, o = jax.vmap(run)(S0, *inputs)
    else:
        parts = [run(S0[n], *(x[0, a:e] for x in inputs))
                 for n, (_, a, e) in enumerate(checks.sequence_spans(cu_seqlens, B, T))]
        S, o = jnp.stack([s for s, _ in parts]), jnp.concatenate([o for _, o in parts])[None]
    final = (jnp.swapaxes(S, -1, -2) if v_first else S) if output_final_state else None
    return o.astype(out_dtype), final
