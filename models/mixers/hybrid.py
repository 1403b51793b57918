"""Linearised softmax attention: the layers a pretrained Transformer's attention is converted into.

| class | name | output per query | new parameters |
|---|---|---|---|
| :class:`LoLCATsAttention` | ``lolcats`` (O) | window softmax + Hedgehog beyond it | ``q_map k_map window_factor`` |
| :class:`LigerAttention` | ``liger`` (I) | ``0.5 SWA + 0.5 GLA`` (softmax feature maps, key gates) | none |

Both subclass :class:`~.attention.SoftmaxAttention` and keep its ``q_proj``, ``k_proj``,
``v_proj``, ``o_proj`` (with their optional biases), ``q_norm``/``k_norm``, rotary and
grouped-query heads under the same names, so the parameters of a pretrained softmax layer load
into them by path.  The window is ``cfg.window`` keys per query, the query's own included.

Decoding state, of constant size whatever ``max_len``: a ring buffer of ``min(window, max_len)``
rotary keys and values with their timeline slots, plus a linear-attention state (LoLCATs: the
Hedgehog sums ``S [B, H, 2D', d]`` and ``z [B, H, 2D']`` of the keys that have left the window;
Liger: the GLA state ``[B, H, d, d]``).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ...ops import feature_maps as fm
from ...ops.common.precision import einsum
from .. import dispatch
from ..config import ModelConfig
from ..layers import param
from .attention import SoftmaxAttention

F32 = jnp.float32
WINDOW_FACTOR_INIT = -2.197
"""``sigmoid(-2.197) ≈ 0.1``: LoLCATs' initial weight of the windowed softmax terms."""


# ------------------------------------------------------------------------------------------------
# Shared pieces: head repetition, the ring buffer, banded softmax sums, the shift of keys
# ------------------------------------------------------------------------------------------------

def repeat_kv(x: jax.Array, num_heads: int) -> jax.Array:
    """``[..., Hkv, D] -> [..., H, D]``: query head h reads kv head ``h // (H / Hkv)``."""
    return jnp.repeat(x, num_heads // x.shape[-2], axis=-2)


def ring_write(cache: dict, k: jax.Array, v: jax.Array, index) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Writes one token ``k, v [B, 1, Hkv, d]`` into slot ``index % size`` of the ring buffer
    ``cache = {"k", "v": [B, size, Hkv, d], "pos": [B, size]}``; returns ``(k, v, pos)``."""
    size = cache["k"].shape[1]
    slot = index % size
    kc = jax.lax.dynamic_update_slice_in_dim(cache["k"], k.astype(cache["k"].dtype), slot, axis=1)
    vc = jax.lax.dynamic_update_slice_in_dim(cache["v"], v.astype(cache["v"].dtype), slot, axis=1)
    pos = jax.lax.dynamic_update_slice_in_dim(
        cache["pos"], jnp.full((k.shape[0], 1), index, jnp.int32), slot, axis=1)
    return kc, vc, pos


def _masked_exp(s: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(exp(s - m) where mask else 0, m)`` with ``m`` the masked row max (0 for empty rows)."""
    s = jnp.where(mask, s, -jnp.inf)
    m = jnp.max(s, axis=-1)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    return jnp.where(mask, jnp.exp(s - m[..., None]), 0.0), m


def window_softmax_sums(q: jax.Array, k: jax.Array, v: jax.Array, window: int, segment_ids: jax.Array | None = None,
                        valid: jax.Array | None = None,
                        scale: float | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Unnormalised softmax sums over each query's window, blockwise (no ``T x T`` array).

    For query i the window keys are ``i - window < j <= i`` in the same packed segment and not
    padding.  With ``s_ij = scale q_i . k_j`` and ``m_i`` their max, returns float32

    * ``num [B, T, H, dv]``: ``sum_j exp(s_ij - m_i) v_j``,
    * ``den [B, T, H]``: ``sum_j exp(s_ij - m_i)``,
    * ``m [B, T, H]`` (0 and sums 0 for a query with no key).

    Queries are cut into blocks of ``c = min(window, T)`` rows; a block's window lies in its own
    key block and the previous one, so each block scores ``c x 2c`` pairs.

    Args:
      q: ``[B, T, H, d]``; k: ``[B, T, Hkv, d]``; v: ``[B, T, Hkv, dv]`` (Hkv divides H).
      window: keys per query, the query's own included.
      segment_ids: ``[B, T]`` int packed-sequence ids or None.
      valid: ``[B, T]`` bool, False for padding keys, or None.
      scale: None means ``d ** -0.5``.
    """
    B, T, H, d = q.shape
    Hk, dv = k.shape[2], v.shape[-1]
    G = H // Hk
    scale = d ** -0.5 if scale is None else scale
    c = min(window, T)
    n = -(-T // c)
    pad = n * c - T

    def blocks(a):                                  # [B, T, ...] -> [B, n, c, ...]
        a = jnp.pad(a, [(0, 0), (0, pad)] + [(0, 0)] * (a.ndim - 2))
        return a.reshape((a.shape[0], n, c) + a.shape[2:])

    def with_previous(a):                           # [B, n, c, ...] -> [B, n, 2c, ...]
        prev = jnp.pad(a, [(0, 0), (1, 0)] + [(0, 0)] * (a.ndim - 2))[:, :n]
        return jnp.concatenate([prev, a], axis=2)

    tq = np.arange(n * c).reshape(n, c)
    tk = (np.arange(n) * c - c)[:, None] + np.arange(2 * c)[None]
    diff = tq[:, :, None] - tk[:, None, :]
    band = (diff >= 0) & (diff < window) & (tk[:, None, :] >= 0) & (tk[:, None, :] < T)
    mask = jnp.asarray(band)[None]                                       # [1, n, c, 2c]
    if valid is not None:
        mask = mask & with_previous(blocks(jnp.asarray(valid, bool)))[:, :, None, :]
    if segment_ids is not None:
        seg = jnp.asarray(segment_ids, jnp.int32)
        mask = mask & (blocks(seg)[..., :, None] == with_previous(blocks(seg))[..., None, :])

    qb = blocks(q.astype(F32)).reshape(B, n, c, Hk, G, d)
    kb = with_previous(blocks(k.astype(F32)))                            # [B, n, 2c, Hk, d]
    vb = with_previous(blocks(v.astype(F32)))
    s = einsum("bnqhgd,bnkhd->bnhgqk", qb * scale, kb)                   # [B, n, Hk, G, c, 2c]
    p, m = _masked_exp(s, mask[:, :, None, None])
    num = einsum("bnhgqk,bnkhd->bnqhgd", p, vb).reshape(B, n * c, H, dv)[:, :T]

    def per_query(a):                               # [B, n, Hk, G, c] -> [B, T, H]
        return jnp.moveaxis(a, -1, 2).reshape(B, n * c, H)[:, :T]

    return num, per_query(jnp.sum(p, axis=-1)), per_query(m)


def window_softmax_step(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array, mask: jax.Array,
                        scale: float | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
    """:func:`window_softmax_sums` for one decoding query ``q [B, 1, H, d]`` over a cache
    ``[B, S, Hkv, d]`` with ``mask [B, S]`` (True = in the window); returns
    ``(num [B, 1, H, dv], den [B, 1, H], m [B, 1, H])`` float32."""
    B, _, H, d = q.shape
    Hk = k_cache.shape[2]
    scale = d ** -0.5 if scale is None else scale
    qg = q[:, 0].astype(F32).reshape(B, Hk, H // Hk, d)
    s = einsum("bhgd,bshd->bhgs", qg * scale, k_cache.astype(F32))
    p, m = _masked_exp(s, mask[:, None, None, :])
    num = einsum("bhgs,bshd->bhgd", p, v_cache.astype(F32)).reshape(B, 1, H, -1)
    return num, jnp.sum(p, axis=-1).reshape(B, 1, H), m.reshape(B, 1, H)


def shift_later(x: jax.Array, shift: int, segment_ids: jax.Array | None = None) -> jax.Array:
    """``x [B, T, ...]`` moved ``shift`` positions later: ``out_t = x_{t - shift}``, zero where
    ``t - shift`` is before the start of the row or of ``t``'s packed segment."""
    T = x.shape[1]
    if shift >= T:
        return jnp.zeros_like(x)
    out = jnp.pad(x, [(0, 0), (shift, 0)] + [(0, 0)] * (x.ndim - 2))[:, :T]
    if segment_ids is not None:
        seg = jnp.asarray(segment_ids, jnp.int32)
        src = jnp.pad(seg, [(0, 0), (shift, 0)], constant_values=-1)[:, :T]
        same = (src == seg).reshape(seg.shape + (1,) * (x.ndim - 2))
        out = jnp.where(same, out, 0)
    return out


def segment_cumsum(x: jax.Array, segment_ids: jax.Array | None = None) -> jax.Array:
    """Running sum of ``x [B, T, ...]`` over T, restarting at each packed segment (``segment_ids [B, T]``)."""
    if segment_ids is None:
        return jnp.cumsum(x, axis=1)
    seg = jnp.asarray(segment_ids, jnp.int32)
    start = jnp.concatenate([jnp.ones_like(seg[:, :1], bool), seg[:, 1:] != seg[:, :-1]], axis=1)
    start = jnp.broadcast_to(start.reshape(seg.shape + (1,) * (x.ndim - 2)), x.shape)

    def combine(a, b):
        restart_a, sum_a = a
        restart_b, sum_b = b
        return restart_a | restart_b, jnp.where(restart_b, sum_b, sum_a + sum_b)

    return jax.lax.associative_scan(combine, (start, x), axis=1)[1]


def _zero_padding(x: jax.Array, valid: jax.Array | None) -> jax.Array:
    """``x [B, T, ...]`` with the padding tokens (``valid [B, T]`` False) set to 0."""
    if valid is None:
        return x
    return jnp.where(valid.reshape(valid.shape + (1,) * (x.ndim - 2)), x, 0)


# ------------------------------------------------------------------------------------------------
# LoLCATs: windowed softmax + Hedgehog linear attention, one normaliser
# ------------------------------------------------------------------------------------------------

class LoLCATsAttention(SoftmaxAttention):
    """LoLCATs' linearised attention: exact softmax weights on the last ``window`` keys, Hedgehog
    linear-attention weights on the older ones, both under one normaliser.

    With q, k after q/k-norm and rotary, kv heads repeated to the H query heads,
    ``s_ij = q_i . k_j / sqrt(d)``, ``gamma_h = sigmoid(window_factor_h)`` and the per-head
    Hedgehog map ``phi`` (``lolcats`` form, ``2 D'`` features):

    * window keys ``i - w < j <= i``: ``a_ij = gamma_h exp(s_ij - m_i)``, ``m_i`` their max score;
    * older keys ``j <= i - w``: ``b_ij = phi_q(q_i) . phi_k(k_j)``;
    * ``y_i = (sum a_ij v_j + sum b_ij v_j) / (sum a_ij + sum b_ij)``, then ``o_proj``.

    The older-key sums are causal linear attention on keys and values shifted ``w`` positions
    later (``linear_attn`` unnormalised for the numerator, a running sum of the shifted key
    features for the denominator); the window sums are banded blocks
    (:func:`window_softmax_sums`).  Decoding keeps a ring buffer of
    ``min(w, max_len)`` keys and the sums ``S``, ``z`` of the keys that have left it.
    """

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, layer_idx: int = 0):
        super().__init__(cfg, rngs, layer_idx, window=cfg.window)
        h, d = cfg.num_heads, cfg.head_size
        dp = cfg.hedgehog_dim or d
        self.chunk_size = cfg.chunk_size
        bound = math.sqrt(6.0 / d)                  # Kaiming-uniform, untied for q and k
        self.q_map = param(jax.random.uniform(rngs.params(), (h, d, dp), F32, -bound, bound),
                           "heads", "kv", "features")
        self.k_map = param(jax.random.uniform(rngs.params(), (h, d, dp), F32, -bound, bound),
                           "heads", "kv", "features")
        self.window_factor = param(jnp.full((h,), WINDOW_FACTOR_INIT, F32), "heads")

    def feature_map(self, x: jax.Array, which: str) -> jax.Array:
        """Hedgehog features ``[..., H, d] -> [..., H, 2D']`` float32 (``which``: ``"q"`` or ``"k"``)."""
        weight = (self.q_map if which == "q" else self.k_map)[...]
        return fm.hedgehog(x.astype(F32), weight.astype(F32), form="lolcats")

    def _gamma(self) -> jax.Array:
        return jax.nn.sigmoid(self.window_factor[...].astype(F32))

    def _combine(self, num_w: jax.Array, den_w: jax.Array, num_l: jax.Array, den_l: jax.Array) -> jax.Array:
        """``(gamma num_w + num_l) / (gamma den_w + den_l)``; 0 where both are empty."""
        gamma = self._gamma()
        num = gamma[:, None] * num_w + num_l
        den = gamma * den_w + den_l
        return num / jnp.where(den > 0, den, 1.0)[..., None]

    def _run(self, x, ctx, mode, cache, max_len, index):
        b, t, _ = x.shape
        q, k, v = self._qkv(x, ctx.positions)
        if mode == "step":
            o, new_cache = self._decode_hybrid(q, k, v, cache, index)
        else:
            o, state = self._full(q, k, v, ctx, output_final_state=mode == "prefill")
            new_cache = None
            if mode == "prefill":
                new_cache = self._fill_cache(k, v, ctx.valid, max_len)
                new_cache.update(S=state[0], z=state[1])
        y = self.o_proj(o.astype(x.dtype).reshape(b, t, -1))
        return y, jnp.zeros((), F32), new_cache

    def _full(self, q, k, v, ctx, output_final_state: bool):
        """``o [B, T, H, dv]`` float32 and, when asked, the final sums ``(S [B, H, 2D', dv], z [B, H, 2D'])``."""
        w, h, seg = self.window, self.num_heads, ctx.segment_ids
        num_w, den_w, _ = window_softmax_sums(q, k, v, w, seg, ctx.valid)
        fq = self.feature_map(q, "q")
        fk_old = shift_later(_zero_padding(self.feature_map(repeat_kv(k, h), "k"), ctx.valid), w, seg)
        v_old = shift_later(repeat_kv(v, h).astype(F32), w, seg)
        num_l, S = dispatch.linear("linear_attn", fq, fk_old, v_old, form="chunk", chunk_size=self.chunk_size,
                                   implementation=self.implementation, scale=1.0, normalize=False,
                                   cu_seqlens=ctx.cu_seqlens, output_final_state=output_final_state or None)
        z = segment_cumsum(fk_old, seg)                                       # [B, T, H, 2D']
        den_l = einsum("bthf,bthf->bth", fq, z)
        state = (S, z[:, -1]) if output_final_state else None
        return self._combine(num_w, den_w, num_l, den_l), state

    def _decode_hybrid(self, q, k, v, cache, index):
        """One token: the slot's old key leaves the window into ``S, z``; the new one is written."""
        h, size = self.num_heads, cache["k"].shape[1]
        slot = index % size
        old_k = jax.lax.dynamic_slice_in_dim(cache["k"], slot, 1, axis=1)     # [B, 1, Hkv, d]
        old_v = jax.lax.dynamic_slice_in_dim(cache["v"], slot, 1, axis=1)
        old_pos = jax.lax.dynamic_slice_in_dim(cache["pos"], slot, 1, axis=1)[:, 0]
        leaving = (old_pos >= 0) & (index - old_pos >= self.window)
        fk_old = jnp.where(leaving[:, None, None], self.feature_map(repeat_kv(old_k, h), "k")[:, 0], 0.0)
        S = cache["S"] + einsum("bhf,bhv->bhfv", fk_old, repeat_kv(old_v, h)[:, 0].astype(F32))
        z = cache["z"] + fk_old
        kc, vc, pos = ring_write(cache, k, v, index)
        mask = (pos >= 0) & (index - pos < self.window)
        num_w, den_w, _ = window_softmax_step(q, kc, vc, mask)
        fq = self.feature_map(q, "q")[:, 0]                                  # [B, H, 2D']
        num_l = einsum("bhf,bhfv->bhv", fq, S)[:, None]
        den_l = einsum("bhf,bhf->bh", fq, z)[:, None]
        o = self._combine(num_w, den_w, num_l, den_l)
        return o, {"k": kc, "v": vc, "pos": pos, "S": S, "z": z}


# ------------------------------------------------------------------------------------------------
# Liger: sliding-window softmax + GLA with softmax feature maps and gates from the keys
# ------------------------------------------------------------------------------------------------

class LigerAttention(SoftmaxAttention):
    """Liger attention: ``o = 0.5 SWA(q, k, v) + 0.5 GLA(phi(q_raw), phi(k_raw), v, g)``, then ``o_proj``.

    ``q_raw``, ``k_raw`` are the projections (after q/k-norm if any) before rotary, kv heads
    repeated to the H query heads; ``phi`` is a softmax over the head dimension; the per-key-dim
    log gate is ``g = logsigmoid(k_raw) / cfg.gla_gate_normalizer``; the GLA branch runs at scale
    1.  The SWA branch is the rotary softmax attention over the last ``window`` keys.  No
    parameters beyond the softmax layer's.  Decoding keeps a ring buffer of ``min(window,
    max_len)`` keys and the GLA state ``[B, H, d, d]``.
    """

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, layer_idx: int = 0):
        super().__init__(cfg, rngs, layer_idx, window=cfg.window)
        self.chunk_size = cfg.chunk_size
        self.gate_normalizer = float(cfg.gla_gate_normalizer)

    def gla_inputs(self, q_raw: jax.Array, k_raw: jax.Array, v: jax.Array,
                   valid: jax.Array | None = None) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
        """``(phi(q) [B, T, H, d], phi(k) [B, T, H, d], v [B, T, H, dv], g [B, T, H, d])`` float32
        from the pre-rotary heads; padding keys, values and gates are zeroed."""
        h = self.num_heads
        kr = repeat_kv(k_raw, h).astype(F32)
        fq = jax.nn.softmax(q_raw.astype(F32), axis=-1)
        fk = _zero_padding(jax.nn.softmax(kr, axis=-1), valid)
        g = _zero_padding(jax.nn.log_sigmoid(kr) / self.gate_normalizer, valid)
        vr = _zero_padding(repeat_kv(v, h).astype(F32), valid)
        return fq, fk, vr, g

    def _run(self, x, ctx, mode, cache, max_len, index):
        b, t, _ = x.shape
        q_raw, k_raw, v = self._heads(x)
        q, k = self._rotary(q_raw, ctx.positions), self._rotary(k_raw, ctx.positions)
        fq, fk, vr, g = self.gla_inputs(q_raw, k_raw, v, ctx.valid)
        if mode == "step":
            kc, vc, pos = ring_write(cache, k, v, index)
            swa = dispatch.attention_step(q, kc, vc, (pos >= 0) & (index - pos < self.window))
            gla, state = dispatch.linear("gla", fq, fk, vr, form="fused_recurrent", g=g, scale=1.0,
                                         initial_state=cache["state"], output_final_state=True)
            new_cache = {"k": kc, "v": vc, "pos": pos, "state": state}
        else:
            swa = dispatch.attention(q, k, v, window=self.window, cu_seqlens=ctx.cu_seqlens, valid=ctx.valid,
                                     sequence_mode=self.sequence_attention, implementation=self.implementation)
            gla, state = dispatch.linear("gla", fq, fk, vr, form="chunk", chunk_size=self.chunk_size,
                                         implementation=self.implementation, g=g, scale=1.0,
                                         cu_seqlens=ctx.cu_seqlens,
                                         output_final_state=True if mode == "prefill" else None)
            new_cache = None
            if mode == "prefill":
                new_cache = self._fill_cache(k, v, ctx.valid, max_len)
                new_cache["state"] = state
        o = 0.5 * swa.astype(F32) + 0.5 * gla
        y = self.o_proj(o.astype(x.dtype).reshape(b, t, -1))
        return y, jnp.zeros((), F32), new_cache
