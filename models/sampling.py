"""Fast generation: prefill with the chunk ops, then one jitted ``lax.scan`` of decoding steps.

Linear layers decode from their recurrent state (constant memory per token), softmax layers from
a KV cache of ``prompt + max_new_tokens`` slots, sliding-window layers from a ring buffer of
``window`` slots.  Prompts of different lengths are left-aligned into one padded batch (padding
writes nothing, is never attended, and positions count real tokens only), so every row decodes
in the same slot of a shared timeline.  One compilation per (shapes, sampling settings).
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from flax import nnx


def _filter_logits(logits: jax.Array, top_k: int | None, top_p: float | None) -> jax.Array:
    if top_k is not None and top_k > 0:
        kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p is not None and top_p < 1.0:
        sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]
        cum = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
        cutoff_index = jnp.sum(cum < top_p, axis=-1, keepdims=True)
        cutoff = jnp.take_along_axis(sorted_logits, cutoff_index, axis=-1)
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return logits


def _sample(logits, key, temperature, top_k, top_p):
    filtered = _filter_logits(logits / jnp.maximum(temperature, 1e-6), top_k, top_p)
    sampled = jax.random.categorical(key, filtered, axis=-1)
    return jnp.where(temperature > 0, sampled, jnp.argmax(logits, axis=-1)).astype(jnp.int32)


def left_align(prompt: jax.Array, lengths: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Right-padded ``prompt [B, P]`` with real ``lengths [B]`` -> (left-padded prompt, mask)."""
    p = prompt.shape[1]
    src = jnp.arange(p)[None, :] - (p - lengths)[:, None]
    mask = src >= 0
    return jnp.where(mask, jnp.take_along_axis(prompt, jnp.maximum(src, 0), axis=1), 0), mask


@partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "top_k", "top_p", "padded",
                                   "return_logits"))
def _generate(graphdef, state, prompt, lengths, rng, temperature, *, max_new_tokens, top_k, top_p,
              padded, return_logits):
    model = nnx.merge(graphdef, state)
    b, p = prompt.shape
    tokens, mask = left_align(prompt, lengths) if padded else (prompt, None)
    logits, caches = model.prefill(tokens, mask=mask, max_len=p + max_new_tokens)
    last = logits[:, -1]
    rng, key = jax.random.split(rng)
    first = _sample(last, key, temperature, top_k, top_p)

    def body(carry, i):
        token, caches, rng = carry
        logits, caches = model.decode_step(token, caches, positions=lengths + i, index=p + i)
        rng, key = jax.random.split(rng)
        nxt = _sample(logits, key, temperature, top_k, top_p)
        return (nxt, caches, rng), (nxt, logits if return_logits else None)

    _, (rest, rest_logits) = jax.lax.scan(body, (first, caches, rng), jnp.arange(max_new_tokens - 1))
    out = jnp.concatenate([first[:, None], jnp.moveaxis(rest, 0, 1)], axis=1)
    if not return_logits:
        return out
    all_logits = jnp.concatenate([last[:, None], jnp.moveaxis(rest_logits, 0, 1)], axis=1)
    return out, all_logits


def generate(model: nnx.Module, prompt: jax.Array, max_new_tokens: int, temperature: float = 1.0,
             top_k: int | None = None, top_p: float | None = None, rng: jax.Array | None = None, *,
             prompt_lengths=None, return_logits: bool = False):
    """Samples ``max_new_tokens`` after ``prompt [B, P]``; ``temperature = 0`` is greedy.

    Args:
      prompt_lengths: ``[B]`` real lengths when rows are right-padded prompts of different
        lengths (each row's first ``prompt_lengths[b]`` tokens); None = all P tokens are real.
      return_logits: also return the float32 logits ``[B, max_new_tokens, V]`` each new token
        was drawn from (for tests against the full forward pass).

    Returns the new tokens ``[B, max_new_tokens]`` int32 (and the logits).
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    prompt = jnp.asarray(prompt, jnp.int32)
    if prompt.ndim != 2 or prompt.shape[1] < 1:
        raise ValueError(f"prompt must have shape [B, P] with P >= 1, got {prompt.shape}")
    b, p = prompt.shape
    padded = prompt_lengths is not None
    lengths = jnp.full((b,), p, jnp.int32) if not padded else jnp.asarray(prompt_lengths, jnp.int32)
    if lengths.shape != (b,):
        raise ValueError(f"prompt_lengths must have shape [B] = ({b},), got {lengths.shape}")
    rng = jax.random.key(0) if rng is None else rng
    graphdef, state = nnx.split(model)
    return _generate(graphdef, state, prompt, lengths, rng, jnp.float32(temperature),
                     max_new_tokens=max_new_tokens, top_k=top_k,
                     top_p=None if top_p is None else float(top_p), padded=padded,
                     return_logits=return_logits)
