"""Public entry points of the softmax baselines (see :mod:`lolax.ops.attention`)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ..common import checks
from ..common.precision import einsum
from .blockwise import blockwise_attention

# Compiled as a whole, so that a call outside jit compiles once (inside jit it is inlined).
_blockwise = jax.jit(blockwise_attention, static_argnums=(4, 5, 6, 7))


def _check(q, k, v, cu_seqlens):
    for name, x in (("q", q), ("k", k), ("v", v)):
        checks.check_float(name, x)
        if x.ndim != 4:
            raise ValueError(f"{name} must have rank 4 [B, T, H, D], got shape {x.shape}")
    B, T, H, D = q.shape
    if k.shape[:2] != (B, T) or k.shape[3] != D:
        raise ValueError(f"k must have shape [B={B}, T={T}, Hk, D={D}], got {k.shape}")
    Hk = k.shape[2]
    if Hk < 1 or H % Hk:
        raise ValueError(f"k/v heads ({Hk}) must divide q heads ({H}), got k shape {k.shape}")
    if v.shape[:3] != k.shape[:3]:
        raise ValueError(f"v must have shape [B={B}, T={T}, Hk={Hk}, Dv] like k, got {v.shape}")
    if T < 1:
        raise ValueError(f"sequence length must be at least 1, got q shape {q.shape}")
    checks.check_cu_seqlens(cu_seqlens, B, T)
    return B, T, H, D


def _segments(cu_seqlens, T):
    if cu_seqlens is None:
        return None
    cu = jnp.asarray(cu_seqlens, jnp.int32)
    return (jnp.searchsorted(cu, jnp.arange(T, dtype=jnp.int32), side="right") - 1)[None].astype(jnp.int32)


def _check_window(window):
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"window must be an int >= 1 (number of keys including the query), got {window!r}")


def _check_block(block_size):
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")


def _f32(*xs):
    return tuple(x.astype(jnp.float32) for x in xs)


def softmax_attention(q, k, v, scale=None, causal=True, cu_seqlens=None, *, block_size=128):
    """Memory-efficient softmax attention ``o_i = Σ_j softmax_j(scale·q_i·k_j) v_j``.

    Args:
      q: ``[B, T, H, D]``; k: ``[B, T, Hk, D]``; v: ``[B, T, Hk, Dv]`` with Hk dividing H.
      scale: None means ``D ** -0.5``.
      causal: j <= i (default) or all keys.
      cu_seqlens: ``[N + 1]`` offsets of packed sequences (B = 1); keys of other sequences are masked.
      block_size: query/key block length (static); memory O(T·block_size) per head, in both passes.

    Returns:
      o ``[B, T, H, Dv]`` in v's dtype (computed in float32).

    >>> import jax
    >>> q = jax.random.normal(jax.random.key(0), (1, 100, 4, 16))
    >>> k, v = jax.random.normal(jax.random.key(1), (2, 1, 100, 2, 16))      # 2 kv heads (GQA)
    >>> softmax_attention(q, k, v, block_size=32).shape
    (1, 100, 4, 16)
    """
    B, T, H, D = _check(q, k, v, cu_seqlens)
    _check_block(block_size)
    scale = checks.resolve_scale(scale, D)
    o = _blockwise(*_f32(q, k, v), _segments(cu_seqlens, T), float(scale), bool(causal), None,
                            min(block_size, T))
    return o.astype(v.dtype)


def sliding_window_attention(q, k, v, window, scale=None, cu_seqlens=None, *, block_size=128):
    """Causal sliding-window attention: query i attends keys ``i − window < j <= i``.

    ``window`` counts the keys including the query itself (window = 1: each token sees only itself;
    window >= T: full causal attention).  Cost O(T·(window + block_size)); other arguments and the
    return as in :func:`softmax_attention`.

    >>> import jax
    >>> q, k, v = jax.random.normal(jax.random.key(0), (3, 1, 100, 2, 16))
    >>> sliding_window_attention(q, k, v, window=8, block_size=32).shape
    (1, 100, 2, 16)
    """
    B, T, H, D = _check(q, k, v, cu_seqlens)
    _check_window(window)
    _check_block(block_size)
    scale = checks.resolve_scale(scale, D)
    o = _blockwise(*_f32(q, k, v), _segments(cu_seqlens, T), float(scale), True,
                            None if window >= T else window, min(block_size, T))
    return o.astype(v.dtype)


def _naive(q, k, v, scale, causal, window, cu_seqlens):
    B, T, H, D = _check(q, k, v, cu_seqlens)
    scale = checks.resolve_scale(scale, D)
    q, k, v = _f32(q, k, v)
    G = H // k.shape[2]
    k, v = jnp.repeat(k, G, axis=2), jnp.repeat(v, G, axis=2)
    s = einsum("bihd,bjhd->bhij", q, k) * scale
    i = jnp.arange(T)
    mask = jnp.ones((T, T), bool)
    if causal:
        mask = mask & (i[None, :] <= i[:, None])
    if window is not None:
        mask = mask & (i[None, :] > i[:, None] - window)
    seg = _segments(cu_seqlens, T)
    if seg is not None:
        mask = mask & (seg[0][:, None] == seg[0][None, :])
    s = jnp.where(mask, s, -jnp.inf)
    p = jax.nn.softmax(s, axis=-1)
    return einsum("bhij,bjhd->bihd", p, v)


def naive_softmax_attention(q, k, v, scale=None, causal=True, cu_seqlens=None, *, block_size=None):
    """Oracle: materialises the T×T scores in float32.  Returns o ``[B, T, H, Dv]`` float32.

    >>> import jax, jax.numpy as jnp
    >>> q, k, v = jax.random.normal(jax.random.key(0), (3, 1, 40, 2, 8))
    >>> bool(jnp.allclose(naive_softmax_attention(q, k, v), softmax_attention(q, k, v), atol=1e-5))
    True
    """
    return _naive(q, k, v, scale, causal, None, cu_seqlens)


def naive_sliding_window_attention(q, k, v, window, scale=None, cu_seqlens=None, *, block_size=None):
    """Oracle of :func:`sliding_window_attention` (T×T float32).  Returns o ``[B, T, H, Dv]`` float32.

    >>> import jax, jax.numpy as jnp
    >>> q, k, v = jax.random.normal(jax.random.key(0), (3, 1, 40, 2, 8))
    >>> o = naive_sliding_window_attention(q, k, v, window=1)       # each token sees only itself
    >>> bool(jnp.allclose(o, v))
    True
    """
    _check_window(window)
    return _naive(q, k, v, scale, True, window, cu_seqlens)


def attention_step(q_t, k_cache, v_cache, valid_mask, scale=None):
    """One decoding step over a KV cache.

    Args:
      q_t: ``[B, H, D]`` the new token's queries.
      k_cache, v_cache: ``[B, S, Hk, D]`` / ``[B, S, Hk, Dv]`` cached keys and values (the new
        token's included), in any slot order (e.g. a ring buffer of the last ``window`` tokens).
      valid_mask: ``[B, S]`` bool, True for the slots to attend.  At least one per row.
      scale: None means ``D ** -0.5``.

    Returns:
      o_t ``[B, H, Dv]`` in v_cache's dtype.

    >>> import jax, jax.numpy as jnp
    >>> q, k, v = jax.random.normal(jax.random.key(0), (3, 1, 10, 2, 8))
    >>> o_t = attention_step(q[:, -1], k, v, jnp.ones((1, 10), bool))
    >>> bool(jnp.allclose(o_t, softmax_attention(q, k, v)[:, -1], atol=1e-5))
    True
    """
    if len(getattr(q_t, "shape", ())) != 3:
        raise ValueError(f"q_t must have rank 3 [B, H, D], got shape {getattr(q_t, 'shape', ())}")
    B, H, D = q_t.shape
    for name, x in (("k_cache", k_cache), ("v_cache", v_cache)):
        if len(getattr(x, "shape", ())) != 4 or x.shape[0] != B:
            raise ValueError(f"{name} must have shape [B={B}, S, Hk, D], got {getattr(x, 'shape', ())}")
    S, Hk = k_cache.shape[1], k_cache.shape[2]
    if k_cache.shape[3] != D or H % Hk or v_cache.shape[:3] != k_cache.shape[:3]:
        raise ValueError(f"k_cache {k_cache.shape} / v_cache {v_cache.shape} do not match q_t {q_t.shape}")
    if getattr(valid_mask, "shape", ()) != (B, S):
        raise ValueError(f"valid_mask must have shape [B={B}, S={S}], got {getattr(valid_mask, 'shape', ())}")
    scale = checks.resolve_scale(scale, D)
    qf, kf, vf = _f32(q_t, k_cache, v_cache)
    qf = qf.reshape(B, Hk, H // Hk, D)
    s = einsum("bhgd,bshd->bhgs", qf, kf) * scale
    s = jnp.where(valid_mask[:, None, None, :], s, -jnp.inf)
    p = jax.nn.softmax(s, axis=-1)
    o = einsum("bhgs,bshd->bhgd", p, vf)
    return o.reshape(B, H, -1).astype(v_cache.dtype)
