"""Decoder-only language model whose per-layer mixer comes from the config's layer pattern."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from .config import ModelConfig
from .layers import RMSNorm, SwiGLU, dense, logical
from .mixers import MIXERS
from .mixers.base import default_positions


class Block(nnx.Module):
    """Pre-norm residual block: ``x + attn(attn_norm(x))`` then ``x + mlp(mlp_norm(x))``."""

    def __init__(self, cfg: ModelConfig, kind: str, rngs: nnx.Rngs, layer_idx: int = 0):
        self.kind = kind
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = MIXERS[kind](cfg, rngs, layer_idx)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = SwiGLU(cfg.d_model, cfg.hidden_size, rngs)

    def forward(self, x, positions, mask=None, cu_seqlens=None):
        y, aux = self.attn.forward(self.attn_norm(x), positions, mask=mask, cu_seqlens=cu_seqlens)
        x = x + y
        return x + self.mlp(self.mlp_norm(x)), aux

    def __call__(self, x, positions=None, *, mask=None, cu_seqlens=None):
        return self.forward(x, positions, mask, cu_seqlens)[0]

    def prefill(self, x, positions, mask, max_len):
        y, cache = self.attn.prefill(self.attn_norm(x), positions, mask=mask, max_len=max_len)
        x = x + y
        return x + self.mlp(self.mlp_norm(x)), cache

    def step(self, x, cache, positions, index):
        y, cache = self.attn.step(self.attn_norm(x), cache, positions=positions, index=index)
        x = x + y
        return x + self.mlp(self.mlp_norm(x)), cache


class LanguageModel(nnx.Module):
    """Embedding, a stack of mixer blocks, a final RMSNorm and an output head (tied optionally).

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
        self.layers = nnx.List([Block(cfg, kind, rngs, i) for i, kind in enumerate(cfg.layer_kinds)])
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = None if cfg.tie_embeddings else dense(
            cfg.d_model, cfg.vocab_size, ("embed", "vocab"), rngs, init=nnx.initializers.normal(0.02))

    def _logits(self, x):
        x = self.norm(x)
        if self.lm_head is None:
            return self.embed.attend(x).astype(jnp.float32)
        return self.lm_head(x).astype(jnp.float32)

    def __call__(self, tokens: jax.Array, positions: jax.Array | None = None, *, mask=None,
                 cu_seqlens=None, return_aux: bool = False):
        """``tokens [B, T]`` int -> float32 logits ``[B, T, vocab]``.

        ``mask [B, T]`` bool marks real tokens in a padded batch; ``cu_seqlens [N + 1]`` packs N
        sequences into one row (B == 1).  Positions default to 0.. per sequence (counting only
        real tokens).  With ``return_aux=True`` returns ``(logits, aux_loss)``: the weighted sum
        of the layers' auxiliary losses (MoM load balancing; 0 otherwise), to add to the loss.
        """
        x = self.embed(tokens)
        aux = jnp.zeros((), jnp.float32)
        for layer in self.layers:
            x, layer_aux = layer.forward(x, positions, mask, cu_seqlens)
            aux = aux + layer_aux
        logits = self._logits(x)
        return (logits, aux) if return_aux else logits

    def aux_loss(self, tokens, positions=None, *, mask=None, cu_seqlens=None) -> jax.Array:
        """The auxiliary loss alone (runs the forward pass; prefer ``return_aux=True``)."""
        return self(tokens, positions, mask=mask, cu_seqlens=cu_seqlens, return_aux=True)[1]

    def prefill(self, tokens: jax.Array, *, mask=None, max_len: int):
        """Runs the prompt ``tokens [B, P]`` (left-padded; ``mask`` marks real tokens) with the
        chunk ops and returns ``(logits [B, P, V], caches)`` for decoding up to ``max_len`` slots."""
        b, p = tokens.shape
        valid = None if mask is None else jnp.asarray(mask, bool)
        positions = default_positions(b, p, valid)
        x = self.embed(tokens)
        caches = []
        for layer in self.layers:
            x, cache = layer.prefill(x, positions, valid, max_len)
            caches.append(cache)
        return self._logits(x), caches

    def decode_step(self, token: jax.Array, caches, *, positions: jax.Array, index):
        """One token per row ``token [B]`` at ``positions [B]`` (slot ``index`` of the shared
        timeline) -> ``(logits [B, V], caches)``."""
        x = self.embed(token[:, None])
        pos = positions[:, None]
        new = []
        for layer, cache in zip(self.layers, caches):
            x, cache = layer.step(x, cache, pos, index)
            new.append(cache)
        return self._logits(x)[:, 0], new


def count_params(model: nnx.Module) -> int:
    """Number of trainable parameter values (tied embeddings counted once)."""
    return sum(int(x.size) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
