"""Sequence-mixer layers: ``[B, T, D] -> [B, T, D]``, each usable on its own."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from models.config import ModelConfig
from models.layers import RMSNorm, dense, rotary
from ops.linear_attn import chunk_linear_attn

_FEATURE_MAPS = {
    "identity": lambda x: x,
    "elu+1": lambda x: jax.nn.elu(x) + 1.0,
    "relu": jax.nn.relu,
}


class LinearAttention(nnx.Module):
    """Causal linear attention (no decay): ``o_t = sum_{s<=t} (phi(q_t) . phi(k_s)) v_s``.

    The output of each head is RMS-normalised (as in GLA/RetNet layers) rather than divided by
    the running normaliser, which keeps training stable without an epsilon-sized denominator.
    """

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        h, d = cfg.num_heads, cfg.head_size
        self.num_heads, self.head_dim, self.chunk_size = h, d, cfg.chunk_size
        self.feature_map = _FEATURE_MAPS[cfg.feature_map]
        self.q_proj = dense(cfg.d_model, h * d, ("embed", "heads"), rngs)
        self.k_proj = dense(cfg.d_model, h * d, ("embed", "heads"), rngs)
        self.v_proj = dense(cfg.d_model, h * d, ("embed", "heads"), rngs)
        self.o_proj = dense(h * d, cfg.d_model, ("heads", "embed"), rngs)
        self.o_norm = RMSNorm(d, cfg.norm_eps, axis_name="kv")

    def __call__(self, x: jax.Array, positions: jax.Array | None = None) -> jax.Array:
        b, t, _ = x.shape
        split = lambda y: y.reshape(b, t, self.num_heads, self.head_dim)
        q = self.feature_map(split(self.q_proj(x)))
        k = self.feature_map(split(self.k_proj(x)))
        v = split(self.v_proj(x))
        o, _ = chunk_linear_attn(q, k, v, chunk_size=self.chunk_size)
        return self.o_proj(self.o_norm(o).reshape(b, t, -1))


class SoftmaxAttention(nnx.Module):
    """Causal multi-head softmax attention with rotary position embeddings."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        h, d = cfg.num_heads, cfg.head_size
        self.num_heads, self.head_dim, self.rope_theta = h, d, cfg.rope_theta
        self.q_proj = dense(cfg.d_model, h * d, ("embed", "heads"), rngs)
        self.k_proj = dense(cfg.d_model, h * d, ("embed", "heads"), rngs)
        self.v_proj = dense(cfg.d_model, h * d, ("embed", "heads"), rngs)
        self.o_proj = dense(h * d, cfg.d_model, ("heads", "embed"), rngs)

    def __call__(self, x: jax.Array, positions: jax.Array | None = None) -> jax.Array:
        b, t, _ = x.shape
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(t), (b, t))
        split = lambda y: y.reshape(b, t, self.num_heads, self.head_dim)
        q = rotary(split(self.q_proj(x)), positions, self.rope_theta)
        k = rotary(split(self.k_proj(x)), positions, self.rope_theta)
        v = split(self.v_proj(x))
        o = jax.nn.dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(o.reshape(b, t, -1))


MIXERS = {"linear_attn": LinearAttention, "softmax": SoftmaxAttention}
