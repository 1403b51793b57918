"""The Pallas path of the diagonal-decay chunk form: kernel layout, custom VJP and dispatch.

:func:`chunk_diagonal_pallas` is the kernel counterpart of :func:`.diagonal.chunk_diagonal`: it
takes the same :class:`~.prepare.Inputs` and returns the same ``(o, final)``.  Around the kernels
(:mod:`.pallas_tpu`, :mod:`.pallas_gpu`) it does, in XLA:

* the layout: the chunk plan puts every sequence on chunk boundaries, then rows become
  ``[rows·heads, chunks·C, D]`` so each kernel program reads contiguous chunks of one head;
* for a per-head gate, the in-chunk cumulative decay (a column and a row per chunk, tiny);
* the gate gradient, from the kernels' ``dq`` and ``dk``: the decay from token j to token i
  enters only as ``exp(G_i - G_j)``, so ``dL/dG_t = q_t ⊙ dq_t - k_t ⊙ dk_t`` and ``dL/dg_t``
  is its sum over the tokens at and after t of the same sequence, plus ``Σ_v S_T ⊙ dS_T`` from
  the final state (which depends on every gate of its sequence); resets get 0.

Forward: one sequential kernel, nothing stored but the inputs.  Backward: one pass recomputes the
state entering every chunk (``[rows·heads, chunks, V, K]``, linear in T), one reverse pass
computes ``dq, dk, dv`` and the initial state's gradient.

The layout helpers, the kernel spec, the tuning and interpreter contexts and the dispatch
(:func:`chunk_diagonal_dispatch` with a ``runner``) are shared with the delta rules'
kernels (:mod:`.delta_kernels`).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp

from . import decay
from .kernel_spec import DEFAULT_TUNING, KernelSpec, KernelTuning
from .layout import from_chunk_major, make_chunk_plan, to_chunk_major
from .prepare import Inputs
from .scan import vary_like

Array = jax.Array

IMPLEMENTATIONS = ("xla", "pallas")
SUPPORTED_DIMS = (16, 32, 64, 128, 256)
SUPPORTED_DTYPES = ("float32", "bfloat16")


_OFF_DEVICE = contextvars.ContextVar("lolax_off_device_kernels", default=("tpu", True))
_TUNING = contextvars.ContextVar("lolax_kernel_tuning", default=DEFAULT_TUNING)


@contextlib.contextmanager
def kernel_tuning(platform: str, **choices):
    """Overrides the kernels' launch choices (:class:`~.kernel_spec.KernelTuning`) on
    ``platform`` (``"tpu"`` or ``"gpu"``) for the ops *traced* inside the block.

    The choice is read when an op is traced, like any Python-level setting: a function jitted and
    traced before (or outside) the block keeps the program it compiled then.  Trace a fresh
    function inside the block to compare choices.

    >>> import jax
    >>> from lolax.ops import chunk_gla
    >>> q, k, v = jax.random.normal(jax.random.key(0), (3, 1, 32, 1, 16))
    >>> with kernel_tuning("gpu", block_v=32, num_warps=8, schedule="fused"):
    ...     o, _ = jax.jit(chunk_gla)(q, k, v, jax.nn.log_sigmoid(q))    # traced (and compiled) here
    ...     current_tuning("gpu").schedule
    'fused'
    >>> current_tuning("gpu").schedule
    'two_phase'
    """
    current = dict(_TUNING.get())
    current[platform] = dataclasses.replace(current_tuning(platform), **choices)
    token = _TUNING.set(current)
    try:
        yield
    finally:
        _TUNING.reset(token)


@contextlib.contextmanager
def interpret_kernels(backend: str = "tpu", params=True):
    """Which kernels ``implementation="pallas"`` interprets on a machine without a TPU or GPU.

    ``backend="tpu"`` (the default) runs the Mosaic kernels in Pallas' TPU interpreter, with
    ``params`` a ``pltpu.InterpretParams`` (e.g. ``uninitialized_memory="nan", detect_races=True``
    to catch reads of unwritten memory and races) or True for the defaults; ``backend="gpu"``
    runs the Triton kernels in the generic interpreter.  For debugging kernels on CPU:

    >>> import jax
    >>> from lolax.ops import chunk_simple_gla
    >>> q, k, v = jax.random.normal(jax.random.key(0), (3, 1, 20, 1, 16))
    >>> with interpret_kernels("gpu"):
    ...     o, _ = chunk_simple_gla(q, k, v, implementation="pallas")
    >>> o.shape
    (1, 20, 1, 16)
    """
    if backend not in ("tpu", "gpu"):
        raise ValueError(f"backend must be 'tpu' or 'gpu', got {backend!r}")
    token = _OFF_DEVICE.set((backend, True if backend == "gpu" else params))
    try:
        yield
    finally:
        _OFF_DEVICE.reset(token)


def current_tuning(platform: str) -> KernelTuning:
    """The launch choices in effect on ``platform`` (``"tpu"`` or ``"gpu"``) here and now."""
    if platform not in DEFAULT_TUNING:
        raise ValueError(f"platform must be one of {sorted(DEFAULT_TUNING)}, got {platform!r}")
    return _TUNING.get()[platform]


def check_implementation(implementation) -> str | None:
    if implementation is not None and implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation must be None, 'xla' or 'pallas', got {implementation!r}")
    return implementation


def unsupported(x: Inputs, chunk_size: int, sub_chunk_size: int) -> str | None:
    """Why the kernels cannot run these inputs (a phrase naming the argument), or None."""
    K, V = x.k.shape[-1], x.v.shape[-1]
    if K not in SUPPORTED_DIMS:
        return f"q/k with key dimension K = {K} (supported: {SUPPORTED_DIMS})"
    if V not in SUPPORTED_DIMS:
        return f"v with value dimension V = {V} (supported: {SUPPORTED_DIMS})"
    if jnp.dtype(x.out_dtype).name not in SUPPORTED_DTYPES:
        return f"inputs of dtype {jnp.dtype(x.out_dtype).name} (supported: {SUPPORTED_DTYPES})"
    if chunk_size not in (16, 32, 64, 128):
        return f"chunk_size = {chunk_size} (supported: 16, 32, 64, 128)"
    if sub_chunk_size not in (8, 16, 32) or chunk_size % sub_chunk_size:
        return f"sub_chunk_size = {sub_chunk_size} (supported: 8, 16 or 32, dividing chunk_size)"
    return None


def kernel_chunk_size(T: int, chunk_size: int, sub_chunk_size: int) -> int:
    """A power-of-two chunk of at least 16 and one sub-chunk, at most ``chunk_size``, covering short inputs."""
    C = max(16, sub_chunk_size)
    while C < min(T, chunk_size):
        C *= 2
    return min(C, chunk_size)


def to_rows(a: Array, plan) -> Array:
    """``[R, T, H, ...]`` -> ``[R·H, NC·C, ...]``: each sequence chunk-aligned in its row."""
    xc = to_chunk_major(a, plan)                                   # [NC, R, H, C, ...]
    NC, R, H, C = xc.shape[:4]
    xc = jnp.moveaxis(xc, 0, 2)                                    # [R, H, NC, C, ...]
    return xc.reshape((R * H, NC * C) + xc.shape[4:])


def from_rows(a: Array, plan, H: int) -> Array:
    R, NC, C = plan.index.shape
    xc = a.reshape((R, H, NC, C) + a.shape[2:])
    return from_chunk_major(jnp.moveaxis(xc, 2, 0), plan)


def head_gate_tables(g_rows: Array, C: int):
    """Per-head gate ``[R·H, Tp]`` -> its in-chunk sums ``(G, R)`` as columns ``[R·H, Tp, 1]`` and
    rows ``[R·H, NC, 1, C]``."""
    BH, Tp = g_rows.shape
    G, R = decay.chunk_log_decay(g_rows.reshape(BH, Tp // C, C), -1)
    col = lambda a: a.reshape(BH, Tp, 1)
    row = lambda a: a.reshape(BH, Tp // C, 1, C)
    return [col(G), col(R), row(G), row(R)]


def _segment_suffix(tot: Array, last: Array) -> Array:
    """For each chunk, the sum of ``tot`` over the later chunks of its sequence.  ``tot [BH, NC, ...]``,
    ``last [BH, NC]`` bool (the chunk closes its sequence)."""
    flags = last.reshape(last.shape + (1,) * (tot.ndim - 2))

    def combine(a, b):                                           # a precedes b in the reversed order
        fa, va = a
        fb, vb = b
        return fa | fb, jnp.where(fb, vb, va + vb)

    rev = lambda x: jnp.flip(x, 1)
    _, inclusive = jax.lax.associative_scan(combine, (rev(jnp.broadcast_to(flags, tot.shape)), rev(tot)), axis=1)
    inclusive = rev(inclusive)                                     # sum from this chunk to its sequence end
    later = jnp.concatenate([inclusive[:, 1:], jnp.zeros_like(inclusive[:, :1])], axis=1)
    return jnp.where(flags, 0.0, later)


def unvisited_to_zero(dh0T: Array | None, first: Array, seq: Array, num_seqs: int) -> Array | None:
    """The initial states' gradient with the slots of sequences that own no chunk (empty ones,
    whose slot no kernel program wrote) set to zero."""
    if dh0T is None:
        return None
    starts = jnp.where(first == 1, seq, num_seqs).reshape(-1)
    visited = jnp.zeros((num_seqs,), bool).at[starts].set(True, mode="drop")
    return jnp.where(visited[:, None, None, None], dh0T, 0.0)


def empty_keep_initial(x: Inputs, final: Array) -> Array:
    """Final states with those of empty packed sequences reset to their initial state."""
    if x.cu_seqlens is None:
        return final
    empty = (x.cu_seqlens[1:] == x.cu_seqlens[:-1])[:, None, None, None]
    start = jnp.zeros_like(final) if x.initial_state is None else x.initial_state
    return jnp.where(empty, start, final)


def kernel_spec(x: Inputs, mode, chunk_size: int, sub_chunk_size: int, platform: str, tuning: KernelTuning | None,
                block_v: int | None, family: str = "diagonal"):
    """``(spec, plan, compute dtype)`` of a kernel call on ``x``."""
    B, T, H, K = x.k.shape
    HV, V = x.v.shape[2:]
    C = kernel_chunk_size(T, chunk_size, sub_chunk_size)
    tuning = tuning or DEFAULT_TUNING[platform]
    compute = jnp.bfloat16 if jnp.dtype(x.out_dtype) == jnp.bfloat16 else jnp.float32
    spec = KernelSpec(mode=mode, chunk_size=C, sub_chunk_size=min(sub_chunk_size, C),
                      block_v=min(V, block_v or tuning.block_v), num_heads=HV, num_seqs=x.num_seqs, key_dim=K,
                      num_warps=tuning.num_warps, num_stages=tuning.num_stages,
                      schedule=tuning.schedule if platform == "gpu" else "fused",
                      products="f32" if compute == jnp.float32 else "bf16_split" if tuning.split_bf16 else "bf16",
                      family=family, key_group=HV // H)
    return spec, make_chunk_plan(B, T, C, x.cu_seqlens), compute


def same_variance(*arrays):
    """The arrays (None kept) each typed varying over every mesh axis any of them varies over."""
    return tuple(None if a is None else vary_like(a, [b for b in arrays if b is not None]) for a in arrays)


def plan_tables(plan, N: int, like: Array):
    """The chunk plan's ``first, last, seq`` tables as int32 kernel operands (inside shard_map
    every kernel operand must vary over the mesh axes the tokens vary over)."""
    as_int = lambda a: vary_like(a.astype(jnp.int32), like)
    return as_int(plan.first), as_int(plan.last), as_int(jnp.minimum(plan.seq, N - 1))


def _gate_grad(mode, q, k, dq, dk, g_rows, finalT, dfinalT, last_rows, seq_rows, H: int, C: int):
    """``dL/dg`` in the kernel layout (see the module docstring)."""
    BH, Tp, K = q.shape
    NC = Tp // C
    x = (q.astype(jnp.float32) * dq - k.astype(jnp.float32) * dk).reshape(BH, NC, C, K)
    x = jax.lax.cumsum(x, axis=2, reverse=True)                     # suffix within the chunk
    term = jnp.sum(finalT * dfinalT, axis=-2)                      # [N, H, K]
    heads = jnp.arange(BH) % H
    at_last = jnp.where(last_rows[..., None], term[seq_rows, heads[:, None]], 0.0)   # [BH, NC, K]
    tot = x[:, :, 0] + at_last
    dG = x + (at_last + _segment_suffix(tot, last_rows))[:, :, None]
    dG = dG.reshape(BH, Tp, K)
    if mode == "head":
        dG = jnp.sum(dG, axis=-1)
    return jnp.where(g_rows < decay.RESET_LOG_DECAY, 0.0, dG)


def backend_module(platform: str):
    if platform == "tpu":
        from . import pallas_tpu
        return pallas_tpu
    from . import pallas_gpu
    return pallas_gpu


@functools.partial(jax.custom_vjp, nondiff_argnums=(8, 9, 10))
def _kernel_op(q, k, v, g, h0T, first, last, seq, spec: KernelSpec, platform: str, interpret):
    o, finalT, _ = _forward(q, k, v, g, h0T, first, last, seq, spec, platform, interpret)
    return o, finalT


def _gates(spec: KernelSpec, g):
    if spec.mode is None:
        return []
    if spec.mode == "head":
        return head_gate_tables(g, spec.chunk_size)
    return [g]


def _forward(q, k, v, g, h0T, first, last, seq, spec, platform, interpret, **kw):
    return backend_module(platform).forward(q, k, v, _gates(spec, g), h0T, first, last, seq, spec=spec,
                                            interpret=interpret, **kw)


def _kernel_op_fwd(q, k, v, g, h0T, first, last, seq, spec, platform, interpret):
    o, finalT, _ = _forward(q, k, v, g, h0T, first, last, seq, spec, platform, interpret)
    return (o, finalT), (q, k, v, g, h0T, first, last, seq, finalT)


def _kernel_op_bwd(spec, platform, interpret, res, cts):
    q, k, v, g, h0T, first, last, seq, finalT = res
    do, dfinalT = cts
    backend = backend_module(platform)
    gates = _gates(spec, g)
    _, _, statesT = backend.forward(q, k, v, gates, h0T, first, last, seq, spec=spec, store_states=True,
                                    emit_output=False, want_final=False, interpret=interpret)
    dq, dk, dv, dh0T, _ = backend.backward(q, k, v, gates, do.astype(v.dtype), statesT, dfinalT, first, last, seq,
                                           spec=spec, has_h0=h0T is not None, interpret=interpret)
    dq, dk = jnp.sum(dq, axis=0), jnp.sum(dk, axis=0)
    dh0T = unvisited_to_zero(dh0T, first, seq, spec.num_seqs)
    dg = None
    if spec.mode is not None:
        H, C = spec.num_heads, spec.chunk_size
        rows = jnp.repeat(jnp.arange(first.shape[0]), H)
        dg = _gate_grad(spec.mode, q, k, dq, dk, g, finalT, dfinalT, last[rows] == 1, seq[rows], H, C)
    return (dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), dg, dh0T, None, None, None)


_kernel_op.defvjp(_kernel_op_fwd, _kernel_op_bwd)


def run_kernels(x: Inputs, mode, chunk_size: int, sub_chunk_size: int, platform: str, interpret=False,
                tuning: KernelTuning | None = None, block_v: int | None = None):
    """The diagonal chunk form through the ``platform`` kernels (``"tpu"`` or ``"gpu"``).

    Returns ``(o [B, T, H, V] float32, final [N, H, K, V] float32)`` like
    :func:`.diagonal.chunk_diagonal`.
    """
    H = x.k.shape[2]
    spec, plan, compute = kernel_spec(x, mode, chunk_size, sub_chunk_size, platform, tuning, block_v)
    q, k, v = (to_rows(a.astype(compute), plan) for a in (x.q, x.k, x.v))
    gate = x.g if mode == "head" else x.gk if mode == "key" else None
    g = None if gate is None else to_rows(gate, plan)
    q, k, v, g = same_variance(q, k, v, g)
    h0T = None if x.initial_state is None else vary_like(jnp.swapaxes(x.initial_state, -1, -2), q)
    first, last, seq = plan_tables(plan, x.num_seqs, q)
    o, finalT = _kernel_op(q, k, v, g, h0T, first, last, seq, spec, platform, interpret)
    final = empty_keep_initial(x, jnp.swapaxes(finalT, -1, -2))
    return from_rows(o, plan, H), final


def chunk_diagonal_dispatch(x: Inputs, mode, chunk_size: int, sub_chunk_size: int, implementation,
                            xla: Callable[..., Any], xla_args: tuple = (), after_kernels: Callable | None = None,
                            extra=(), with_extra: bool = False, runner: Callable | None = None):
    """The diagonal chunk form (or, with ``runner``, another kernel family) through XLA or through
    the Pallas kernels.

    Args:
      x: the prepared inputs the kernels run on.
      mode: the gate mode (``None``, ``"head"``, ``"key"``).
      chunk_size, sub_chunk_size: the op's (the kernels may use a shorter chunk for short inputs).
      implementation: ``"xla"``; ``"pallas"`` (the kernels on TPU and GPU, elsewhere the kernels
        :func:`interpret_kernels` names, by default the TPU ones, interpreted; unsupported inputs
        raise ``ValueError``); None (the kernels on TPU and on CUDA GPUs when they support the
        inputs, XLA otherwise).
      xla: ``xla(x, *xla_args) -> result`` through the XLA chunk form (a module-level function:
        with ``xla_args`` it is a static argument of the compiled dispatch); with ``extra``,
        ``xla(x, extra, *xla_args)``.
      after_kernels: ``after_kernels(x, extra, o, final) -> result`` applied to the kernels' output
        (module-level; default: ``(o, final)``).
      extra, with_extra: with ``with_extra``, arrays (a pytree, possibly None) both paths need
        besides ``x``.
      runner: ``runner(x, mode, chunk_size, sub_chunk_size, platform, interpret=, tuning=) ->
        (o, final)`` runs the kernels (module-level; default :func:`run_kernels`).

    The platform is chosen when the program is lowered (``jax.lax.platform_dependent``), so a
    program exported for TPU or CUDA from a CPU machine carries that platform's kernels.
    """
    check_implementation(implementation)
    on_xla = (lambda: xla(x, extra, *xla_args)) if with_extra else (lambda: xla(x, *xla_args))
    if implementation == "xla":
        return on_xla()
    reason = unsupported(x, chunk_size, sub_chunk_size)
    if reason is not None:
        if implementation == "pallas":
            raise ValueError(f"implementation='pallas' does not support {reason}; "
                             "use implementation='xla' (or None to fall back automatically)")
        return on_xla()
    return _dispatch(tuple(x[:9]), tuple(x[9:]), extra, with_extra, mode, chunk_size, sub_chunk_size,
                     implementation, xla, xla_args, after_kernels, _OFF_DEVICE.get(),
                     tuple(sorted(_TUNING.get().items())), runner or run_kernels)


def _kernel_result(x, extra, o, final):
    return o, final


# Compiled as a whole so that eager calls trace the platform branches once, not on every call.
@functools.partial(jax.jit, static_argnums=(1,) + tuple(range(3, 14)))
def _dispatch(arrays, statics, extra, with_extra, mode, chunk_size, sub_chunk_size, implementation, xla, xla_args,
              after_kernels, off_device, tuning, runner):
    x = Inputs(*arrays, *statics)
    after = after_kernels or _kernel_result
    tuning = dict(tuning)

    def kernels(platform: str, interpret=False):
        return lambda: after(x, extra, *runner(x, mode, chunk_size, sub_chunk_size, platform,
                                               interpret=interpret, tuning=tuning[platform]))

    on_xla = (lambda: xla(x, extra, *xla_args)) if with_extra else (lambda: xla(x, *xla_args))
    if implementation is None:
        return jax.lax.platform_dependent(cuda=kernels("gpu"), tpu=kernels("tpu"), default=on_xla)
    return jax.lax.platform_dependent(cuda=kernels("gpu"), rocm=kernels("gpu"), tpu=kernels("tpu"),
                                      default=kernels(*off_device))
