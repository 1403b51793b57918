"""Text sampling by re-running the model on a fixed-size causal window (one compilation).

Every position's logits depend only on earlier tokens, so the model runs on a zero-padded buffer
of the window length and reads the logits at the last filled position. This is O(window) work
per token; constant-memory recurrent decoding for linear layers is in ``models.decoding`` when a
model provides it.
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


@partial(jax.jit, static_argnames=("graphdef", "window", "max_new_tokens", "top_k", "top_p"))
def _sample_loop(graphdef, state, prompt, rng, *, window, max_new_tokens, temperature, top_k, top_p):
    model = nnx.merge(graphdef, state)
    b, p = prompt.shape
    buf = jnp.zeros((b, p + max_new_tokens), jnp.int32).at[:, :p].set(prompt)

    def body(i, carry):
        buf, rng = carry
        pos = p + i                                           # index of the token to produce
        start = jnp.maximum(pos - window, 0)
        ctx = jax.lax.dynamic_slice_in_dim(jnp.pad(buf, ((0, 0), (0, window))), start, window, axis=1)
        logits = model(ctx)[:, pos - start - 1]
        rng, sub = jax.random.split(rng)
        logits = _filter_logits(logits / jnp.maximum(temperature, 1e-6), top_k, top_p)
        greedy = jnp.argmax(logits, axis=-1)
        sampled = jax.random.categorical(sub, logits, axis=-1)
        token = jnp.where(temperature > 0, sampled, greedy).astype(jnp.int32)
        return buf.at[:, pos].set(token), rng

    buf, _ = jax.lax.fori_loop(0, max_new_tokens, body, (buf, rng))
    return buf[:, p:]


def generate(model: nnx.Module, prompt: jax.Array, max_new_tokens: int, temperature: float = 1.0,
             top_k: int | None = None, top_p: float | None = None, rng: jax.Array | None = None,
             window: int = 256) -> jax.Array:
    """Samples ``max_new_tokens`` after ``prompt [B, P]``; ``temperature = 0`` is greedy.

    Returns the new tokens ``[B, max_new_tokens]``. The model sees at most ``window`` tokens.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    prompt = jnp.asarray(prompt, jnp.int32)
    if prompt.ndim != 2 or prompt.shape[1] < 1:
        raise ValueError(f"prompt must have shape [B, P] with P >= 1, got {prompt.shape}")
    rng = jax.random.key(0) if rng is None else rng
    graphdef, state = nnx.split(model)
    return _sample_loop(graphdef, state, prompt, rng, window=window, max_new_tokens=max_new_tokens,
                        temperature=jnp.float32(temperature), top_k=top_k,
                        top_p=None if top_p is None else float(top_p))
