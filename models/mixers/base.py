"""What every mixer shares: the token context (positions, padding, packing) and the three modes.

Every mixer maps ``x [B, T, D] -> [B, T, D]`` and offers

* ``__call__(x, positions=None, *, mask=None, cu_seqlens=None)``: the full-sequence (chunk) form;
  ``mask [B, T]`` bool marks real tokens (padding writes nothing and is never attended),
  ``cu_seqlens [N + 1]`` packs N sequences into a ``B == 1`` row (no information crosses a
  boundary; positions restart at each sequence);
* ``forward(...) -> (y, aux)``: the same, plus the layer's auxiliary loss (0 for most);
* ``prefill(x, positions=None, *, mask=None, max_len) -> (y, cache)``: the full form that also
  returns the decoding cache (final recurrent states, short-conv states, KV caches sized
  ``max_len`` tokens, ring buffers for sliding windows);
* ``step(x [B, 1, D], cache, *, positions [B, 1], index) -> (y [B, 1, D], cache)``: one decoding
  token (``index`` is the token's slot in the shared timeline; prompts are left-padded so every
  row decodes at the same slot).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx


class Context(NamedTuple):
    positions: jax.Array              # [B, T] int32, per-sequence positions (for rotary)
    valid: jax.Array | None           # [B, T] bool, None = all real tokens
    segment_ids: jax.Array | None     # [B, T] int32 packed-sequence ids, None = one per row
    cu_seqlens: jax.Array | None


def segment_ids_from_cu(cu_seqlens: jax.Array, length: int) -> jax.Array:
    t = jnp.arange(length, dtype=jnp.int32)
    return (jnp.searchsorted(jnp.asarray(cu_seqlens, jnp.int32), t, side="right") - 1)[None]


def make_context(x: jax.Array, positions=None, mask=None, cu_seqlens=None) -> Context:
    B, T = x.shape[:2]
    segment_ids = None
    if cu_seqlens is not None:
        if B != 1:
            raise ValueError(f"cu_seqlens requires a packed batch with B == 1, got B = {B}")
        segment_ids = segment_ids_from_cu(cu_seqlens, T)
    valid = None if mask is None else jnp.asarray(mask, bool)
    if positions is None:
        positions = default_positions(B, T, valid, cu_seqlens)
    return Context(jnp.asarray(positions, jnp.int32), valid, segment_ids, cu_seqlens)


def default_positions(B: int, T: int, valid=None, cu_seqlens=None) -> jax.Array:
    """0, 1, 2, ... per row; restarting at each packed sequence; counting only valid tokens."""
    t = jnp.arange(T, dtype=jnp.int32)
    if cu_seqlens is not None:
        cu = jnp.asarray(cu_seqlens, jnp.int32)
        seg = jnp.searchsorted(cu, t, side="right") - 1
        return jnp.broadcast_to(t - cu[seg], (B, T))
    if valid is not None:
        return jnp.maximum(jnp.cumsum(valid.astype(jnp.int32), axis=1) - 1, 0)
    return jnp.broadcast_to(t, (B, T))


class Mixer(nnx.Module):
    """Base class; subclasses implement ``_run(x, ctx, mode, cache, max_len, index) -> (y, aux, cache)``."""

    def __call__(self, x, positions=None, *, mask=None, cu_seqlens=None):
        return self.forward(x, positions, mask=mask, cu_seqlens=cu_seqlens)[0]

    def forward(self, x, positions=None, *, mask=None, cu_seqlens=None):
        ctx = make_context(x, positions, mask, cu_seqlens)
        y, aux, _ = self._run(x, ctx, "full", None, None, None)
        return y, aux

    def prefill(self, x, positions=None, *, mask=None, max_len: int):
        ctx = make_context(x, positions, mask, None)
        y, _, cache = self._run(x, ctx, "prefill", None, max_len, None)
        return y, cache

    def step(self, x, cache, *, positions, index):
        ctx = Context(jnp.asarray(positions, jnp.int32), None, None, None)
        y, _, cache = self._run(x, ctx, "step", cache, None, index)
        return y, cache

    def _run(self, x, ctx, mode, cache, max_len, index):
        raise NotImplementedError
