"""Normalised linear attention as one more value column.

With ``normalize=True`` the output is ``o_t = S_tᵀ (s q_t) / (s q_t · z_t + 1e-10)`` with the
running key sum ``z_t = z_0 + Σ_{u<=t} k_u``.  ``z`` is exactly what a value column of ones
accumulates, so the chunk and recurrent forms run on ``[v, 1]`` with the state ``[S, z]`` of
``K × (V + 1)``, and the extra output column is the denominator.  As in flash-linear-attention the
state is then the pair ``(S [N, H, K, V], z [N, 1, H, K])``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ..common import checks
from ..common.layout import token_segments
from ..common.prepare import Inputs, prepare

EPS = 1e-10


def plain_inputs(q, k, v, scale, initial_state, output_final_state, normalize, cu_seqlens):
    """``(x, z0)``: the prepared inputs without the ones column, and the initial key sum
    ``[N, H, K]`` (None when absent or when not normalising)."""
    normalize = checks.check_bool("normalize", normalize)
    S0, z0 = initial_state if normalize and isinstance(initial_state, tuple) else (initial_state, None)
    x = prepare(q, k, v, scale=scale, initial_state=S0, output_final_state=output_final_state,
                cu_seqlens=cu_seqlens)
    if z0 is not None:
        N, H, K = x.num_seqs, x.k.shape[2], x.k.shape[3]
        checks.check_state("initial_state[1]", z0, (N, 1, H, K), "[N, 1, H, K] (the key sum z)")
        z0 = z0[:, 0].astype(jnp.float32)
    return x, z0


def augment(x: Inputs, z0) -> Inputs:
    """``x`` with the value column of ones and the state ``[S, z]``."""
    B, T, H, K = x.k.shape
    N, V = x.num_seqs, x.v.shape[-1]
    v_aug = jnp.concatenate([x.v, jnp.ones((B, T, H, 1), jnp.float32)], -1)
    h0 = None
    if x.initial_state is not None or z0 is not None:
        S = jnp.zeros((N, H, K, V), jnp.float32) if x.initial_state is None else x.initial_state
        z = jnp.zeros((N, H, K), jnp.float32) if z0 is None else z0
        h0 = jnp.concatenate([S, z[..., None]], -1)
    return x._replace(v=v_aug, initial_state=h0)


def normalized_inputs(q, k, v, scale, initial_state, output_final_state, normalize, cu_seqlens) -> Inputs:
    """:func:`~..common.prepare.prepare` for linear attention, with ``[v, 1]`` and ``[S, z]`` when normalising."""
    x, z0 = plain_inputs(q, k, v, scale, initial_state, output_final_state, normalize, cu_seqlens)
    return augment(x, z0) if normalize else x


def key_sums(x: Inputs, z0):
    """``(z_t [B, T, H, K], z_final [N, H, K])``: the running key sum of every token's sequence
    (from ``z0``) and its value after each sequence's last token, by a segmented scan."""
    B, T, H, K = x.k.shape
    seg = token_segments(B, T, x.cu_seqlens)
    start = seg.start[..., None, None]

    def combine(a, b):
        fa, va = a
        fb, vb = b
        return fa | fb, jnp.where(fb, vb, va + vb)

    _, z = jax.lax.associative_scan(combine, (jnp.broadcast_to(start, x.k.shape), x.k), axis=1)
    z0 = jnp.zeros((x.num_seqs, H, K), jnp.float32) if z0 is None else z0
    z = z + z0[seg.seq]
    target = jnp.where(seg.end, seg.seq, x.num_seqs).reshape(-1)
    return z, z0.at[target].set(z.reshape(-1, H, K), mode="drop")


def normalized_outputs(x: Inputs, o, final, normalize: bool):
    """Splits ``[o, denominator]`` and ``[S, z]`` back apart when normalising."""
    if normalize:
        V = o.shape[-1] - 1
        o = o[..., :V] / (o[..., V:] + EPS)
        final = (final[..., :V], final[..., V][:, None])
    return o.astype(x.out_dtype), (final if x.output_final_state else None)
