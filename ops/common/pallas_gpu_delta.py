"""The delta rules' two-phase schedule on GPU (Triton): the transform off the sequential path.

For the delta rules most of a chunk's work is its WY/UT transform (``A``, the triangular inverse
``T``, ``W``), which does not depend on the state.  The fused schedule computes it inside the
sequential walk over chunks, where only ``rows·heads·value blocks`` programs run.  Here:

forward
  1. one program per (row·head, chunk): ``T`` and ``W`` (stored, float32);
  2. the sequential walk per (row·head, value block), now light: ``V' = T (β ⊙ V) - W S`` and
     ``S' = γ_C S + (K ⊙ e^{G_C - G})ᵀ V'``, storing the entering states and ``V'``;
  3. one program per (row·head, value block, chunk): ``O = (Q ⊙ γ) S + P V'``;

backward
  1-2. the entering states come from the custom VJP's recomputation (forward steps 1-2); ``W``
     is computed again (step 1);
  3. per chunk in parallel, the chunk-local part of ``dV'``: ``Pᵀ dO``;
  4. the light reverse walk: ``dS = γ_C dS' + (Q ⊙ γ)ᵀ dO - Wᵀ (Pᵀ dO + (K ⊙ e^{G_C - G}) dS')``,
     storing the cotangent leaving every chunk;
  5. per chunk in parallel, every gradient (:func:`.pallas_gpu.parallel_grads`).

Extra memory: ``T`` (C floats per token), ``W`` (K per token), ``V'`` and ``Pᵀ dO`` (V per token),
all linear in T.  The per-chunk mathematics is :mod:`.delta_kernel_math`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from . import delta_kernel_math as dm
from .kernel_spec import KernelSpec, out_struct
from .pallas_gpu import (
    SequenceEdges,
    chunk_gate_specs,
    chunk_gates_of,
    launch,
    load_chunk_gates,
    parallel_grads,
    row_gate_specs,
    whole_block,
)


def forward(q, k, v, gates, h0T, first, last, seq, *, spec: KernelSpec, store_states, emit_output, want_final,
            interpret):
    """Same contract as :func:`.pallas_gpu.forward`."""
    T, W = _transform(k, v, gates, spec=spec, interpret=interpret)
    finalT, statesT, Vn = _light_states(k, v, gates, T, W, h0T, first, last, seq, spec=spec, want_final=want_final,
                                        interpret=interpret)
    o = _output(q, k, v, gates, statesT, Vn, spec=spec, interpret=interpret) if emit_output else None
    return o, finalT, statesT if store_states else None


def backward(q, k, v, gates, do, statesT, dfinalT, first, last, seq, *, spec: KernelSpec, has_h0: bool, interpret):
    """Same contract as :func:`.pallas_gpu.backward`; ``statesT`` are the entering states the
    forward's light walk stored."""
    _, W = _transform(k, v, gates, spec=spec, interpret=interpret)
    local_dv = _local_dv(q, k, gates, do, spec=spec, interpret=interpret)
    dstatesT, dh0T = _light_state_grads(q, k, gates, W, do, local_dv, dfinalT, first, last, seq, spec=spec,
                                        has_h0=has_h0, interpret=interpret)
    dq, dk, dv, *extras = parallel_grads(q, k, v, gates, do, statesT, dstatesT, spec=spec, interpret=interpret)
    return dq, dk, dv, dh0T, tuple(extras)


def _transform(k, v, gates, *, spec: KernelSpec, interpret):
    """``(T [BH, NC, C, C], W [BH, Tp, K])`` float32, one program per (row·head, chunk)."""
    Tp, K = k.shape[1:]
    BH = v.shape[0]
    C = spec.chunk_size
    NC = Tp // C
    in_specs = [pl.BlockSpec((None, C, K), lambda bh, n: (spec.key_row(bh), n, 0))]
    in_specs += [pl.BlockSpec((None, C, width), lambda bh, n: (bh, n, 0)) if kind == "col"
                 else pl.BlockSpec((None, None, 1, C), lambda bh, n: (bh, n, 0, 0))
                 for kind, width in spec.extra_inputs]
    out_specs = [pl.BlockSpec((None, None, C, C), lambda bh, n: (bh, n, 0, 0)),
                 pl.BlockSpec((None, C, K), lambda bh, n: (bh, n, 0))]
    out_shape = [out_struct((BH, NC, C, C), jnp.float32, k), out_struct((BH, Tp, K), jnp.float32, k)]

    def kernel(k_ref, *refs):
        gate_refs, (T_ref, W_ref) = refs[:-2], refs[-2:]
        T, W = dm.chunk_wy(k_ref[...], chunk_gates_of(spec, gate_refs), spec.products)
        T_ref[...] = T
        W_ref[...] = W

    return launch(kernel, spec, (BH, NC), in_specs, out_specs, out_shape, (k, *gates), interpret, "wy")


def _light_states(k, v, gates, T, W, h0T, first, last, seq, *, spec: KernelSpec, want_final, interpret):
    """The sequential walk: ``(finalᵀ or None, entering statesᵀ [BH, NC, V, K], V' [BH, Tp, V])``."""
    Tp, K = k.shape[1:]
    BH, V = v.shape[0], v.shape[-1]
    C, H, BV, N = spec.chunk_size, spec.num_heads, spec.block_v, spec.num_seqs
    NC, NV = Tp // C, V // BV
    R = first.shape[0]
    in_specs = [pl.BlockSpec((None, Tp, K), lambda bh, iv: (spec.key_row(bh), 0, 0)),
                pl.BlockSpec((None, Tp, BV), lambda bh, iv: (bh, 0, iv)),
                *row_gate_specs(spec, Tp, NC),
                pl.BlockSpec((None, NC, C, C), lambda bh, iv: (bh, 0, 0, 0)),
                pl.BlockSpec((None, Tp, K), lambda bh, iv: (bh, 0, 0)),
                whole_block((R, NC)), whole_block((R, NC)), whole_block((R, NC))]
    args = [k, v, *gates, T, W, first, last, seq]
    if h0T is not None:
        in_specs.append(whole_block((N, H, V, K)))
        args.append(h0T)
    out_specs = [pl.BlockSpec((None, NC, BV, K), lambda bh, iv: (bh, 0, iv, 0)),
                 pl.BlockSpec((None, Tp, BV), lambda bh, iv: (bh, 0, iv))]
    out_shape = [out_struct((BH, NC, V, K), jnp.float32, k), out_struct((BH, Tp, V), jnp.float32, k)]
    if want_final:
        out_specs.append(whole_block((N, H, V, K)))
        out_shape.append(out_struct((N, H, V, K), jnp.float32, k))
    n_gates, has_h0 = len(gates), h0T is not None

    def kernel(*refs):
        k_ref, v_ref = refs[:2]
        gate_refs = refs[2:2 + n_gates]
        rest = list(refs[2 + n_gates:])
        T_ref, W_ref, first_ref, last_ref, seq_ref = (rest.pop(0) for _ in range(5))
        h0_ref = rest.pop(0) if has_h0 else None
        states_ref, Vn_ref = rest.pop(0), rest.pop(0)
        final_ref = rest.pop(0) if want_final else None
        edges = SequenceEdges(spec, seq_ref)

        def step(n, ST):
            ST = edges.restart(ST, n, first_ref, h0_ref)
            states_ref[n] = ST
            rows = pl.ds(n * C, C)
            Vn, ST_next = dm.chunk_new_values(T_ref[n], W_ref[rows, :], k_ref[rows, :], v_ref[rows, :],
                                              load_chunk_gates(spec, gate_refs, n), ST, spec.products)
            Vn_ref[rows, :] = Vn
            edges.emit(n, last_ref, final_ref, ST_next)
            return ST_next

        jax.lax.fori_loop(0, NC, step, jnp.zeros((BV, K), jnp.float32))

    outs = launch(kernel, spec, (BH, NV), in_specs, out_specs, out_shape, args, interpret, "fwd_states")
    statesT, Vn = outs[0], outs[1]
    return (outs[2] if want_final else None), statesT, Vn


def _output(q, k, v, gates, statesT, Vn, *, spec: KernelSpec, interpret):
    """Every chunk at once: ``O = (Q ⊙ γ) S + P V'``."""
    Tp, K = q.shape[1:]
    BH, V = v.shape[0], v.shape[-1]
    C, BV = spec.chunk_size, spec.block_v
    NC, NV = Tp // C, V // BV
    qk = pl.BlockSpec((None, C, K), lambda bh, iv, n: (spec.key_row(bh), n, 0))
    vb = pl.BlockSpec((None, C, BV), lambda bh, iv, n: (bh, n, iv))
    st = pl.BlockSpec((None, None, BV, K), lambda bh, iv, n: (bh, n, iv, 0))
    n_gates = len(gates)

    def kernel(*refs):
        q_ref, k_ref = refs[:2]
        gate_refs = refs[2:2 + n_gates]
        states_ref, Vn_ref, o_ref = refs[2 + n_gates:]
        o_ref[...] = dm.chunk_output(q_ref[...], k_ref[...], Vn_ref[...], chunk_gates_of(spec, gate_refs),
                                     states_ref[...], spec.products)

    return launch(kernel, spec, (BH, NV, NC), [qk, qk, *chunk_gate_specs(spec), st, vb], vb,
                  out_struct((BH, Tp, V), jnp.float32, q), (q, k, *gates, statesT, Vn), interpret, "fwd_out")


def _local_dv(q, k, gates, do, *, spec: KernelSpec, interpret):
    """``Pᵀ dO`` per chunk, ``[BH, Tp, V]`` float32."""
    Tp, K = q.shape[1:]
    BH, V = do.shape[0], do.shape[-1]
    C, BV = spec.chunk_size, spec.block_v
    NC, NV = Tp // C, V // BV
    qk = pl.BlockSpec((None, C, K), lambda bh, iv, n: (spec.key_row(bh), n, 0))
    vb = pl.BlockSpec((None, C, BV), lambda bh, iv, n: (bh, n, iv))
    n_gates = len(gates)

    def kernel(*refs):
        q_ref, k_ref = refs[:2]
        gate_refs = refs[2:2 + n_gates]
        do_ref, out_ref = refs[2 + n_gates:]
        out_ref[...] = dm.chunk_local_dv(q_ref[...], k_ref[...], do_ref[...], chunk_gates_of(spec, gate_refs),
                                         spec.products)

    return launch(kernel, spec, (BH, NV, NC), [qk, qk, *chunk_gate_specs(spec), vb], vb,
                  out_struct((BH, Tp, V), jnp.float32, q), (q, k, *gates, do), interpret, "bwd_local_dv")


def _light_state_grads(q, k, gates, W, do, local_dv, dfinalT, first, last, seq, *, spec: KernelSpec, has_h0: bool,
                       interpret):
    """The light reverse walk: ``(dSᵀ leaving every chunk [BH, NC, V, K], dh0ᵀ or None)``."""
    Tp, K = q.shape[1:]
    BH, V = do.shape[0], do.shape[-1]
    C, H, BV, N = spec.chunk_size, spec.num_heads, spec.block_v, spec.num_seqs
    NC, NV = Tp // C, V // BV
    R = first.shape[0]
    key = lambda bh, iv: (spec.key_row(bh), 0, 0)
    vb = pl.BlockSpec((None, Tp, BV), lambda bh, iv: (bh, 0, iv))
    in_specs = [pl.BlockSpec((None, Tp, K), key), pl.BlockSpec((None, Tp, K), key), *row_gate_specs(spec, Tp, NC),
                pl.BlockSpec((None, Tp, K), lambda bh, iv: (bh, 0, 0)), vb, vb,
                whole_block((R, NC)), whole_block((R, NC)), whole_block((R, NC))]
    args = [q, k, *gates, W, do, local_dv, first, last, seq]
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
        q_ref, k_ref = refs[:2]
        gate_refs = refs[2:2 + n_gates]
        rest = list(refs[2 + n_gates:])
        W_ref, do_ref, dv_ref, first_ref, last_ref, seq_ref = (rest.pop(0) for _ in range(6))
        dfinal_ref = rest.pop(0) if has_dfinal else None
        dstates_ref = rest.pop(0)
        dh0_ref = rest.pop(0) if has_h0 else None
        edges = SequenceEdges(spec, seq_ref)

        def step(i, dST):
            n = NC - 1 - i
            dST = edges.restart(dST, n, last_ref, dfinal_ref)
            dstates_ref[n] = dST
            rows = pl.ds(n * C, C)
            dST_prev = dm.chunk_light_state_grad(q_ref[rows, :], k_ref[rows, :], W_ref[rows, :], do_ref[rows, :],
                                                 dv_ref[rows, :], load_chunk_gates(spec, gate_refs, n), dST,
                                                 spec.products)
            edges.emit(n, first_ref, dh0_ref, dST_prev)
            return dST_prev

        jax.lax.fori_loop(0, NC, step, jnp.zeros((BV, K), jnp.float32))

    outs = launch(kernel, spec, (BH, NV), in_specs, out_specs, out_shape, args, interpret, "bwd_states")
    return outs[0], (outs[1] if has_h0 else None)
