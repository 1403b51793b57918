"""Chunkwise gated delta rule (REFERENCE §1.4, gated version); the algorithm lives in
:mod:`ops.delta_rule.chunk`, which handles ``g is None`` (DeltaNet) and a scalar log gate (GDN)."""

import jax.numpy as jnp

from ops.delta_rule import _args
from ops.delta_rule.chunk import chunk_core, transitions_core
from ops.gated_delta_rule._doc import ARGS


def chunk_gated_delta_rule(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False,
                           use_qk_l2norm_in_kernel=False, allow_neg_eigval=False, cu_seqlens=None, *,
                           chunk_size=64, use_qk_l2norm=None):
    p = _args.prepare(q, k, v, g, beta, scale=scale, initial_state=initial_state,
                      use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel, use_qk_l2norm=use_qk_l2norm,
                      allow_neg_eigval=allow_neg_eigval, cu_seqlens=cu_seqlens, gated=True)
    return chunk_core(p, cu_seqlens, output_final_state, chunk_size)


chunk_gated_delta_rule.__doc__ = (
    "Chunkwise Gated DeltaNet, ``S_t = exp(g_t)(I − β_t k_t k_tᵀ) S_{t−1} + β_t k_t v_tᵀ``,\n"
    "``o_t = S_tᵀ (scale·q_t)``; the training default (memory linear in T, gates masked before exp).\n"
    + ARGS)


def chunk_gated_transitions(k, v, g, beta, use_qk_l2norm_in_kernel=False, allow_neg_eigval=False, *,
                            chunk_size=64, use_qk_l2norm=None):
    """Per-chunk affine maps of the state, for sequence parallelism (REFERENCE §3.4).

    Returns ``(M [B, NC, HV, K, K], S_ext [B, NC, HV, K, V])`` float32 with
    ``S_next = M S + S_ext`` for chunk c = ``[c·C, (c+1)·C)`` (unpacked batches only).
    """
    q = jnp.zeros_like(k)
    p = _args.prepare(q, k, v, g, beta, scale=1.0, initial_state=None,
                      use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel, use_qk_l2norm=use_qk_l2norm,
                      allow_neg_eigval=allow_neg_eigval, cu_seqlens=None, gated=True)
    return transitions_core(p, chunk_size)

