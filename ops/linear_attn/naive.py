"""The float32 oracle of (optionally normalised) linear attention: the recurrence, token by token."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ..common import checks


def naive_linear_attn(q, k, v, scale=None, initial_state=None, output_final_state=False, normalize=True,
                      cu_seqlens=None):
    """``S_t = S_{t-1} + k_t v_tᵀ``, ``o_t = S_tᵀ (s q_t)`` (divided by ``s q_t · z_t + 1e-10``
    with ``z_t = z_{t-1} + k_t`` when ``normalize``), one sequence at a time, in float32.

    Same arguments and returns as :func:`~lolax.ops.linear_attn.chunk_linear_attn`;
    ``cu_seqlens`` must be concrete (sequences are looped over in Python).

    >>> import jax.numpy as jnp
    >>> q = k = v = jnp.ones((1, 3, 1, 2))
    >>> o, _ = naive_linear_attn(q, k, v, scale=1.0, normalize=False)
    >>> o[0, :, 0, 0]
    Array([2., 4., 6.], dtype=float32)
    """
    B, T, H, K, V = checks.check_qkv(q, k, v)
    N = checks.check_cu_seqlens(cu_seqlens, B, T)
    normalize = checks.check_bool("normalize", normalize)
    checks.check_bool("output_final_state", output_final_state)
    S0, z0 = initial_state if isinstance(initial_state, tuple) and normalize else (initial_state, None)
    if S0 is not None:
        checks.check_state("initial_state", S0, (N, H, K, V), "[N, H, K, V]")
    if z0 is not None:
        checks.check_state("initial_state[1]", z0, (N, 1, H, K), "[N, 1, H, K]")
    scale = checks.resolve_scale(scale, K)
    out_dtype = v.dtype
    q, k, v = (jnp.asarray(x, jnp.float32) for x in (q, k, v))

    def step(carry, x):
        S, z = carry                                  # [H, K, V], [H, K]
        q_t, k_t, v_t = x                             # [H, K], [H, K], [H, V]
        S = S + k_t[:, :, None] * v_t[:, None, :]
        z = z + k_t
        o = jnp.sum(S * (scale * q_t)[:, :, None], axis=1)
        if normalize:
            o = o / (jnp.sum(scale * q_t * z, axis=-1, keepdims=True) + 1e-10)
        return (S, z), o

    def run(q, k, v, S, z):                           # one sequence: [T, H, ...]
        return jax.lax.scan(step, (S, z), (q, k, v))

    S0 = jnp.zeros((N, H, K, V), jnp.float32) if S0 is None else S0
    z0 = jnp.zeros((N, H, K), jnp.float32) if z0 is None else z0[:, 0]
    if cu_seqlens is None:
        (S, z), o = jax.vmap(run)(q, k, v, S0, z0)
    else:
        parts = [run(q[0, a:e], k[0, a:e], v[0, a:e], S0[n], z0[n])
                 for n, (_, a, e) in enumerate(checks.sequence_spans(cu_seqlens, B, T))]
        o = jnp.concatenate([o for _, o in parts])[None]
        S, z = (jnp.stack(x) for x in zip(*[c for c, _ in parts]))
    o = o.astype(out_dtype)
    if not output_final_state:
        return o, None
    return o, ((S, z[:, None]) if normalize else S)
