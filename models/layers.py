"""Building blocks shared by every mixer and model: logical-axis parameters, norms, MLP, rotary."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

default_kernel_init = nnx.initializers.lecun_normal()


def logical(init, *names: str):
    """Annotates an initializer with logical axis names (sharded later by parallelism rules)."""
    return nnx.with_partitioning(init, names, eager_sharding=False)


def dense(d_in: int, d_out: int, names: tuple[str, str], rngs: nnx.Rngs, init=default_kernel_init) -> nnx.Linear:
    return nnx.Linear(d_in, d_out, use_bias=False, kernel_init=logical(init, *names), rngs=rngs)


class RMSNorm(nnx.Module):
    """Root-mean-square norm over the last axis, computed in float32, scale on logical ``embed``."""

    def __init__(self, dim: int, eps: float = 1e-6, axis_name: str = "embed"):
        self.eps = eps
        self.scale = nnx.Param(jnp.ones((dim,), jnp.float32), out_sharding=(axis_name,), eager_sharding=False)

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (y * self.scale[...]).astype(x.dtype)


class SwiGLU(nnx.Module):
    """``down(silu(gate(x)) * up(x))``."""

    def __init__(self, d_model: int, hidden: int, rngs: nnx.Rngs):
        self.gate_proj = dense(d_model, hidden, ("embed", "mlp"), rngs)
        self.up_proj = dense(d_model, hidden, ("embed", "mlp"), rngs)
        self.down_proj = dense(hidden, d_model, ("mlp", "embed"), rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


def rotary(x: jax.Array, positions: jax.Array, theta: float = 10_000.0) -> jax.Array:
    """Rotary position embedding on ``x [B, T, H, D]`` (D even) at integer ``positions [B, T]``."""
    d = x.shape[-1]
    if d % 2:
        raise ValueError(f"rotary embeddings need an even head size, got {d}")
    freq = theta ** (-jnp.arange(0, d // 2, dtype=jnp.float32) * 2.0 / d)
    angle = positions[..., None].astype(jnp.float32) * freq                 # [B, T, D/2]
    cos, sin = jnp.cos(angle)[:, :, None, :], jnp.sin(angle)[:, :, None, :]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)
