"""LoRA and the variants that keep its two factors: rsLoRA, DoRA and DyLoRA.

All four hold ``lora_a [in, r]`` (Kaiming-uniform) and ``lora_b [r, out]`` (zeros), so the
correction ``s * lora_a @ lora_b`` is zero at initialisation:

| method   | correction                                    | scale ``s``       |
|----------|-----------------------------------------------|-------------------|
| lora     | ``x A B``                                     | ``alpha / r``     |
| rslora   | ``x A B``                                     | ``alpha / sqrt(r)`` |
| dora     | ``W' = m * (W0 + s A B) / ||W0 + s A B||_col`` | ``alpha / r``     |
| dylora   | ``x A[:, :b] B[:b]`` for a sampled ``b <= r``  | ``alpha / b``     |
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from .config import PeftConfig
from .core import AdaptedLinear, kaiming_uniform, register, training_key


@register
class LoRA(AdaptedLinear):
    """``y = x W0 + b + (alpha / r) * dropout(x) A B``."""

    method = "lora"

    def __init__(self, base: nnx.Linear, cfg: PeftConfig, rngs: nnx.Rngs, layer_id: int, path: str):
        super().__init__(base, cfg, rngs, layer_id, path)
        r = cfg.rank
        self.lora_a = self.adapter_param(kaiming_uniform(rngs.params(), (self.in_features, r), self.in_features),
                                         self.in_name, "lora_rank")
        self.lora_b = self.adapter_param(jnp.zeros((r, self.out_features)), "lora_rank", self.out_name)
        self.scaling = self.scale(cfg)

    @staticmethod
    def scale(cfg: PeftConfig) -> float:
        return cfg.alpha / cfg.rank

    def delta(self) -> jax.Array:
        return self.scaling * (self.lora_a[...] @ self.lora_b[...])

    def adapter(self, x: jax.Array) -> jax.Array:
        a, b = self.lora_a[...].astype(x.dtype), self.lora_b[...].astype(x.dtype)
        return (x @ a) @ b * jnp.asarray(self.scaling, x.dtype)


@register
class RsLoRA(LoRA):
    """LoRA scaled by ``alpha / sqrt(r)``: the correction's size no longer shrinks as ``r`` grows."""

    method = "rslora"

    @staticmethod
    def scale(cfg: PeftConfig) -> float:
        return cfg.alpha / math.sqrt(cfg.rank)


@register
class DoRA(LoRA):
    """Magnitude and direction: ``W' = m * V / ||V||`` with ``V = W0 + (alpha / r) A B``.

    The norm is per output channel, over the input axis (axis 0 of the ``[in, out]`` kernel);
    ``magnitude [out]`` starts at ``||W0||``, so ``W' = W0`` at initialisation. With
    ``dora_detach_norm`` (the default) the norm is a constant in the backward pass. The
    forward pass computes ``(x W0 + s x A B) * (m / ||V||) + b``, forming ``V`` once per call
    for its norm.
    """

    method = "dora"

    def __init__(self, base: nnx.Linear, cfg: PeftConfig, rngs: nnx.Rngs, layer_id: int, path: str):
        super().__init__(base, cfg, rngs, layer_id, path)
        self.magnitude = self.adapter_param(self._column_norm(self.base_kernel()), self.out_name)
        self.detach_norm = cfg.dora_detach_norm

    @staticmethod
    def _column_norm(w: jax.Array) -> jax.Array:
        return jnp.sqrt(jnp.sum(jnp.square(w.astype(jnp.float32)), axis=0))

    def column_scale(self) -> jax.Array:
        """``m / ||W0 + s A B||`` per output channel, float32 ``[out]``."""
        norm = self._column_norm(self.base_kernel() + LoRA.delta(self))
        if self.detach_norm:
            norm = jax.lax.stop_gradient(norm)
        return self.magnitude[...] / norm

    def __call__(self, x: jax.Array) -> jax.Array:
        x, y, bias = self._base(x)
        y = (y + self.adapter(self._dropout(x)).astype(y.dtype)) * self.column_scale().astype(y.dtype)
        if bias is not None:
            y = y + bias
        return y

    def delta(self) -> jax.Array:
        return self.merged_kernel().astype(jnp.float32) - self.base_kernel()

    def merged_kernel(self) -> jax.Array:
        v = self.base_kernel() + LoRA.delta(self)
        return (v * self.column_scale()).astype(self.kernel.dtype)


@register
class DyLoRA(LoRA):
    """Nested ranks: each training step uses the first ``b`` ranks, ``b ~ U[dylora_min_rank, r]``
    (one ``b`` per step, shared by every layer), scaled by ``alpha / b``.

    Outside :func:`peft.training <lolax.models.peft.training>` the layer uses ``active_rank``
    (``r`` unless :func:`lolax.models.peft.set_rank` cut it), so after training any rank up to
    ``r`` is one call away, without retraining.
    """

    method = "dylora"

    def __init__(self, base: nnx.Linear, cfg: PeftConfig, rngs: nnx.Rngs, layer_id: int, path: str):
        super().__init__(base, cfg, rngs, layer_id, path)
        self.alpha = float(cfg.alpha)
        self.min_rank = cfg.dylora_min_rank
        self.active_rank = cfg.rank

    def _rank(self) -> jax.Array | int:
        key = training_key("dylora_rank", 0)      # layer 0: every layer draws the same b
        if key is None:
            return self.active_rank
        return jax.random.randint(key, (), self.min_rank, self.rank + 1)

    def _masked(self, rank) -> tuple[jax.Array, jax.Array]:
        keep = (jnp.arange(self.rank) < rank).astype(jnp.float32)
        return self.lora_a[...] * keep, self.alpha / rank

    def delta(self) -> jax.Array:
        a, scale = self._masked(self.active_rank)
        return scale * (a @ self.lora_b[...])

    def adapter(self, x: jax.Array) -> jax.Array:
        a, scale = self._masked(self._rank())
        return (x @ a.astype(x.dtype)) @ self.lora_b[...].astype(x.dtype) * jnp.asarray(scale, x.dtype)
