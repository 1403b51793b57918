"""Decoder-only language model whose per-layer mixer comes from the config's layer pattern."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from models.config import ModelConfig
from models.layers import RMSNorm, SwiGLU, dense, logical
from models.mixers import MIXERS


class Block(nnx.Module):
    """Pre-norm residual block: ``x + mixer(norm(x))`` then ``x + mlp(norm(x))``."""

    def __init__(self, cfg: ModelConfig, kind: str, rngs: nnx.Rngs):
        self.kind = kind
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = MIXERS[kind](cfg, rngs)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = SwiGLU(cfg.d_model, cfg.hidden_size, rngs)

    def __call__(self, x: jax.Array, positions: jax.Array | None = None) -> jax.Array:
        x = x + self.attn(self.attn_norm(x), positions)
        return x + self.mlp(self.mlp_norm(x))


class LanguageModel(nnx.Module):
    """Embedding, a stack of mixer blocks, a final RMSNorm and an output head.

    >>> from flax import nnx
    >>> import jax.numpy as jnp
    >>> model = LanguageModel(ModelConfig(d_model=32, num_layers=2, pattern="LS", num_heads=2), nnx.Rngs(0))
    >>> model(jnp.zeros((1, 10), jnp.int32)).shape
    (1, 10, 256)
    """

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.config = cfg
        self.embed = nnx.Embed(cfg.vocab_size, cfg.d_model,
                               embedding_init=logical(nnx.initializers.normal(0.02), "vocab", "embed"),
                               rngs=rngs)
        self.layers = nnx.List([Block(cfg, kind, rngs) for kind in cfg.layer_kinds])
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = None if cfg.tie_embeddings else dense(
            cfg.d_model, cfg.vocab_size, ("embed", "vocab"), rngs, init=nnx.initializers.normal(0.02))

    def __call__(self, tokens: jax.Array, positions: jax.Array | None = None) -> jax.Array:
        """``tokens [B, T]`` int -> float32 logits ``[B, T, vocab]``."""
        x = self.embed(tokens)
        for layer in self.layers:
            x = layer(x, positions)
        x = self.norm(x)
        if self.lm_head is None:
            return self.embed.attend(x).astype(jnp.float32)
        return self.lm_head(x).astype(jnp.float32)


def count_params(model: nnx.Module) -> int:
    """Number of trainable parameter values (tied embeddings counted once)."""
    return sum(int(x.size) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
