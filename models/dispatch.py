"""The single place where mixer layers call sequence ops.

* :func:`linear` runs a linear-attention family (``linear_attn``, ``simple_gla``, ``gla``,
  ``delta_rule``, ``gated_delta_rule``) in its ``chunk`` form (training, prefill) or its
  ``fused_recurrent`` form (decoding), through :func:`lolax.ops.get_op`.
* :func:`attention` runs causal softmax attention (``lolax.ops.attention``; optionally a sliding
  window, grouped-query heads, packed segments and padding), :func:`attention_step` one decoding
  token over a KV cache.

**Sequence parallelism** comes from JAX's own mesh context.  When a layer is traced under
``jax.set_mesh(mesh)`` and that mesh has an axis named ``sequence`` (:data:`SEQUENCE_AXIS`) of
size > 1, chunk-mode calls run LASP-2 (:func:`lolax.parallelism.lasp2.lasp2`) and softmax
attention runs ring, Ulysses or all-gather attention
(:func:`lolax.parallelism.ring.sequence_parallel_attention`, mode chosen by the layer).  The mesh
is part of ``jax.jit``'s trace context, so a function traced with and without a mesh gets two
traces, never a stale one.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ..ops import FAMILIES, PALLAS_FAMILIES, get_op
from ..ops import attention as ops_attention
from ..parallelism.lasp2 import lasp2
from ..parallelism.ring import sequence_parallel_attention

SEQUENCE_AXIS = "sequence"
"""The mesh axis that shards the sequence."""


def sequence_mesh() -> jax.sharding.AbstractMesh | None:
    """The current mesh (``jax.set_mesh``) when it shards the sequence, else None."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or SEQUENCE_AXIS not in mesh.axis_names or mesh.shape[SEQUENCE_AXIS] == 1:
        return None
    return mesh


def linear(family: str, q, k, v, *, form: str = "chunk", chunk_size: int = 64, implementation: str | None = None,
           **op_kwargs):
    """Runs ``family`` on ``q, k [B, T, H, K]``, ``v [B, T, HV, V]``; returns ``(o, final_state)``.

    ``form="chunk"`` for full sequences, ``"fused_recurrent"`` for decoding steps.  ``None``
    kwargs are dropped, so layers can pass optional arguments uniformly.  ``implementation``
    (``None``, ``"xla"``, ``"pallas"``) reaches the chunk ops of the families with Pallas kernels
    (:data:`lolax.ops.PALLAS_FAMILIES`); the others always run XLA.
    """
    if family not in FAMILIES:
        raise ValueError(f"unknown linear family {family!r}; known {FAMILIES}")
    kw = {key: val for key, val in op_kwargs.items() if val is not None}
    if form == "chunk" and implementation is not None and family in PALLAS_FAMILIES:
        kw["implementation"] = implementation
    if form == "chunk":
        mesh = sequence_mesh()
        if mesh is not None:
            return lasp2(family, q, k, v, mesh=mesh, axis_name=SEQUENCE_AXIS, chunk_size=chunk_size, **kw)
        return get_op(family, "chunk")(q, k, v, chunk_size=chunk_size, **kw)
    if form == "fused_recurrent":
        if family == "gla" and "g" in kw:             # fused_recurrent_gla names its key decay gk
            kw["gk"] = kw.pop("g")
        return get_op(family, "fused_recurrent")(q, k, v, **kw)
    raise ValueError(f"form must be 'chunk' or 'fused_recurrent', got {form!r}")


def attention(q, k, v, *, scale: float | None = None, window: int | None = None, cu_seqlens=None, valid=None,
              sequence_mode: str = "ring", implementation: str | None = None):
    """Causal softmax attention, ``q [B, T, H, D]``, ``k, v [B, T, Hkv, D]`` (Hkv divides H).

    ``window``: query i attends keys ``i - window < j <= i`` (``window`` keys including itself);
    ``cu_seqlens [N + 1]``: packed sequences (B == 1), no attention across them; ``valid [B, T]``:
    padding keys are never attended (reference masked path, used for padded prompts);
    ``sequence_mode``: how keys and values travel when the sequence is sharded (``ring``,
    ``ulysses`` or ``allgather``).  Otherwise (no sequence mesh, no padding) runs
    :func:`lolax.ops.attention.attention` with ``implementation`` (``None``: cuDNN on CUDA GPUs
    and splash on TPUs when they take the inputs, the blockwise XLA form otherwise; ``"xla"``;
    ``"pallas"``: the vendor kernel or an error).  Returns ``o [B, T, H, D]`` in q's dtype.
    """
    mesh = sequence_mesh()
    if mesh is not None:
        if cu_seqlens is not None or valid is not None:
            raise ValueError("sequence-parallel attention does not support packed or padded batches")
        return sequence_parallel_attention(q, k, v, mesh=mesh, axis_name=SEQUENCE_AXIS, mode=sequence_mode,
                                           window=window, scale=scale)
    if valid is None:
        return ops_attention.attention(q, k, v, scale=scale, window=window, cu_seqlens=cu_seqlens,
                                       implementation=implementation)
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
    """One decoding token ``q [B, 1, H, D]`` over a cache ``[B, S, Hkv, D]`` with ``valid [B, S]``."""
    return ops_attention.attention_step(q[:, 0], k_cache, v_cache, valid, scale)[:, None]


def masked_attention(q, k, v, mask, scale: float | None = None):
    """Reference attention with an explicit ``mask [B, Tq, Tk]`` (True = attend), float32 math.

    Rows with no allowed key return zeros.  Used for padded/packed batches and KV-cache decoding.
    """
    B, Tq, H, D = q.shape
    Hkv = k.shape[2]
    scale = D ** -0.5 if scale is None else scale
    hi = jax.lax.Precision.HIGHEST
    qg = q.astype(jnp.float32).reshape(B, Tq, Hkv, H // Hkv, D)
    s = jnp.einsum("bqhgd,bkhd->bhgqk", qg * scale, k.astype(jnp.float32), precision=hi)
    m = mask[:, None, None]
    s = jnp.where(m, s, -jnp.inf)
    smax = jnp.max(s, axis=-1, keepdims=True)
    p = jnp.where(m, jnp.exp(s - jnp.where(jnp.isfinite(smax), smax, 0.0)), 0.0)
    p = p / jnp.maximum(jnp.sum(p, axis=-1, keepdims=True), 1e-30)
    o = jnp.einsum("bhgqk,bkhd->bqhgd", p, v.astype(jnp.float32), precision=hi)
    return o.reshape(B, Tq, H, D).astype(q.dtype)
