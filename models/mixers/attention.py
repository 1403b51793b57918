"""Softmax attention with rotary embeddings and grouped-query heads; sliding-window attention.

Options of the common pretrained checkpoints come from the model config: ``qkv_bias`` /
``o_bias`` (projection biases), ``qk_norm`` (a per-head RMSNorm of q and k, applied before
rotary) and ``rope_scaling`` (scaled rotary frequencies).

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
from ..layers import RMSNorm, dense, rotary
from .base import Mixer


class SoftmaxAttention(Mixer):
    """Causal softmax attention: ``num_heads`` query heads share ``num_kv_heads`` key/value heads."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, layer_idx: int = 0, window: int | None = None):
        h, kv, d = cfg.num_heads, cfg.kv_heads, cfg.head_size
        self.num_heads, self.num_kv_heads, self.head_dim = h, kv, d
        self.rope_theta, self.window = cfg.rope_theta, window
        self.inv_freq = tuple(float(f) for f in cfg.rope_inv_freq())
        self.sequence_attention = cfg.sequence_attention
        self.implementation = cfg.implementation
        self.q_proj = dense(cfg.d_model, h * d, ("embed", "heads"), rngs, use_bias=cfg.qkv_bias)
        self.k_proj = dense(cfg.d_model, kv * d, ("embed", "kv_heads"), rngs, use_bias=cfg.qkv_bias)
        self.v_proj = dense(cfg.d_model, kv * d, ("embed", "kv_heads"), rngs, use_bias=cfg.qkv_bias)
        self.o_proj = dense(h * d, cfg.d_model, ("heads", "embed"), rngs, use_bias=cfg.o_bias)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(d, cfg.norm_eps, axis_name="kv")
            self.k_norm = RMSNorm(d, cfg.norm_eps, axis_name="kv")
        else:
            self.q_norm = self.k_norm = None

    def _heads(self, x):
        """``[B, T, D] -> (q [B, T, H, d], k, v [B, T, Hkv, d])`` before rotary (q/k normed if set)."""
        b, t, _ = x.shape
        q = self.q_proj(x).reshape(b, t, self.num_heads, self.head_dim)
        k = self.k_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        return q, k, v

    def _rotary(self, x, positions):
        return rotary(x, positions, self.rope_theta, inv_freq=self.inv_freq)

    def _qkv(self, x, positions):
        q, k, v = self._heads(x)
        return self._rotary(q, positions), self._rotary(k, positions), v

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
