"""Softmax attention with rotary embeddings and grouped-query heads; sliding-window attention.

Decoding keeps a KV cache of fixed length ``max_len`` (prompt + new tokens) for full attention
and a ring buffer of ``min(window, max_len)`` slots for sliding windows.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .. import dispatch
from ..config import ModelConfig
from ..layers import dense, rotary
from .base import Mixer


class SoftmaxAttention(Mixer):
    """Causal softmax attention: ``num_heads`` query heads share ``num_kv_heads`` key/value heads."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, layer_idx: int = 0, window: int | None = None):
        h, kv, d = cfg.num_heads, cfg.kv_heads, cfg.head_size
        self.num_heads, self.num_kv_heads, self.head_dim = h, kv, d
        self.rope_theta, self.window = cfg.rope_theta, window
        self.sequence_attention = cfg.sequence_attention
        self.implementation = cfg.implementation
        self.q_proj = dense(cfg.d_model, h * d, ("embed", "heads"), rngs)
        self.k_proj = dense(cfg.d_model, kv * d, ("embed", "kv_heads"), rngs)
        self.v_proj = dense(cfg.d_model, kv * d, ("embed", "kv_heads"), rngs)
        self.o_proj = dense(h * d, cfg.d_model, ("heads", "embed"), rngs)

    def _qkv(self, x, positions):
        b, t, _ = x.shape
        q = rotary(self.q_proj(x).reshape(b, t, self.num_heads, self.head_dim), positions, self.rope_theta)
        k = rotary(self.k_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim), positions, self.rope_theta)
        v = self.v_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)
        return q, k, v

    def cache_size(self, max_len: int) -> int:
        return max_len if self.window is None else min(self.window, max_len)

    def _run(self, x, ctx, mode, cache, max_len, index):
        b, t, _ = x.shape
        q, k, v = self._qkv(x, ctx.positions)
        if mode == "step":
            return self._decode(q, k, v, cache, index)
        o = dispatch.attention(q, k, v, window=self.window, cu_seqlens=ctx.cu_seqlens, valid=ctx.valid,
                               sequence_mode=self.sequence_attention, implementation=self.implementation)
        y = self.o_proj(o.reshape(b, t, -1))
        new_cache = None
        if mode == "prefill":
            new_cache = self._fill_cache(k, v, ctx.valid, max_len)
        return y, jnp.zeros((), jnp.float32), new_cache

    def _fill_cache(self, k, v, valid, max_len):
        b, t = k.shape[:2]
        size = self.cache_size(max_len)
        if t > max_len:
            raise ValueError(f"prompt length {t} exceeds the cache length max_len = {max_len}")
        s = np.arange(size)
        src = np.where(s <= t - 1, s + size * ((t - 1 - s) // size), -1)      # latest t with t % size == s
        idx = jnp.asarray(np.maximum(src, 0))
        ok = jnp.broadcast_to(jnp.asarray(src >= 0), (b, size))
        if valid is not None:
            ok = ok & valid[:, idx]
        pos = jnp.where(ok, jnp.asarray(src, jnp.int32)[None], -1)
        zero = lambda a: jnp.where(ok[..., None, None], a[:, idx], 0)
        return {"k": zero(k), "v": zero(v), "pos": pos}

    def _decode(self, q, k, v, cache, index):
        size = cache["k"].shape[1]
        slot = index % size if self.window is not None else index
        kc = jax.lax.dynamic_update_slice_in_dim(cache["k"], k.astype(cache["k"].dtype), slot, axis=1)
        vc = jax.lax.dynamic_update_slice_in_dim(cache["v"], v.astype(cache["v"].dtype), slot, axis=1)
        pos = jax.lax.dynamic_update_slice_in_dim(
            cache["pos"], jnp.full((q.shape[0], 1), index, jnp.int32), slot, axis=1)
        mask = pos >= 0
        if self.window is not None:
            mask &= index - pos < self.window
        o = dispatch.attention_step(q, kc, vc, mask)
        y = self.o_proj(o.reshape(o.shape[0], 1, -1))
        return y, jnp.zeros((), jnp.float32), {"k": kc, "v": vc, "pos": pos}


class SlidingWindowAttention(SoftmaxAttention):
    """Softmax attention over the last ``cfg.window`` keys (including the query's own)."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, layer_idx: int = 0):
        super().__init__(cfg, rngs, layer_idx, window=cfg.window)
