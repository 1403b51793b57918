"""Argument handling shared by the delta-rule families (``delta_rule`` and ``gated_delta_rule``).

Every form (``chunk``, ``recurrent``, ``naive``) goes through :func:`prepare`, so the three agree on
validation, the in-kernel L2 normalisation, the ``allow_neg_eigval`` mapping and grouped values.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ops import _common

L2NORM_EPS = 1e-6


def l2norm(x: jax.Array, eps: float = L2NORM_EPS) -> jax.Array:
    """``x / sqrt(sum(x**2) + eps)`` over the last axis, in float32 (FLA's ``l2norm_fwd``)."""
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + eps)


class Prepared(NamedTuple):
    """Float32 inputs ready for a core: q already scaled, k normalised if asked, heads expanded."""

    q: jax.Array          # [B, T, HV, K] float32, times scale
    k: jax.Array          # [B, T, HV, K] float32
    v: jax.Array          # [B, T, HV, V] float32
    g: jax.Array | None   # [B, T, HV] float32 or None (plain delta rule)
    beta: jax.Array       # [B, T, HV] float32, doubled if allow_neg_eigval
    initial_state: jax.Array | None
    num_seqs: int
    out_dtype: jnp.dtype


def resolve_l2norm_flag(use_qk_l2norm_in_kernel, use_qk_l2norm) -> bool:
    """``use_qk_l2norm`` is an alias of the canonical (FLA) name ``use_qk_l2norm_in_kernel``."""
    if use_qk_l2norm is None:
        flag = use_qk_l2norm_in_kernel
    elif use_qk_l2norm_in_kernel and not use_qk_l2norm:
        raise ValueError("use_qk_l2norm and use_qk_l2norm_in_kernel are aliases; got conflicting values "
                         f"{use_qk_l2norm!r} and {use_qk_l2norm_in_kernel!r}")
    else:
        flag = use_qk_l2norm
    if not isinstance(flag, (bool, np.bool_)):
        raise ValueError(f"use_qk_l2norm_in_kernel must be a bool, got {flag!r}")
    return bool(flag)


def prepare(q, k, v, g, beta, *, scale, initial_state, use_qk_l2norm_in_kernel, use_qk_l2norm,
            allow_neg_eigval, cu_seqlens, gated: bool) -> Prepared:
    """Validates the arguments of a delta-rule op and returns float32 working arrays.

    ``gated=False`` (DeltaNet) requires ``g is None`` and as many value heads as key heads;
    ``gated=True`` (GDN) requires ``g`` and allows ``HV`` value heads, a multiple of ``H``; value head
    ``hv`` then reads key/query head ``hv // (HV // H)`` (FLA's grouped-value convention).
    """
    B, T, H, K, V = _common.check_qkv(q, k, v, allow_grouped_values=gated)
    HV = v.shape[2]
    heads = "[B, T, HV]" if HV != H else "[B, T, H]"
    _common.check_shape("beta", beta, (B, T, HV), heads)
    if gated:
        _common.check_shape("g", g, (B, T, HV), heads)
    n = _common.check_cu_seqlens(cu_seqlens, B, T)
    _common.check_initial_state(initial_state, n, HV, K, V)
    l2 = resolve_l2norm_flag(use_qk_l2norm_in_kernel, use_qk_l2norm)
    if not isinstance(allow_neg_eigval, (bool, np.bool_)):
        raise ValueError(f"allow_neg_eigval must be a bool, got {allow_neg_eigval!r} "
                         "(pass cu_seqlens by keyword)")
    scale = _common.resolve_scale(scale, K)

    qf, kf = q.astype(jnp.float32), k.astype(jnp.float32)
    if l2:
        qf, kf = l2norm(qf), l2norm(kf)
    qf = qf * scale
    if HV != H:
        qf = jnp.repeat(qf, HV // H, axis=2)
        kf = jnp.repeat(kf, HV // H, axis=2)
    betaf = beta.astype(jnp.float32)
    if allow_neg_eigval:
        betaf = 2.0 * betaf
    gf = g.astype(jnp.float32) if gated else None
    return Prepared(qf, kf, v.astype(jnp.float32), gf, betaf, initial_state, n, v.dtype)
