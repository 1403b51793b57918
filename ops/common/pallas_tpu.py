"""Mosaic (TPU) kernels of the chunk forms: forward, state recomputation, backward.

The grid is ``(rows·heads, value blocks, chunks)``; the chunk axis is sequential
(``"arbitrary"``) and the state ``Sᵀ [BV, K]`` lives in a VMEM scratch buffer across it.  The
per-chunk mathematics, shared with the GPU kernels, is :mod:`.kernel_math` for the diagonal decays
and :mod:`.delta_kernel_math` for the delta rules (``KernelSpec.family``).  Packing is in the
chunk plan (:mod:`.layout`): no chunk straddles two sequences, and three scalar-prefetched tables
``[R, NC]`` (first chunk, last chunk, sequence id) say where a sequence's initial state enters and
its final state leaves, which the block index maps of ``h0`` / ``final`` follow.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from .kernel_spec import KernelSpec, kernel_name, math_of, optional_outputs, out_struct


def _gate_specs(spec: KernelSpec, chunk_of):
    """Block specs of the extra per-chunk inputs (gate tables, the delta rules' step)."""
    C = spec.chunk_size
    specs = []
    for kind, width in spec.extra_inputs:
        if kind == "col":
            specs.append(pl.BlockSpec((None, C, width), lambda bh, iv, n, *t: (bh, chunk_of(n), 0)))
        else:
            specs.append(pl.BlockSpec((None, None, 1, C), lambda bh, iv, n, *t: (bh, chunk_of(n), 0, 0)))
    return specs


_SEMANTICS = ("parallel", "parallel", "arbitrary")     # rows·heads, value blocks, chunks (in order)


def _launch(kernel, spec: KernelSpec, grid, in_specs, out_specs, out_shape, tables, args, interpret, name: str):
    """One ``pallas_call`` over ``grid`` with the three chunk tables scalar-prefetched and the
    state ``[BV, K]`` in VMEM scratch."""
    grid_spec = pltpu.PrefetchScalarGridSpec(num_scalar_prefetch=3, grid=grid, in_specs=in_specs, out_specs=out_specs,
                                             scratch_shapes=[pltpu.VMEM((spec.block_v, spec.key_dim), jnp.float32)])
    params = pltpu.CompilerParams(dimension_semantics=_SEMANTICS)
    return pl.pallas_call(kernel, grid_spec=grid_spec, out_shape=out_shape, compiler_params=params,
                          interpret=_interpret(interpret), name=kernel_name(spec, name))(
        *tables, *args)


def _interpret(interpret):
    if interpret is True:
        return pltpu.InterpretParams()
    return interpret or False


@functools.partial(jax.jit, static_argnames=("spec", "store_states", "emit_output", "want_final", "interpret"))
def forward(q, k, v, gates, h0T, first, last, seq, *, spec: KernelSpec, store_states=False, emit_output=True,
            want_final=True, interpret=False):
    """``(o [BH, Tp, V] float32 or None, finalᵀ [N, H, V, K] or None, statesᵀ [BH, NC, V, K] or None)``."""
    Tp, K = q.shape[1:]
    BH = v.shape[0]
    V = v.shape[-1]
    C, H, BV, N = spec.chunk_size, spec.num_heads, spec.block_v, spec.num_seqs
    NC, NV = Tp // C, V // BV
    chunk_of = lambda n: n
    by_seq = lambda bh, iv, n, f, l, s: (s[jax.lax.div(bh, H), n], jax.lax.rem(bh, H), iv, 0)

    in_specs = [pl.BlockSpec((None, C, K), lambda bh, iv, n, *t: (spec.key_row(bh), n, 0)),
                pl.BlockSpec((None, C, K), lambda bh, iv, n, *t: (spec.key_row(bh), n, 0)),
                pl.BlockSpec((None, C, BV), lambda bh, iv, n, *t: (bh, n, iv))] + _gate_specs(spec, chunk_of)
    args = [q, k, v, *gates]
    if h0T is not None:
        in_specs.append(pl.BlockSpec((None, None, BV, K), by_seq))
        args.append(h0T)
    out_specs, out_shape = [], []
    if emit_output:
        out_specs.append(pl.BlockSpec((None, C, BV), lambda bh, iv, n, *t: (bh, n, iv)))
        out_shape.append(out_struct((BH, Tp, V), jnp.float32, q))
    if want_final:
        out_specs.append(pl.BlockSpec((None, None, BV, K), by_seq))
        out_shape.append(out_struct((N, H, V, K), jnp.float32, q))
    if store_states:
        out_specs.append(pl.BlockSpec((None, None, BV, K), lambda bh, iv, n, *t: (bh, n, iv, 0)))
        out_shape.append(out_struct((BH, NC, V, K), jnp.float32, q))
    n_gates, has_h0 = len(gates), h0T is not None

    def kernel(first_ref, last_ref, seq_ref, *refs):
        q_ref, k_ref, v_ref = refs[:3]
        gate_refs = refs[3:3 + n_gates]
        rest = list(refs[3 + n_gates:])
        h0_ref = rest.pop(0) if has_h0 else None
        o_ref = rest.pop(0) if emit_output else None
        final_ref = rest.pop(0) if want_final else None
        states_ref = rest.pop(0) if store_states else None
        (S_ref,) = rest
        bh, n = pl.program_id(0), pl.program_id(2)
        r = jax.lax.div(bh, H)

        @pl.when((n == 0) | (first_ref[r, n] == 1))
        def _():
            if h0_ref is None:
                S_ref[...] = jnp.zeros(S_ref.shape, jnp.float32)
            else:
                S_ref[...] = jnp.where(first_ref[r, n] == 1, h0_ref[...], 0.0)

        ST = S_ref[...]
        if states_ref is not None:
            states_ref[...] = ST
        math = math_of(spec)
        g = math.chunk_gates(spec.mode, [ref[...] for ref in gate_refs])
        if o_ref is not None:
            o, ST_next = math.chunk_forward(q_ref[...], k_ref[...], v_ref[...], g, ST, spec.mode, spec.sub_chunk_size,
                                          spec.products)
            o_ref[...] = o
        else:
            ST_next = math.chunk_state(k_ref[...], v_ref[...], g, ST, spec.products)
        S_ref[...] = ST_next
        if final_ref is not None:
            @pl.when(last_ref[r, n] == 1)
            def _():
                final_ref[...] = ST_next

    outs = _launch(kernel, spec, (BH, NV, NC), in_specs, out_specs, out_shape, (first, last, seq), args, interpret,
                   "fwd")
    return optional_outputs(outs, emit_output, want_final, store_states)


@functools.partial(jax.jit, static_argnames=("spec", "has_h0", "interpret"))
def backward(q, k, v, gates, do, statesT, dfinalT, first, last, seq, *, spec: KernelSpec, has_h0: bool,
             interpret=False):
    """``(dq [NV, BH, Tp, K], dk [NV, BH, Tp, K], dv [BH, Tp, V], dh0ᵀ [N, H, V, K] or None, extras)``
    float32; dq, dk and the ``spec.num_extra_grads`` extras ``[NV, BH, Tp, 1]`` are partial sums
    over value blocks."""
    Tp, K = q.shape[1:]
    BH = v.shape[0]
    V = v.shape[-1]
    C, H, BV, N = spec.chunk_size, spec.num_heads, spec.block_v, spec.num_seqs
    NC, NV = Tp // C, V // BV
    rev = lambda n: NC - 1 - n
    by_seq = lambda bh, iv, n, f, l, s: (s[jax.lax.div(bh, H), NC - 1 - n], jax.lax.rem(bh, H), iv, 0)

    in_specs = [pl.BlockSpec((None, C, K), lambda bh, iv, n, *t: (spec.key_row(bh), rev(n), 0)),
                pl.BlockSpec((None, C, K), lambda bh, iv, n, *t: (spec.key_row(bh), rev(n), 0)),
                pl.BlockSpec((None, C, BV), lambda bh, iv, n, *t: (bh, rev(n), iv))] + _gate_specs(spec, rev)
    in_specs += [pl.BlockSpec((None, C, BV), lambda bh, iv, n, *t: (bh, rev(n), iv)),
                 pl.BlockSpec((None, None, BV, K), lambda bh, iv, n, *t: (bh, rev(n), iv, 0))]
    args = [q, k, v, *gates, do, statesT]
    if dfinalT is not None:
        in_specs.append(pl.BlockSpec((None, None, BV, K), by_seq))
        args.append(dfinalT)
    out_specs = [pl.BlockSpec((None, None, C, K), lambda bh, iv, n, *t: (iv, bh, rev(n), 0)),
                 pl.BlockSpec((None, None, C, K), lambda bh, iv, n, *t: (iv, bh, rev(n), 0)),
                 pl.BlockSpec((None, C, BV), lambda bh, iv, n, *t: (bh, rev(n), iv))]
    out_shape = [out_struct((NV, BH, Tp, K), jnp.float32, q),
                 out_struct((NV, BH, Tp, K), jnp.float32, q),
                 out_struct((BH, Tp, V), jnp.float32, q)]
    if has_h0:
        out_specs.append(pl.BlockSpec((None, None, BV, K), by_seq))
        out_shape.append(out_struct((N, H, V, K), jnp.float32, q))
    n_extra = spec.num_extra_grads
    out_specs += [pl.BlockSpec((None, None, C, 1), lambda bh, iv, n, *t: (iv, bh, rev(n), 0))] * n_extra
    out_shape += [out_struct((NV, BH, Tp, 1), jnp.float32, q)] * n_extra
    n_gates, has_dfinal = len(gates), dfinalT is not None

    def kernel(first_ref, last_ref, seq_ref, *refs):
        q_ref, k_ref, v_ref = refs[:3]
        gate_refs = refs[3:3 + n_gates]
        rest = list(refs[3 + n_gates:])
        do_ref, states_ref = rest.pop(0), rest.pop(0)
        dfinal_ref = rest.pop(0) if has_dfinal else None
        dq_ref, dk_ref, dv_ref = rest.pop(0), rest.pop(0), rest.pop(0)
        dh0_ref = rest.pop(0) if has_h0 else None
        extra_refs, (dS_ref,) = rest[:n_extra], rest[n_extra:]
        bh, i = pl.program_id(0), pl.program_id(2)
        r, n = jax.lax.div(bh, H), NC - 1 - i

        @pl.when((i == 0) | (last_ref[r, n] == 1))
        def _():
            if dfinal_ref is None:
                dS_ref[...] = jnp.zeros(dS_ref.shape, jnp.float32)
            else:
                dS_ref[...] = jnp.where(last_ref[r, n] == 1, dfinal_ref[...], 0.0)

        math = math_of(spec)
        g = math.chunk_gates(spec.mode, [ref[...] for ref in gate_refs])
        dq, dk, dv, dS_prev, extras = math.chunk_backward(q_ref[...], k_ref[...], v_ref[...], do_ref[...], g,
                                                          states_ref[...], dS_ref[...], spec.mode, spec.sub_chunk_size,
                                                          spec.products)
        dq_ref[...] = dq
        dk_ref[...] = dk
        dv_ref[...] = dv
        for ref, value in zip(extra_refs, extras):
            ref[...] = value
        dS_ref[...] = dS_prev
        if dh0_ref is not None:
            @pl.when(first_ref[r, n] == 1)
            def _():
                dh0_ref[...] = dS_prev

    outs = _launch(kernel, spec, (BH, NV, NC), in_specs, out_specs, out_shape, (first, last, seq), args, interpret,
                   "bwd")
    dq, dk, dv, dh0T = optional_outputs(outs[:len(outs) - n_extra], True, True, True, has_h0)
    return dq, dk, dv, dh0T, tuple(outs[len(outs) - n_extra:])
