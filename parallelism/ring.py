"""Softmax attention with the sequence sharded over a mesh axis.

Three exchanges, all exact (sharded == unsharded, forward and gradients), all with grouped-query
heads (k/v with ``Hkv`` heads dividing H; query head h reads kv head ``h // (H // Hkv)``) and an
optional sliding window (query i attends keys ``i − window < j <= i``, ``window`` keys including
itself, as ``ops.attention``):

``ring``       Q stays local; the K/V blocks rotate around the axis with ``lax.ppermute`` (W − 1
               hops, or only ``ceil((window − 1) / (T/W))`` hops with a window: a halo).  Each
               hop runs blockwise attention with an online softmax (running max, denominator,
               accumulator) merged by log-sum-exp; causally future blocks are skipped with
               ``lax.cond``.  K/V memory per device O(T/W).
``ulysses``    ``lax.all_to_all`` turns ``[B, T/W, H, D]`` into ``[B, T, H/W, D]`` (heads split,
               sequence gathered), local attention over the whole sequence, all-to-all back.
               H (and Hkv, else K/V heads are repeated) must be divisible by W.
``allgather``  ``lax.all_gather`` of K and V (LASP-2H / MaxText style); local queries attend to all
               keys with the causal offset r·T/W.  K/V memory per device O(T).

The backward pass is autodiff (ppermute transposes to the reverse rotation, all-to-all to the
inverse all-to-all, all-gather to reduce-scatter); each block's scores are recomputed in the
backward (``jax.checkpoint``), so residuals are O(T/W · D) per hop, not O((T/W)²).

Not done: zigzag load balancing of causal ring attention (rank r holding chunks r and 2W−1−r);
without it the last rank does W blocks of work and the first one, which costs time, not bytes.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from .lasp2 import check_sequence_split
from .rules import axes_for, spec_entry

MODES = ("ring", "ulysses", "allgather")
_NEG = -1e30  # finite "minus infinity": a fully masked block gives weight exactly 0, never NaN
_HI = jax.lax.Precision.HIGHEST


def sequence_parallel_attention(q, k, v, *, mesh: jax.sharding.Mesh, axis_name: str = "sequence",
                                mode: str = "ring", window: int | None = None,
                                scale: float | None = None, causal: bool = True):
    """Causal softmax attention on ``q [B, T, H, D]``, ``k, v [B, T, Hkv, D(v)]``, T sharded.

    Args:
      mesh, axis_name: the mesh and its sequence axis (W devices; W must divide T).
      mode: ``'ring'`` | ``'ulysses'`` | ``'allgather'`` (see the module docstring).
      window: sliding window in keys (``i − window < j <= i``); None for full causal attention.
      scale: score scale; None means ``D ** -0.5``.
      causal: False gives bidirectional attention (window must then be None).

    Returns:
      ``o [B, T, H, Dv]`` in q's dtype, sharded like q.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"q, k, v must have rank 4 [B, T, H, D]; got {q.shape}, {k.shape}, {v.shape}")
    B, T, H, D = q.shape
    Hkv = k.shape[2]
    if k.shape[:2] != (B, T) or v.shape[:3] != k.shape[:3] or k.shape[3] != D or H % Hkv:
        raise ValueError(f"expected q [B, T, H, D], k [B, T, Hkv, D], v [B, T, Hkv, Dv] with Hkv "
                         f"dividing H; got {q.shape}, {k.shape}, {v.shape}")
    if window is not None and (not isinstance(window, int) or window < 1):
        raise ValueError(f"window must be a positive int or None, got {window!r}")
    if window is not None and not causal:
        raise ValueError("a sliding window needs causal=True")
    Tl = check_sequence_split(T, mesh, axis_name)
    W = mesh.shape[axis_name]
    scale = D ** -0.5 if scale is None else scale
    if mode == "ulysses" and H % W:
        raise ValueError(f"ulysses attention splits the {H} query heads over the {W} devices of axis "
                         f"{axis_name!r}: H must be divisible by {W} (use mode='ring' or 'allgather')")

    bax = axes_for(mesh, "batch", B, (axis_name,))
    hax = () if mode == "ulysses" else axes_for(mesh, "heads", Hkv, (axis_name,) + bax)
    if mode == "ulysses" and Hkv % W:                       # GQA with too few kv heads: repeat them
        k = jnp.repeat(k, H // Hkv, axis=2)
        v = jnp.repeat(v, H // Hkv, axis=2)
    spec = P(spec_entry(bax), axis_name, spec_entry(hax), None)
    body = functools.partial({"ring": _ring, "ulysses": _ulysses, "allgather": _allgather}[mode],
                             axis=axis_name, W=W, Tl=Tl, scale=scale, causal=causal, window=window)
    fn = jax.shard_map(body, mesh=mesh, in_specs=(spec, spec, spec), out_specs=spec, check_vma=True)
    return fn(q, k, v)


# ----------------------------------------------------------------------------------------------
# Blockwise attention with an online softmax
# ----------------------------------------------------------------------------------------------

def _group(q, hkv):
    B, T, H, D = q.shape
    return q.astype(jnp.float32).reshape(B, T, hkv, H // hkv, D)


_Q_BLOCK = 512  # queries per score tile: scores live as [.., 512, Tk] tiles, not [.., Tq, Tk]


@functools.partial(jax.checkpoint, static_argnums=(5, 6))
def _block(qg, k, v, qpos, kpos, causal, window):
    """Partial softmax of grouped queries ``qg [B,Tq,Hkv,G,D]`` (scaled) over one key block.

    Returns ``(m [B,Hkv,G,Tq], l [B,Hkv,G,Tq], acc [B,Hkv,G,Tq,Dv])``.  Long query blocks are
    processed in tiles of ``_Q_BLOCK`` queries (each tile rematerialised in the backward), so the
    score memory is O(_Q_BLOCK · Tk) instead of O(Tq · Tk)."""
    Tq = qg.shape[1]
    if Tq <= _Q_BLOCK or Tq % _Q_BLOCK:
        return _tile(qg, k, v, qpos, kpos, causal, window)
    n = Tq // _Q_BLOCK
    qs = jnp.moveaxis(qg.reshape((qg.shape[0], n, _Q_BLOCK) + qg.shape[2:]), 1, 0)
    tile = jax.checkpoint(lambda a: _tile(a[0], k, v, a[1], kpos, causal, window))
    m, l, acc = jax.lax.map(tile, (qs, qpos.reshape(n, _Q_BLOCK)))      # [n, B, Hkv, G, QB, ...]
    join = lambda x: jnp.moveaxis(x, 0, 3).reshape(x.shape[1:4] + (Tq,) + x.shape[5:])
    return join(m), join(l), join(acc)


def _tile(qg, k, v, qpos, kpos, causal, window):
    s = jnp.einsum("bqhgd,bkhd->bhgqk", qg, k.astype(jnp.float32), precision=_HI)
    mask = jnp.ones((qpos.shape[0], kpos.shape[0]), bool)
    if causal:
        mask = qpos[:, None] >= kpos[None, :]
    if window is not None:
        mask = mask & (qpos[:, None] - kpos[None, :] < window)
    s = jnp.where(mask, s, _NEG)
    m = jnp.max(s, axis=-1)
    p = jnp.where(mask, jnp.exp(s - m[..., None]), 0.0)
    acc = jnp.einsum("bhgqk,bkhd->bhgqd", p, v.astype(jnp.float32), precision=_HI)
    return m, jnp.sum(p, axis=-1), acc


def _merge(a, b):
    m = jnp.maximum(a[0], b[0])
    ca, cb = jnp.exp(a[0] - m), jnp.exp(b[0] - m)
    return m, a[1] * ca + b[1] * cb, a[2] * ca[..., None] + b[2] * cb[..., None]


def _finish(part, dtype):
    m, l, acc = part
    o = acc / jnp.where(l > 0, l, 1.0)[..., None]               # [B,Hkv,G,Tq,Dv]
    B, Hkv, G, Tq, Dv = o.shape
    return jnp.transpose(o, (0, 3, 1, 2, 4)).reshape(B, Tq, Hkv * G, Dv).astype(dtype)


def _needed(q_lo, q_hi, k_lo, k_hi, causal, window):
    """Whether keys [k_lo, k_hi] can be seen by any query in [q_lo, q_hi] (inclusive bounds)."""
    ok = jnp.asarray(True)
    if causal:
        ok = ok & (k_lo <= q_hi)
    if window is not None:
        ok = ok & (q_lo - k_hi < window)
    return ok


def _empty_like(part):
    m, l, acc = part
    return jnp.full_like(m, _NEG), jnp.zeros_like(l), jnp.zeros_like(acc)


def _attend(part, qg, k, v, qpos, kpos, causal, window):
    """Merges one key block into ``part``, skipping it (``lax.cond``) when fully masked."""
    need = _needed(qpos[0], qpos[-1], kpos[0], kpos[-1], causal, window)
    new = jax.lax.cond(need, lambda: _block(qg, k, v, qpos, kpos, causal, window),
                       lambda: _empty_like(part))
    return _merge(part, new)


def _scan_keys(qg, qpos, k, v, block, causal, window, dtype):
    """Attention of ``qg`` over all of ``k, v [B, Tk, ...]`` in key blocks of ``block``."""
    Tk = k.shape[1]
    nb = Tk // block
    kb = jnp.moveaxis(k.reshape((k.shape[0], nb, block) + k.shape[2:]), 1, 0)
    vb = jnp.moveaxis(v.reshape((v.shape[0], nb, block) + v.shape[2:]), 1, 0)
    first = _block(qg, kb[0], vb[0], qpos, jnp.arange(block), causal, window)

    def body(part, x):
        j, kj, vj = x
        return _attend(part, qg, kj, vj, qpos, j * block + jnp.arange(block), causal, window), None

    part, _ = jax.lax.scan(body, first, (jnp.arange(1, nb), kb[1:], vb[1:]))
    return _finish(part, dtype)


# ----------------------------------------------------------------------------------------------
# The three exchanges (bodies of shard_map; arrays are the local blocks)
# ----------------------------------------------------------------------------------------------

def _ring(q, k, v, *, axis, W, Tl, scale, causal, window):
    r = jax.lax.axis_index(axis)
    qg = _group(q, k.shape[2]) * scale
    qpos = r * Tl + jnp.arange(Tl)
    part = _block(qg, k, v, qpos, qpos, causal, window)           # own (diagonal) block first
    hops = W - 1
    if window is not None:
        hops = min(hops, -(-(window - 1) // Tl))                  # halo: only blocks within reach
    perm = [(i, (i + 1) % W) for i in range(W)]

    def body(carry, s):
        part, kb, vb = carry
        kb = jax.lax.ppermute(kb, axis, perm)
        vb = jax.lax.ppermute(vb, axis, perm)
        src = (r - s) % W                                          # whose block arrived
        kpos = src * Tl + jnp.arange(Tl)
        if causal:
            part = _attend(part, qg, kb, vb, qpos, kpos, causal, window)
        else:
            part = _merge(part, _block(qg, kb, vb, qpos, kpos, causal, window))
        return (part, kb, vb), None

    if hops:
        (part, _, _), _ = jax.lax.scan(body, (part, k, v), jnp.arange(1, hops + 1))
    return _finish(part, q.dtype)


def _allgather(q, k, v, *, axis, W, Tl, scale, causal, window):
    r = jax.lax.axis_index(axis)
    kf = jax.lax.all_gather(k, axis, axis=1, tiled=True)           # [B, T, Hkv, D]
    vf = jax.lax.all_gather(v, axis, axis=1, tiled=True)
    qg = _group(q, k.shape[2]) * scale
    return _scan_keys(qg, r * Tl + jnp.arange(Tl), kf, vf, Tl, causal, window, q.dtype)


def _ulysses(q, k, v, *, axis, W, Tl, scale, causal, window):
    to_heads = lambda x: jax.lax.all_to_all(x, axis, split_axis=2, concat_axis=1, tiled=True)
    qh, kh, vh = to_heads(q), to_heads(k), to_heads(v)             # [B, T, H/W, D]
    qg = _group(qh, kh.shape[2]) * scale
    T = qh.shape[1]
    o = _scan_keys(qg, jnp.arange(T), kh, vh, math.gcd(T, Tl), causal, window, q.dtype)
    return jax.lax.all_to_all(o, axis, split_axis=1, concat_axis=2, tiled=True)
