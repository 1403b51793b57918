"""BaseConv (Zoology): a gated short causal convolution, the mixer Zoology pairs with every other.

``y = o_proj(conv(in_proj x) * gate_proj x)`` with a depthwise causal kernel of ``cfg.conv_size``
taps. It looks back only ``conv_size - 1`` tokens, so on its own it cannot recall; placed before a
linear-attention layer it supplies the previous-token features that associative recall needs.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from ..config import ModelConfig
from ..layers import ShortConv, dense
from .base import Mixer


class BaseConv(Mixer):
    """Gated short convolution; its decoding cache is the last ``conv_size - 1`` projected inputs."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, layer_idx: int = 0):
        d = cfg.d_model
        self.in_proj = dense(d, d, ("embed", "heads"), rngs)
        self.gate_proj = dense(d, d, ("embed", "heads"), rngs)
        self.conv = ShortConv(d, cfg.conv_size, rngs, activation=False)
        self.o_proj = dense(d, d, ("heads", "embed"), rngs)

    def _run(self, x, ctx, mode, cache, max_len, index):
        u = self.in_proj(x)
        new_cache = None
        if mode == "step":
            c, state = self.conv.step(u, cache["conv"])
            new_cache = {"conv": state}
        else:
            c = self.conv(u, ctx.segment_ids, ctx.valid)
            if mode == "prefill":
                new_cache = {"conv": self.conv.final_state(u, ctx.valid)}
        return self.o_proj(c * self.gate_proj(x)), jnp.zeros((), jnp.float32), new_cache
