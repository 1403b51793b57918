"""The single place where mixer layers call sequence ops.

* :func:`linear` runs a linear-attention family (``linear_attn``, ``simple_gla``, ``gla``,
  ``delta_rule``, ``gated_delta_rule``) in chunk mode (training, prefill) or recurrent mode
  (decoding).  When :func:`parallelism.current_sequence_sharding` is set while tracing, chunk-mode
  calls go to ``parallelism.lasp2.lasp2(family, q, k, v, mesh=, axis_name=, chunk_size=, **op_kwargs)``.
* :func:`attention` runs causal softmax attention (``ops.attention``; optionally a sliding
  window, grouped-query heads, packed segments and padding), :func:`attention_step` one decoding
  token over a KV cache; under sequence sharding :func:`attention` calls
  ``parallelism.ring.sequence_parallel_attention(q, k, v, mesh=, axis_name=, mode=, window=, scale=)``.

Op kwargs passed through (as the ``chunk_*`` ops take them): ``g``, ``g_gamma``, ``beta``,
``scale``, ``normalize`` (linear_attn only), ``initial_state``, ``output_final_state``,
``initial_normalizer``, ``cu_seqlens``.  Layers L2-normalise q/k and form beta (including the
negative-eigenvalue ``2 sigmoid``) themselves, so ``use_qk_l2norm_in_kernel`` and
``allow_neg_eigval`` are never passed.
"""

from __future__ import annotations

import importlib

import jax.numpy as jnp

LINEAR_FAMILIES = ("linear_attn", "simple_gla", "gla", "delta_rule", "gated_delta_rule")


def _sequence_sharding():
    try:
        from parallelism import current_sequence_sharding
    except ImportError:  # pragma: no cover - parallelism is part of the package
        return None
    return current_sequence_sharding()


def _op(family: str, mode: str):
    """``ops.<family>.<mode>_<family>``."""
    return getattr(importlib.import_module(f"ops.{family}"), f"{mode}_{family}")


def linear(family: str, q, k, v, *, mode: str = "chunk", chunk_size: int = 64, **op_kwargs):
    """Runs ``family`` on ``q, k [B,T,H,K]``, ``v [B,T,H,V]``; returns ``(o, final_state)``.

    ``mode="chunk"`` for full sequences, ``"recurrent"`` for decoding steps.  ``None`` kwargs
    are dropped, so layers can pass optional arguments uniformly.
    """
    if family not in LINEAR_FAMILIES:
        raise ValueError(f"unknown linear family {family!r}; known {LINEAR_FAMILIES}")
    kw = {key: val for key, val in op_kwargs.items() if val is not None}
    if kw.get("normalize") is False:
        kw.pop("normalize")
    if kw.get("output_final_state") is False:
        kw.pop("output_final_state")
    sharding = _sequence_sharding() if mode == "chunk" else None
    if sharding is not None:
        from parallelism.lasp2 import lasp2  # written by the parallelism engineer
        return lasp2(family, q, k, v, mesh=sharding.mesh, axis_name=sharding.axis, chunk_size=chunk_size, **kw)
    if mode == "chunk":
        return _op(family, "chunk")(q, k, v, chunk_size=chunk_size, **kw)
    if mode == "recurrent":
        return _op(family, "recurrent")(q, k, v, **kw)
    raise ValueError(f"mode must be 'chunk' or 'recurrent', got {mode!r}")


def attention(q, k, v, *, scale: float | None = None, window: int | None = None,
              cu_seqlens=None, valid=None):
    """Causal softmax attention, ``q [B,T,H,D]``, ``k, v [B,T,Hkv,D]`` (Hkv divides H).

    ``window``: query i attends keys ``i - window < j <= i`` (``window`` keys including itself);
    ``cu_seqlens [N+1]``: packed sequences (B == 1), no attention across them; ``valid [B,T]``:
    padding keys are never attended (reference masked path, used for padded prompts).
    Otherwise runs ``ops.attention.softmax_attention`` / ``sliding_window_attention``
    (blockwise, memory O(T * block)).  Returns ``o [B,T,H,D]`` in v's dtype.
    """
    sharding = _sequence_sharding()
    if sharding is not None:
        if cu_seqlens is not None or valid is not None:
            raise ValueError("sequence-parallel attention does not support packed or padded batches")
        from parallelism.ring import sequence_parallel_attention  # written by the parallelism engineer
        return sequence_parallel_attention(q, k, v, mesh=sharding.mesh, axis_name=sharding.axis,
                                           mode=sharding.attention, window=window, scale=scale)
    if valid is None:
        from ops import attention as ops_attention
        block = min(128, q.shape[1])
        if window is None:
            return ops_attention.softmax_attention(q, k, v, scale, True, cu_seqlens, block_size=block)
        return ops_attention.sliding_window_attention(q, k, v, window, scale, cu_seqlens, block_size=block)
    T = q.shape[1]
    t = jnp.arange(T)
    mask = t[:, None] >= t[None, :]
    if window is not None:
        mask &= t[:, None] - t[None, :] < window
    mask = mask[None] & valid[:, None, :]
    if cu_seqlens is not None:
        seg = jnp.searchsorted(jnp.asarray(cu_seqlens, jnp.int32), t, side="right")
        mask = mask & (seg[:, None] == seg[None, :])[None]
    return masked_attention(q, k, v, mask, scale)


def attention_step(q, k_cache, v_cache, valid, scale: float | None = None):
    """One decoding token ``q [B,1,H,D]`` over a cache ``[B,S,Hkv,D]`` with ``valid [B,S]``."""
    from ops.attention import attention_step as step
    return step(q[:, 0], k_cache, v_cache, valid, scale)[:, None]


def masked_attention(q, k, v, mask, scale: float | None = None):
    """Reference attention with an explicit ``mask [B, Tq, Tk]`` (True = attend), float32 math.

    Rows with no allowed key return zeros.  Used for padded/packed batches and KV-cache decoding.
    """
    B, Tq, H, D = q.shape
    Hkv = k.shape[2]
    scale = D ** -0.5 if scale is None else scale
    qg = q.astype(jnp.float32).reshape(B, Tq, Hkv, H // Hkv, D)
    s = jnp.einsum("bqhgd,bkhd->bhgqk", qg * scale, k.astype(jnp.float32))
    m = mask[:, None, None]
    s = jnp.where(m, s, -jnp.inf)
    smax = jnp.max(s, axis=-1, keepdims=True)
    p = jnp.where(m, jnp.exp(s - jnp.where(jnp.isfinite(smax), smax, 0.0)), 0.0)
    p = p / jnp.maximum(jnp.sum(p, axis=-1, keepdims=True), 1e-30)
    o = jnp.einsum("bhgqk,bkhd->bqhgd", p, v.astype(jnp.float32))
    return o.reshape(B, Tq, H, D).astype(q.dtype)
