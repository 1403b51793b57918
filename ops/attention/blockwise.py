"""Memory-efficient blockwise softmax attention (causal, sliding window, GQA, packed sequences).

Queries and keys are cut into blocks of ``b`` tokens.  The forward pass scans over block *offsets*
``d``: at step d every query block i (all of them at once) meets key block ``i − d`` (causal) or
block ``d`` (non-causal), with an online softmax (running max, denominator, accumulator).  A
sliding window of w keys needs only ``ceil((w − 1) / b) + 1`` offsets, so its cost is
O(T·(w + b)) instead of O(T²).  A ``custom_vjp`` saves only the inputs, the output and the
log-sum-exp and recomputes the scores block by block in the backward pass (FlashAttention-2
style), so memory stays O(T·b) per head in both passes.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from ..common.precision import einsum

_MASKED = -1e30


def _blocks(x, nb, b):
    """``[B, T, H, D]`` -> ``[B, nb, b, H, D]`` (zero padded)."""
    B, T = x.shape[:2]
    x = jnp.pad(x, ((0, 0), (0, nb * b - T)) + ((0, 0),) * (x.ndim - 2))
    return x.reshape((B, nb, b) + x.shape[2:])


def _step_mask(d, *, nb, b, T, causal, window, seg_q, seg_k):
    """Key block index per query block, clipped, and the ``[B|1, nb, b, b]`` mask for offset d."""
    i = jnp.arange(nb)
    kb = i - d if causal else jnp.full((nb,), d)
    kbc = jnp.clip(kb, 0, nb - 1)
    qpos = i[:, None] * b + jnp.arange(b)[None, :]                     # [nb, b]
    kpos = kbc[:, None] * b + jnp.arange(b)[None, :]                   # [nb, b]
    mask = (kb >= 0)[:, None, None] & (kpos < T)[:, None, :]          # [nb, b, b]
    if causal:
        mask = mask & (kpos[:, None, :] <= qpos[:, :, None])
    if window is not None:
        mask = mask & (kpos[:, None, :] > qpos[:, :, None] - window)
    mask = mask[None]
    if seg_q is not None:                                              # [B, nb, b] each
        sk = jnp.take(seg_k, kbc, axis=1)
        mask = mask & (seg_q[:, :, :, None] == sk[:, :, None, :])
    return kbc, mask


def _num_steps(nb, b, causal, window):
    if not causal:
        return nb
    if window is None:
        return nb
    return min(nb, -(-(window - 1) // b) + 1)


def _scores(qb, kblk, scale):
    # qb [B, nb, b, Hk, G, D], kblk [B, nb, b, Hk, D] -> [B, nb, Hk, G, bq, bk]
    return einsum("bnqhgd,bnkhd->bnhgqk", qb, kblk) * scale


def _forward(q, k, v, seg, *, scale, causal, window, b):
    B, T, H, D = q.shape
    Hk, Dv = k.shape[2], v.shape[3]
    G = H // Hk
    nb = -(-T // b)
    qb = _blocks(q, nb, b).reshape(B, nb, b, Hk, G, D)
    kbk, vbk = _blocks(k, nb, b), _blocks(v, nb, b)
    seg_b = None if seg is None else _blocks(seg[..., None, None], nb, b)[..., 0, 0]
    mask_fn = functools.partial(_step_mask, nb=nb, b=b, T=T, causal=causal, window=window,
                                seg_q=seg_b, seg_k=seg_b)

    def body(carry, d):
        m, l, acc = carry                                              # [B, nb, Hk, G, b](, Dv)
        kbc, mask = mask_fn(d)
        mask = mask[:, :, None, None]                                  # [B|1, nb, 1, 1, b, b]
        s = jnp.where(mask, _scores(qb, kbk[:, kbc], scale), _MASKED)
        m_new = jnp.maximum(m, s.max(-1))
        p = jnp.where(mask, jnp.exp(s - m_new[..., None]), 0.0)
        corr = jnp.exp(m - m_new)
        l = l * corr + p.sum(-1)
        acc = acc * corr[..., None] + einsum("bnhgqk,bnkhd->bnhgqd", p, vbk[:, kbc])
        return (m_new, l, acc), None

    init = (jnp.full((B, nb, Hk, G, b), _MASKED, jnp.float32), jnp.zeros((B, nb, Hk, G, b), jnp.float32),
            jnp.zeros((B, nb, Hk, G, b, Dv), jnp.float32))
    (m, l, acc), _ = jax.lax.scan(body, init, jnp.arange(_num_steps(nb, b, causal, window)))
    # Rows with no key at all (padding past T) give zeros; a NaN anywhere in a row stays NaN.
    empty = l == 0
    o = jnp.where(empty[..., None], 0.0, acc / jnp.where(empty, 1.0, l)[..., None])
    lse = jnp.where(empty, 0.0, m + jnp.log(jnp.where(empty, 1.0, l)))   # [B, nb, Hk, G, b]
    o = jnp.moveaxis(o, 4, 2).reshape(B, nb * b, H, Dv)[:, :T]          # [B, T, H, Dv]
    return o, lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def blockwise_attention(q, k, v, seg, scale, causal, window, b):
    """Float32 blockwise attention.  q ``[B, T, H, D]``; k, v ``[B, T, Hk, D|Dv]`` with H % Hk == 0
    (query head h reads kv head ``h // (H // Hk)``); seg ``[B, T]`` int segment ids or None;
    ``window`` (keys i − w < j <= i) or None; ``b`` the block size.  Returns o ``[B, T, H, Dv]``."""
    return _forward(q, k, v, seg, scale=scale, causal=causal, window=window, b=b)[0]


def _fwd(q, k, v, seg, scale, causal, window, b):
    o, lse = _forward(q, k, v, seg, scale=scale, causal=causal, window=window, b=b)
    return o, (q, k, v, seg, o, lse)


def _bwd(scale, causal, window, b, res, do):
    q, k, v, seg, o, lse = res
    B, T, H, D = q.shape
    Hk, Dv = k.shape[2], v.shape[3]
    G = H // Hk
    nb = -(-T // b)
    qb = _blocks(q, nb, b).reshape(B, nb, b, Hk, G, D)
    dob = _blocks(do, nb, b).reshape(B, nb, b, Hk, G, Dv)
    ob = _blocks(o, nb, b).reshape(B, nb, b, Hk, G, Dv)
    delta = jnp.moveaxis(jnp.sum(dob * ob, -1), 2, -1)                  # [B, nb, Hk, G, b]
    kbk, vbk = _blocks(k, nb, b), _blocks(v, nb, b)
    seg_b = None if seg is None else _blocks(seg[..., None, None], nb, b)[..., 0, 0]
    mask_fn = functools.partial(_step_mask, nb=nb, b=b, T=T, causal=causal, window=window,
                                seg_q=seg_b, seg_k=seg_b)

    def body(carry, d):
        dq, dk, dv = carry
        kbc, mask = mask_fn(d)
        mask = mask[:, :, None, None]
        kblk, vblk = kbk[:, kbc], vbk[:, kbc]
        s = _scores(qb, kblk, scale)
        p = jnp.where(mask, jnp.exp(jnp.where(mask, s, 0.0) - lse[..., None]), 0.0)
        dv_blk = einsum("bnhgqk,bnqhgd->bnkhd", p, dob)
        dp = einsum("bnqhgd,bnkhd->bnhgqk", dob, vblk)
        ds = p * (dp - delta[..., None]) * scale
        dq = dq + einsum("bnhgqk,bnkhd->bnqhgd", ds, kblk)
        dk_blk = einsum("bnhgqk,bnqhgd->bnkhd", ds, qb)
        dk = dk.at[:, kbc].add(dk_blk)                                  # masked entries add zero
        dv = dv.at[:, kbc].add(dv_blk)
        return (dq, dk, dv), None

    init = (jnp.zeros_like(qb), jnp.zeros_like(kbk), jnp.zeros_like(vbk))
    (dq, dk, dv), _ = jax.lax.scan(body, init, jnp.arange(_num_steps(nb, b, causal, window)))
    dq = dq.reshape(B, nb * b, H, D)[:, :T]
    dk = dk.reshape(B, nb * b, Hk, D)[:, :T]
    dv = dv.reshape(B, nb * b, Hk, Dv)[:, :T]
    return dq, dk, dv, None


blockwise_attention.defvjp(_fwd, _bwd)
