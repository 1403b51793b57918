"""Triton (GPU) kernels of the chunk forms: forward, state recomputation, backward.

Triton programs of one launch run concurrently, so a sequential chunk axis cannot be a grid axis
as on TPU: one program per (row·head, value block) walks its chunks in a ``fori_loop`` with the
state ``Sᵀ [BV, K]`` in registers.  Two schedules (``KernelSpec.schedule``):

* ``"fused"``: that sequential walk computes everything (outputs, or all gradients), as on TPU;
  only ``rows·heads·value blocks`` programs run, which can leave a large GPU partly idle;
* ``"two_phase"``: the sequential walk only carries states (``[BV, K]`` per chunk, cheap) and
  stores the state entering each chunk (or the cotangent leaving it); then one program per
  (row·head, value block, chunk) computes the outputs or ``dq, dk, dv`` in parallel.  For the
  delta rules the chunk's transform (the triangular inverse) is also moved off the sequential
  walk, into a chunk-parallel kernel (:mod:`.pallas_gpu_delta`).

The per-chunk mathematics is shared with the TPU kernels (:mod:`.kernel_math` for the diagonal
decays, :mod:`.delta_kernel_math` for the delta rules); packing follows the same chunk-plan tables
as there.

These kernels use Pallas' Triton lowering, which JAX 0.11 deprecates in favour of Mosaic GPU;
the module is self-contained so that a Mosaic GPU port replaces only this file.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltr

from .kernel_spec import KernelSpec, kernel_name, math_of, optional_outputs, out_struct


def whole_block(shape):
    return pl.BlockSpec(shape, lambda bh, iv: (0,) * len(shape))


def row_gate_specs(spec: KernelSpec, Tp: int, NC: int):
    """Whole-row block specs of the extra inputs (gate tables, the delta rules' step)."""
    C = spec.chunk_size
    return [pl.BlockSpec((None, Tp, width), lambda bh, iv: (bh, 0, 0)) if kind == "col"
            else pl.BlockSpec((None, NC, 1, C), lambda bh, iv: (bh, 0, 0, 0)) for kind, width in spec.extra_inputs]


def load_chunk_gates(spec: KernelSpec, gate_refs, n):
    C = spec.chunk_size
    values = [ref[pl.ds(n * C, C), :] if kind == "col" else ref[n]
              for (kind, _), ref in zip(spec.extra_inputs, gate_refs)]
    return math_of(spec).chunk_gates(spec.mode, values)


class SequenceEdges:
    """Where the sequences of a sequential program (one row·head and value block) start and end:
    the chunk plan's tables decide where a carried state restarts from a sequence's initial state
    (or, walking back, from its final state's cotangent) and where one is written out."""

    def __init__(self, spec: KernelSpec, seq_ref):
        bh, iv = pl.program_id(0), pl.program_id(1)
        self.seq = seq_ref
        self.r, self.h = jax.lax.div(bh, spec.num_heads), jax.lax.rem(bh, spec.num_heads)
        self.cols = pl.ds(iv * spec.block_v, spec.block_v)

    def restart(self, carry, n, flags, source_ref):
        """``carry`` at chunk n, replaced where ``flags`` marks n by ``source_ref``'s block of n's
        sequence (by zeros without a source)."""
        at = flags[self.r, n] == 1
        if source_ref is None:
            return jnp.where(at, 0.0, carry)
        return jax.lax.cond(at, lambda: source_ref[self.seq[self.r, n], self.h, self.cols, :], lambda: carry)

    def emit(self, n, flags, out_ref, value):
        """Writes ``value`` into ``out_ref``'s block of n's sequence where ``flags`` marks n."""
        if out_ref is None:
            return

        @pl.when(flags[self.r, n] == 1)
        def _():
            out_ref[self.seq[self.r, n], self.h, self.cols, :] = value


def launch(kernel, spec: KernelSpec, grid, in_specs, out_specs, out_shape, args, interpret, name: str):
    return pl.pallas_call(kernel, grid=grid, in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
                          compiler_params=pltr.CompilerParams(num_warps=spec.num_warps, num_stages=spec.num_stages),
                          interpret=interpret, name=kernel_name(spec, name))(*args)


@functools.partial(jax.jit, static_argnames=("spec", "store_states", "emit_output", "want_final", "interpret"))
def forward(q, k, v, gates, h0T, first, last, seq, *, spec: KernelSpec, store_states=False, emit_output=True,
            want_final=True, interpret=False):
    """Same contract as :func:`.pallas_tpu.forward`; ``spec.schedule`` picks the fused or the
    two-phase schedule (for the delta rules, :mod:`.pallas_gpu_delta`'s)."""
    if spec.schedule == "two_phase" and spec.family == "delta":
        from . import pallas_gpu_delta
        return pallas_gpu_delta.forward(q, k, v, gates, h0T, first, last, seq, spec=spec, store_states=store_states,
                                        emit_output=emit_output, want_final=want_final, interpret=interpret)
    if spec.schedule == "two_phase" and emit_output:
        _, finalT, statesT = _sequential_forward(q, k, v, gates, h0T, first, last, seq, spec=spec, store_states=True,
                                                 emit_output=False, want_final=want_final, interpret=interpret)
        o = _parallel_output(q, k, v, gates, statesT, spec=spec, interpret=interpret)
        return o, finalT, statesT if store_states else None
    return _sequential_forward(q, k, v, gates, h0T, first, last, seq, spec=spec, store_states=store_states,
                               emit_output=emit_output, want_final=want_final, interpret=interpret)


def _sequential_forward(q, k, v, gates, h0T, first, last, seq, *, spec: KernelSpec, store_states, emit_output,
                        want_final, interpret):
    """The chunk-by-chunk pass: outputs (fused schedule) and/or the state entering every chunk."""
    Tp, K = q.shape[1:]
    BH, V = v.shape[0], v.shape[-1]
    C, H, BV, N = spec.chunk_size, spec.num_heads, spec.block_v, spec.num_seqs
    NC, NV = Tp // C, V // BV
    R = first.shape[0]
    in_specs = [pl.BlockSpec((None, Tp, K), lambda bh, iv: (spec.key_row(bh), 0, 0)),
                pl.BlockSpec((None, Tp, K), lambda bh, iv: (spec.key_row(bh), 0, 0)),
                pl.BlockSpec((None, Tp, BV), lambda bh, iv: (bh, 0, iv)),
                *row_gate_specs(spec, Tp, NC), whole_block((R, NC)), whole_block((R, NC)), whole_block((R, NC))]
    args = [q, k, v, *gates, first, last, seq]
    if h0T is not None:
        in_specs.append(whole_block((N, H, V, K)))
        args.append(h0T)
    out_specs, out_shape = [], []
    if emit_output:
        out_specs.append(pl.BlockSpec((None, Tp, BV), lambda bh, iv: (bh, 0, iv)))
        out_shape.append(out_struct((BH, Tp, V), jnp.float32, q))
    if want_final:
        out_specs.append(whole_block((N, H, V, K)))
        out_shape.append(out_struct((N, H, V, K), jnp.float32, q))
    if store_states:
        out_specs.append(pl.BlockSpec((None, NC, BV, K), lambda bh, iv: (bh, 0, iv, 0)))
        out_shape.append(out_struct((BH, NC, V, K), jnp.float32, q))
    n_gates, has_h0 = len(gates), h0T is not None

    def kernel(*refs):
        q_ref, k_ref, v_ref = refs[:3]
        gate_refs = refs[3:3 + n_gates]
        rest = list(refs[3 + n_gates:])
        first_ref, last_ref, seq_ref = rest.pop(0), rest.pop(0), rest.pop(0)
        h0_ref = rest.pop(0) if has_h0 else None
        o_ref = rest.pop(0) if emit_output else None
        final_ref = rest.pop(0) if want_final else None
        states_ref = rest.pop(0) if store_states else None
        edges = SequenceEdges(spec, seq_ref)

        def step(n, ST):
            ST = edges.restart(ST, n, first_ref, h0_ref)
            if states_ref is not None:
                states_ref[n] = ST
            rows = pl.ds(n * C, C)
            g = load_chunk_gates(spec, gate_refs, n)
            if o_ref is not None:
                o, ST_next = math_of(spec).chunk_forward(q_ref[rows, :], k_ref[rows, :], v_ref[rows, :], g, ST,
                                                         spec.mode, spec.sub_chunk_size, spec.products)
                o_ref[rows, :] = o
            else:
                ST_next = math_of(spec).chunk_state(k_ref[rows, :], v_ref[rows, :], g, ST, spec.products)
            edges.emit(n, last_ref, final_ref, ST_next)
            return ST_next

        jax.lax.fori_loop(0, NC, step, jnp.zeros((BV, K), jnp.float32))

    outs = launch(kernel, spec, (BH, NV), in_specs, out_specs, out_shape, args, interpret, "fwd")
    return optional_outputs(outs, emit_output, want_final, store_states)


@functools.partial(jax.jit, static_argnames=("spec", "has_h0", "interpret"))
def backward(q, k, v, gates, do, statesT, dfinalT, first, last, seq, *, spec: KernelSpec, has_h0: bool,
             interpret=False):
    """Same contract as :func:`.pallas_tpu.backward`; ``spec.schedule`` picks the fused or the
    two-phase schedule (for the delta rules, :mod:`.pallas_gpu_delta`'s)."""
    if spec.schedule == "two_phase" and spec.family == "delta":
        from . import pallas_gpu_delta
        return pallas_gpu_delta.backward(q, k, v, gates, do, statesT, dfinalT, first, last, seq, spec=spec,
                                         has_h0=has_h0, interpret=interpret)
    if spec.schedule == "two_phase":
        dstatesT, dh0T = _state_grads(q, k, v, gates, do, statesT, dfinalT, first, last, seq, spec=spec,
                                      has_h0=has_h0, interpret=interpret)
        dq, dk, dv, *extras = parallel_grads(q, k, v, gates, do, statesT, dstatesT, spec=spec, interpret=interpret)
        return dq, dk, dv, dh0T, tuple(extras)
    return _sequential_backward(q, k, v, gates, do, statesT, dfinalT, first, last, seq, spec=spec, has_h0=has_h0,
                                interpret=interpret)


def _sequential_backward(q, k, v, gates, do, statesT, dfinalT, first, last, seq, *, spec: KernelSpec, has_h0: bool,
                         interpret):
    """The fused reverse pass: state cotangents and dq, dk, dv chunk by chunk."""
    Tp, K = q.shape[1:]
    BH, V = v.shape[0], v.shape[-1]
    C, H, BV, N = spec.chunk_size, spec.num_heads, spec.block_v, spec.num_seqs
    NC, NV = Tp // C, V // BV
    R = first.shape[0]
    in_specs = [pl.BlockSpec((None, Tp, K), lambda bh, iv: (spec.key_row(bh), 0, 0)),
                pl.BlockSpec((None, Tp, K), lambda bh, iv: (spec.key_row(bh), 0, 0)),
                pl.BlockSpec((None, Tp, BV), lambda bh, iv: (bh, 0, iv)),
                *row_gate_specs(spec, Tp, NC),
                pl.BlockSpec((None, Tp, BV), lambda bh, iv: (bh, 0, iv)),
                pl.BlockSpec((None, NC, BV, K), lambda bh, iv: (bh, 0, iv, 0)),
                whole_block((R, NC)), whole_block((R, NC)), whole_block((R, NC))]
    args = [q, k, v, *gates, do, statesT, first, last, seq]
    if dfinalT is not None:
        in_specs.append(whole_block((N, H, V, K)))
        args.append(dfinalT)
    out_specs = [pl.BlockSpec((None, None, Tp, K), lambda bh, iv: (iv, bh, 0, 0)),
                 pl.BlockSpec((None, None, Tp, K), lambda bh, iv: (iv, bh, 0, 0)),
                 pl.BlockSpec((None, Tp, BV), lambda bh, iv: (bh, 0, iv))]
    out_shape = [out_struct((NV, BH, Tp, K), jnp.float32, q),
                 out_struct((NV, BH, Tp, K), jnp.float32, q),
                 out_struct((BH, Tp, V), jnp.float32, q)]
    if has_h0:
        out_specs.append(whole_block((N, H, V, K)))
        out_shape.append(out_struct((N, H, V, K), jnp.float32, q))
    n_extra = spec.num_extra_grads
    out_specs += [pl.BlockSpec((None, None, Tp, 1), lambda bh, iv: (iv, bh, 0, 0))] * n_extra
    out_shape += [out_struct((NV, BH, Tp, 1), jnp.float32, q)] * n_extra
    n_gates, has_dfinal = len(gates), dfinalT is not None

    def kernel(*refs):
        q_ref, k_ref, v_ref = refs[:3]
        gate_refs = refs[3:3 + n_gates]
        rest = list(refs[3 + n_gates:])
        do_ref, states_ref = rest.pop(0), rest.pop(0)
        first_ref, last_ref, seq_ref = rest.pop(0), rest.pop(0), rest.pop(0)
        dfinal_ref = rest.pop(0) if has_dfinal else None
        dq_ref, dk_ref, dv_ref = rest.pop(0), rest.pop(0), rest.pop(0)
        dh0_ref = rest.pop(0) if has_h0 else None
        extra_refs = rest
        edges = SequenceEdges(spec, seq_ref)

        def step(i, dST):
            n = NC - 1 - i
            dST = edges.restart(dST, n, last_ref, dfinal_ref)
            rows = pl.ds(n * C, C)
            g = load_chunk_gates(spec, gate_refs, n)
            dq, dk, dv, dST_prev, extras = math_of(spec).chunk_backward(
                q_ref[rows, :], k_ref[rows, :], v_ref[rows, :], do_ref[rows, :], g, states_ref[n], dST, spec.mode,
                spec.sub_chunk_size, spec.products)
            dq_ref[rows, :] = dq
            dk_ref[rows, :] = dk
            dv_ref[rows, :] = dv
            for ref, value in zip(extra_refs, extras):
                ref[rows, :] = value
            edges.emit(n, first_ref, dh0_ref, dST_prev)
            return dST_prev

        jax.lax.fori_loop(0, NC, step, jnp.zeros((BV, K), jnp.float32))

    outs = launch(kernel, spec, (BH, NV), in_specs, out_specs, out_shape, args, interpret, "bwd")
    dq, dk, dv, dh0T = optional_outputs(outs[:len(outs) - n_extra], True, True, True, has_h0)
    return dq, dk, dv, dh0T, tuple(outs[len(outs) - n_extra:])


def chunk_gate_specs(spec: KernelSpec):
    C = spec.chunk_size
    return [pl.BlockSpec((None, C, width), lambda bh, iv, n: (bh, n, 0)) if kind == "col"
            else pl.BlockSpec((None, None, 1, C), lambda bh, iv, n: (bh, n, 0, 0)) for kind, width in spec.extra_inputs]


def chunk_gates_of(spec: KernelSpec, gate_refs):
    return math_of(spec).chunk_gates(spec.mode, [ref[...] for ref in gate_refs])


def _parallel_output(q, k, v, gates, statesT, *, spec: KernelSpec, interpret):
    """Every chunk at once: ``o = intra-chunk + (Q ⊙ decay) S_in`` with the stored entering states."""
    Tp, K = q.shape[1:]
    BH, V = v.shape[0], v.shape[-1]
    C, BV = spec.chunk_size, spec.block_v
    NC, NV = Tp // C, V // BV
    qk = pl.BlockSpec((None, C, K), lambda bh, iv, n: (spec.key_row(bh), n, 0))
    vb = pl.BlockSpec((None, C, BV), lambda bh, iv, n: (bh, n, iv))
    st = pl.BlockSpec((None, None, BV, K), lambda bh, iv, n: (bh, n, iv, 0))
    n_gates = len(gates)

    def kernel(*refs):
        q_ref, k_ref, v_ref = refs[:3]
        gate_refs = refs[3:3 + n_gates]
        states_ref, o_ref = refs[3 + n_gates:]
        g = chunk_gates_of(spec, gate_refs)
        o, _ = math_of(spec).chunk_forward(q_ref[...], k_ref[...], v_ref[...], g, states_ref[...], spec.mode,
                                           spec.sub_chunk_size, spec.products)
        o_ref[...] = o

    return launch(kernel, spec, (BH, NV, NC), [qk, qk, vb, *chunk_gate_specs(spec), st], vb,
                   out_struct((BH, Tp, V), jnp.float32, q), (q, k, v, *gates, statesT), interpret, "fwd_out")


def _state_grads(q, k, v, gates, do, statesT, dfinalT, first, last, seq, *, spec: KernelSpec, has_h0: bool,
                 interpret):
    """The reverse chunk-by-chunk pass over state cotangents only: ``(dSᵀ leaving every chunk
    [BH, NC, V, K], dh0ᵀ or None)``.  ``k``, ``v`` and the entering states are read by the delta
    rules only (their state cotangent passes through the chunk's ``W`` and ``V'``)."""
    Tp, K = q.shape[1:]
    BH, V = do.shape[0], do.shape[-1]
    C, H, BV, N = spec.chunk_size, spec.num_heads, spec.block_v, spec.num_seqs
    NC, NV = Tp // C, V // BV
    R = first.shape[0]
    delta = spec.family == "delta"
    in_specs = [pl.BlockSpec((None, Tp, K), lambda bh, iv: (spec.key_row(bh), 0, 0)), *row_gate_specs(spec, Tp, NC),
                pl.BlockSpec((None, Tp, BV), lambda bh, iv: (bh, 0, iv)),
                whole_block((R, NC)), whole_block((R, NC)), whole_block((R, NC))]
    args = [q, *gates, do, first, last, seq]
    if delta:
        in_specs += [pl.BlockSpec((None, Tp, K), lambda bh, iv: (spec.key_row(bh), 0, 0)),
                     pl.BlockSpec((None, Tp, BV), lambda bh, iv: (bh, 0, iv)),
                     pl.BlockSpec((None, NC, BV, K), lambda bh, iv: (bh, 0, iv, 0))]
        args += [k, v, statesT]
    if dfinalT is not None:
        in_specs.append(whole_block((N, H, V, K)))
        args.append(dfinalT)
    out_specs = [pl.BlockSpec((None, NC, BV, K), lambda bh, iv: (bh, 0, iv, 0))]
    out_shape = [out_struct((BH, NC, V, K), jnp.float32, q)]
    if has_h0:
        out_specs.append(whole_block((N, H, V, K)))
        out_shape.append(out_struct((N, H, V, K), jnp.float32, q))
    n_gates, has_dfinal = len(gates), dfinalT is not None

    def kernel(*refs):
        q_ref = refs[0]
        gate_refs = refs[1:1 + n_gates]
        rest = list(refs[1 + n_gates:])
        do_ref, first_ref, last_ref, seq_ref = rest.pop(0), rest.pop(0), rest.pop(0), rest.pop(0)
        k_ref, v_ref, states_ref = (rest.pop(0), rest.pop(0), rest.pop(0)) if delta else (None, None, None)
        dfinal_ref = rest.pop(0) if has_dfinal else None
        dstates_ref = rest.pop(0)
        dh0_ref = rest.pop(0) if has_h0 else None
        edges = SequenceEdges(spec, seq_ref)

        def step(i, dST):
            n = NC - 1 - i
            dST = edges.restart(dST, n, last_ref, dfinal_ref)
            dstates_ref[n] = dST
            rows = pl.ds(n * C, C)
            load = lambda ref, at: None if ref is None else ref[at]
            dST_prev = math_of(spec).chunk_state_grad(
                q_ref[rows, :], load(k_ref, (rows, slice(None))), load(v_ref, (rows, slice(None))), do_ref[rows, :],
                load_chunk_gates(spec, gate_refs, n), load(states_ref, n), dST, spec.products)
            edges.emit(n, first_ref, dh0_ref, dST_prev)
            return dST_prev

        jax.lax.fori_loop(0, NC, step, jnp.zeros((BV, K), jnp.float32))

    outs = launch(kernel, spec, (BH, NV), in_specs, out_specs, out_shape, args, interpret, "bwd_states")
    return optional_outputs(outs, True, has_h0)


def parallel_grads(q, k, v, gates, do, statesT, dstatesT, *, spec: KernelSpec, interpret):
    """Every chunk at once: ``dq, dk`` (partial over value blocks) and ``dv`` from the entering
    states and the cotangents of the leaving states."""
    Tp, K = q.shape[1:]
    BH, V = v.shape[0], v.shape[-1]
    C, BV = spec.chunk_size, spec.block_v
    NC, NV = Tp // C, V // BV
    qk = pl.BlockSpec((None, C, K), lambda bh, iv, n: (spec.key_row(bh), n, 0))
    vb = pl.BlockSpec((None, C, BV), lambda bh, iv, n: (bh, n, iv))
    st = pl.BlockSpec((None, None, BV, K), lambda bh, iv, n: (bh, n, iv, 0))
    part = pl.BlockSpec((None, None, C, K), lambda bh, iv, n: (iv, bh, n, 0))
    column = pl.BlockSpec((None, None, C, 1), lambda bh, iv, n: (iv, bh, n, 0))
    n_gates, n_extra = len(gates), spec.num_extra_grads

    def kernel(*refs):
        q_ref, k_ref, v_ref = refs[:3]
        gate_refs = refs[3:3 + n_gates]
        do_ref, states_ref, dstates_ref, dq_ref, dk_ref, dv_ref, *extra_refs = refs[3 + n_gates:]
        g = chunk_gates_of(spec, gate_refs)
        dq, dk, dv, _, extras = math_of(spec).chunk_backward(q_ref[...], k_ref[...], v_ref[...], do_ref[...], g,
                                                             states_ref[...], dstates_ref[...], spec.mode,
                                                             spec.sub_chunk_size, spec.products)
        dq_ref[...] = dq
        dk_ref[...] = dk
        dv_ref[...] = dv
        for ref, value in zip(extra_refs, extras):
            ref[...] = value

    out_shape = [out_struct((NV, BH, Tp, K), jnp.float32, q),
                 out_struct((NV, BH, Tp, K), jnp.float32, q),
                 out_struct((BH, Tp, V), jnp.float32, q)] + [out_struct((NV, BH, Tp, 1), jnp.float32, q)] * n_extra
    return launch(kernel, spec, (BH, NV, NC), [qk, qk, vb, *chunk_gate_specs(spec), vb, st, st],
                   [part, part, vb] + [column] * n_extra, out_shape, (q, k, v, *gates, do, statesT, dstatesT),
                   interpret, "bwd_chunks")
