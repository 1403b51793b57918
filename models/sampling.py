"""Fast generation: prefill with the chunk ops, then one jitted ``lax.scan`` of decoding steps.

Linear layers decode from their recurrent state (constant memory per token), softmax layers from
a KV cache of ``prompt + max_new_tokens`` slots, sliding-window layers from a ring buffer of
``window`` slots.  Prompts of different lengths are left-aligned into one padded batch (padding
writes nothing, is never attended, and positions count real tokens only), so every row decodes
in the same slot of a shared timeline.  One compilation per (shapes, sampling settings).
"""

from __future__ import annotations

import math
import numbers
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import checkify

from ..ops.common.checks import is_concrete
from .lm import check_token_ids


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


def _check_temperature(temperature: float | jax.Array) -> None:
    if isinstance(temperature, bool) or np.ndim(temperature) != 0:
        raise ValueError(f"temperature must be a scalar >= 0 (0: greedy), got {temperature!r}")
    expected = "temperature must be a finite number >= 0 (0: greedy)"
    if is_concrete(temperature):
        value = float(temperature)
        if not (math.isfinite(value) and value >= 0):
            raise ValueError(f"{expected}, got {value!r}")
    else:
        checkify.debug_check(jnp.isfinite(temperature) & (temperature >= 0), f"{expected}, got {{t}}", t=temperature)


def _resolve_top_k(top_k: int | None, vocab_size: int | None) -> int | None:
    """``top_k`` as the static setting of the compiled sampler: None when it filters nothing."""
    if top_k is None:
        return None
    if isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral) or top_k < 0:
        raise ValueError(f"top_k must be None or an int >= 0 (None or 0: no top-k filtering), got {top_k!r}")
    top_k = int(top_k)
    if top_k == 0 or (vocab_size is not None and top_k >= vocab_size):
        return None
    return top_k


def _resolve_top_p(top_p: float | None) -> float | None:
    """``top_p`` as the static setting of the compiled sampler: None when it filters nothing."""
    if top_p is None:
        return None
    if (isinstance(top_p, bool) or not isinstance(top_p, (numbers.Real, np.ndarray, jax.Array))
            or np.ndim(top_p) != 0 or not is_concrete(top_p) or not 0.0 < float(top_p) <= 1.0):
        raise ValueError(f"top_p must be None or a number in (0, 1] (None or 1: no nucleus filtering), "
                         f"got {top_p!r}")
    return None if float(top_p) == 1.0 else float(top_p)


def _check_prompt_lengths(lengths: jax.Array, p: int) -> None:
    expected = f"prompt_lengths must lie in [1, P] = [1, {p}] (each row's real tokens at the start of its prompt row)"
    if is_concrete(lengths):
        values = np.asarray(lengths)
        if values.min() < 1 or values.max() > p:
            raise ValueError(f"{expected}, got min {values.min()} and max {values.max()}")
    else:
        lo, hi = lengths.min(), lengths.max()
        checkify.debug_check((lo >= 1) & (hi <= p), f"{expected}, got min {{lo}} and max {{hi}}", lo=lo, hi=hi)


def generate(model: nnx.Module, prompt: jax.Array, max_new_tokens: int, temperature: float = 1.0,
             top_k: int | None = None, top_p: float | None = None, rng: jax.Array | None = None, *,
             prompt_lengths=None, return_logits: bool = False):
    """Samples ``max_new_tokens`` after ``prompt [B, P]``; ``temperature = 0`` is greedy.

    Args:
      prompt: ``[B, P]`` token ids, each real one in ``[0, vocab_size)`` (padding after
        ``prompt_lengths`` is not read and may hold any id).
      temperature: a scalar >= 0; 0 takes the most likely token (top-k and top-p then change nothing).
      top_k: sample among the ``top_k`` most likely tokens; None or 0 means no top-k filtering
        (as does any value >= the vocabulary size), all three compile to the same program.
      top_p: nucleus sampling, a number in (0, 1]: the smallest set of most likely tokens whose
        probability reaches ``top_p``; None or 1 means no nucleus filtering (one program for both).
      prompt_lengths: ``[B]`` real lengths in ``[1, P]`` when rows are right-padded prompts of
        different lengths (each row's first ``prompt_lengths[b]`` tokens); None = all P tokens are real.
      return_logits: also return the float32 logits ``[B, max_new_tokens, V]`` each new token
        was drawn from (for tests against the full forward pass).

    Returns the new tokens ``[B, max_new_tokens]`` int32 (and the logits).

    Raises:
      ValueError: naming the argument, for a bad ``max_new_tokens``, ``temperature``, ``top_k``,
        ``top_p``, a prompt of the wrong shape, prompt ids outside ``[0, vocab_size)`` or
        ``prompt_lengths`` outside ``[1, P]``.  Values that are traced (``generate`` called
        under ``jit``) are checked only under ``checkify.checkify`` (docs/models.md).
    """
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, numbers.Integral) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    _check_temperature(temperature)
    vocab_size = getattr(getattr(model, "config", None), "vocab_size", None)
    top_k = _resolve_top_k(top_k, vocab_size)
    top_p = _resolve_top_p(top_p)
    prompt = jnp.asarray(prompt, jnp.int32)
    if prompt.ndim != 2 or prompt.shape[1] < 1:
        raise ValueError(f"prompt must have shape [B, P] with P >= 1, got {prompt.shape}")
    b, p = prompt.shape
    padded = prompt_lengths is not None
    lengths = jnp.full((b,), p, jnp.int32) if not padded else jnp.asarray(prompt_lengths, jnp.int32)
    if lengths.shape != (b,):
        raise ValueError(f"prompt_lengths must have shape [B] = ({b},), got {lengths.shape}")
    if padded:
        _check_prompt_lengths(lengths, p)
    if vocab_size is not None:
        real = None if not padded else jnp.arange(p)[None, :] < lengths[:, None]
        check_token_ids("prompt", prompt, vocab_size, valid=real)
    rng = jax.random.key(0) if rng is None else rng
    graphdef, state = nnx.split(model)
    return _generate(graphdef, state, prompt, lengths, rng, jnp.float32(temperature),
                     max_new_tokens=max_new_tokens, top_k=top_k, top_p=top_p, padded=padded,
                     return_logits=return_logits)
