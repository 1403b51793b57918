"""Naive delta rule: the simplest float32 token-by-token recurrence, the oracle for the other forms.

Packed sequences (``cu_seqlens``) are run one by one in a Python loop, so ``cu_seqlens`` must be
concrete (not traced) here.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from ops.delta_rule import _args


def naive_recurrence(q, k, v, g, beta, h0):
    """One batch of sequences, float32: q (pre-scaled), k ``[B, T, H, K]``, v ``[B, T, H, V]``,
    g (or None), beta ``[B, T, H]``, h0 ``[B, H, K, V]``.  Returns ``(o [B, T, H, V], h_T)``.

    ``S_t = exp(g_t) S_{t-1};  S_t += beta_t k_t (v_t - S_tᵀ k_t)ᵀ;  o_t = S_tᵀ q_t``.
    """
    if g is None:
        g = jnp.zeros(beta.shape, jnp.float32)

    def step(S, x):
        q_t, k_t, v_t, g_t, b_t = x
        S = S * jnp.exp(g_t)[..., None, None]
        pred = jnp.einsum("bhk,bhkv->bhv", k_t, S)
        S = S + jnp.einsum("bhk,bhv->bhkv", k_t, b_t[..., None] * (v_t - pred))
        return S, jnp.einsum("bhk,bhkv->bhv", q_t, S)

    xs = tuple(jnp.moveaxis(a, 1, 0) for a in (q, k, v, g, beta))
    hT, o = jax.lax.scan(step, h0, xs)
    return jnp.moveaxis(o, 0, 1), hT


def naive_core(p: _args.Prepared, cu_seqlens, output_final_state: bool):
    B, T, H, K = p.k.shape
    V = p.v.shape[-1]
    h0 = p.initial_state
    if h0 is None:
        h0 = jnp.zeros((p.num_seqs, H, K, V), jnp.float32)
    if cu_seqlens is None:
        o, hT = naive_recurrence(p.q, p.k, p.v, p.g, p.beta, h0)
    else:
        if isinstance(cu_seqlens, jax.core.Tracer):
            raise ValueError("naive_* ops loop over packed sequences in Python: cu_seqlens must be concrete")
        cu = np.asarray(cu_seqlens)
        outs, finals = [], []
        for n in range(p.num_seqs):
            a, b = int(cu[n]), int(cu[n + 1])
            if a == b:
                finals.append(h0[n])
                continue
            sl = lambda x: None if x is None else x[:, a:b]
            o_n, h_n = naive_recurrence(sl(p.q), sl(p.k), sl(p.v), sl(p.g), sl(p.beta), h0[n][None])
            outs.append(o_n)
            finals.append(h_n[0])
        o = jnp.concatenate(outs, axis=1)
        hT = jnp.stack(finals)
    return o.astype(p.out_dtype), (hT if output_final_state else None)


def naive_delta_rule(q, k, v, beta, scale=None, initial_state=None, output_final_state=False,
                     use_qk_l2norm_in_kernel=False, allow_neg_eigval=False, cu_seqlens=None, *,
                     chunk_size=None, use_qk_l2norm=None):
    """Float32 reference of :func:`ops.delta_rule.chunk_delta_rule` (same arguments and returns).

    ``chunk_size`` is accepted for signature compatibility and ignored.
    """
    p = _args.prepare(q, k, v, None, beta, scale=scale, initial_state=initial_state,
                      use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel, use_qk_l2norm=use_qk_l2norm,
                      allow_neg_eigval=allow_neg_eigval, cu_seqlens=cu_seqlens, gated=False)
    return naive_core(p, cu_seqlens, output_final_state)
