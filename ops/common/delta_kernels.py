"""The Pallas path of the delta rules' chunk form (DeltaNet, Gated DeltaNet): custom VJP and runner.

:func:`run_delta_kernels` is the kernel counterpart of :func:`.delta.chunk_delta`: same
:class:`~.prepare.Inputs`, same ``(o, final)``.  It reuses the diagonal families' kernel layout
(:mod:`.diagonal_kernels`: rows ``[rows·heads, chunks·C, D]`` on the chunk plan, the plan tables,
the dispatch) and backends (:mod:`.pallas_tpu`, :mod:`.pallas_gpu`), with the per-chunk
mathematics of :mod:`.delta_kernel_math`: the WY/UT transform, its triangular inverse included,
runs inside the kernels, forward and backward.

Around the kernels, in XLA: the layout, the head gate's in-chunk sums (a column and a row per
chunk), and the gate's gradient from the kernels' ``dG`` (the gradient of the in-chunk
cumulative log decay), a reverse cumulative sum inside each chunk; resets get 0.  The step
``beta`` (after ``use_beta_sigmoid_in_kernel`` / ``allow_neg_eigval``), the L2 normalisation of
q and k and the grouped value heads are applied before, by :func:`.prepare.prepare`, and
differentiated by XLA; q and k are not repeated over grouped value heads (the kernels read each
value head's key head).

Forward: one sequential kernel.  Backward: one pass recomputes the state entering every chunk
(``[rows·heads, chunks, V, K]``, linear in T), one reverse pass computes ``dq, dk, dv, dβ, dG``
and the initial states' gradient.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from . import decay
from .diagonal_kernels import (
    backend_module,
    empty_keep_initial,
    from_rows,
    head_gate_tables,
    kernel_spec,
    plan_tables,
    same_variance,
    to_rows,
    unvisited_to_zero,
)
from .kernel_spec import KernelSpec, KernelTuning
from .prepare import Inputs
from .scan import vary_like

Array = jax.Array


def _extras(spec: KernelSpec, g, beta) -> list:
    tables = head_gate_tables(g, spec.chunk_size) if spec.mode == "head" else []
    return tables + [beta[..., None]]


def _forward(q, k, v, g, beta, h0T, first, last, seq, spec, platform, interpret, **kw):
    return backend_module(platform).forward(q, k, v, _extras(spec, g, beta), h0T, first, last, seq, spec=spec,
                                            interpret=interpret, **kw)


@functools.partial(jax.custom_vjp, nondiff_argnums=(9, 10, 11))
def _delta_op(q, k, v, g, beta, h0T, first, last, seq, spec: KernelSpec, platform: str, interpret):
    o, finalT, _ = _forward(q, k, v, g, beta, h0T, first, last, seq, spec, platform, interpret)
    return o, finalT


def _delta_op_fwd(q, k, v, g, beta, h0T, first, last, seq, spec, platform, interpret):
    o, finalT, _ = _forward(q, k, v, g, beta, h0T, first, last, seq, spec, platform, interpret)
    return (o, finalT), (q, k, v, g, beta, h0T, first, last, seq)


def _delta_op_bwd(spec, platform, interpret, res, cts):
    q, k, v, g, beta, h0T, first, last, seq = res
    do, dfinalT = cts
    backend = backend_module(platform)
    extras = _extras(spec, g, beta)
    _, _, statesT = backend.forward(q, k, v, extras, h0T, first, last, seq, spec=spec, store_states=True,
                                    emit_output=False, want_final=False, interpret=interpret)
    dq, dk, dv, dh0T, grads = backend.backward(q, k, v, extras, do.astype(v.dtype), statesT, dfinalT, first, last,
                                               seq, spec=spec, has_h0=h0T is not None, interpret=interpret)
    # partial over value blocks, and per value head: a key head's gradient sums its group's
    group = lambda d: jnp.sum(d, axis=0).reshape((q.shape[0], spec.key_group) + q.shape[1:]).sum(axis=1)
    dq, dk = group(dq), group(dk)
    dbeta = jnp.sum(grads[0], axis=0)[..., 0]
    dg = None
    if spec.mode == "head":
        BH, Tp = g.shape
        C = spec.chunk_size
        dG = jnp.sum(grads[1], axis=0)[..., 0].reshape(BH, Tp // C, C)
        dg = jax.lax.cumsum(dG, axis=2, reverse=True).reshape(BH, Tp)    # g_t enters G_i for i >= t
        dg = jnp.where(g < decay.RESET_LOG_DECAY, 0.0, dg)
    dh0T = unvisited_to_zero(dh0T, first, seq, spec.num_seqs)
    return (dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), dg, dbeta, dh0T, None, None, None)


_delta_op.defvjp(_delta_op_fwd, _delta_op_bwd)


def run_delta_kernels(x: Inputs, mode, chunk_size: int, sub_chunk_size: int, platform: str, interpret=False,
                      tuning: KernelTuning | None = None, block_v: int | None = None):
    """The delta rules' chunk form through the ``platform`` kernels (``"tpu"`` or ``"gpu"``).

    ``mode``: None (DeltaNet) or ``"head"`` (Gated DeltaNet, ``x.g``).  With grouped value heads
    q and k may come unrepeated (``prepare(..., repeat_key_heads=False)``): each kernel program
    reads its key head, and the key heads' gradients sum over their groups.  Returns
    ``(o [B, T, HV, V] float32, final [N, HV, K, V] float32)`` like :func:`.delta.chunk_delta`.
    """
    HV = x.v.shape[2]
    spec, plan, compute = kernel_spec(x, mode, chunk_size, sub_chunk_size, platform, tuning, block_v, "delta")
    q, k, v = (to_rows(a.astype(compute), plan) for a in (x.q, x.k, x.v))
    g = None if mode is None else to_rows(x.g, plan)
    beta = to_rows(x.beta, plan)
    # inside shard_map the custom VJP needs every operand typed varying alike (a constant, such as
    # LASP-2's zero values, would otherwise get a varying cotangent)
    q, k, v, g, beta = same_variance(q, k, v, g, beta)
    h0T = None if x.initial_state is None else vary_like(jnp.swapaxes(x.initial_state, -1, -2), q)
    first, last, seq = plan_tables(plan, x.num_seqs, q)
    o, finalT = _delta_op(q, k, v, g, beta, h0T, first, last, seq, spec, platform, interpret)
    final = empty_keep_initial(x, jnp.swapaxes(finalT, -1, -2))
    return from_rows(o, plan, HV), final
