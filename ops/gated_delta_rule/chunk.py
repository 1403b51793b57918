"""Chunkwise Gated DeltaNet (the WY / UT chunk form of :mod:`..common.delta` with a decay)."""

from __future__ import annotations

from ..common import checks
from ..common.delta import chunk_delta, transitions
from ..common.delta_kernels import run_delta_kernels
from ..common.diagonal_kernels import chunk_diagonal_dispatch
from ..common.prepare import finish, prepare, with_repeated_key_heads


def gate_arguments(use_gate_in_kernel, A_log, dt_bias) -> dict:
    """``prepare``'s keywords for GDN's in-kernel gate ``g <- -exp(A_log) softplus(g + dt_bias)``."""
    if not checks.check_bool("use_gate_in_kernel", use_gate_in_kernel):
        for name, value in (("A_log", A_log), ("dt_bias", dt_bias)):
            if value is not None:
                raise ValueError(f"{name} is only used with use_gate_in_kernel=True (got use_gate_in_kernel=False)")
        return {}
    if A_log is None:
        raise ValueError("use_gate_in_kernel=True needs A_log [HV] (the gate is -exp(A_log) softplus(g + dt_bias))")
    return {"A_log": A_log, "dt_bias": dt_bias}


def chunk_gated_delta_rule(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False,
                           use_qk_l2norm_in_kernel=False, use_beta_sigmoid_in_kernel=False, allow_neg_eigval=False,
                           state_v_first=False, cu_seqlens=None, *, chunk_size=64, use_gate_in_kernel=False,
                           A_log=None, dt_bias=None, implementation=None):
    """Chunkwise Gated DeltaNet, ``S_t = exp(g_t) (I - β_t k_t k_tᵀ) S_{t-1} + β_t k_t v_tᵀ``,
    ``o_t = S_tᵀ (s q_t)``; the training default (memory linear in T).

    Args:
      q, k: ``[B, T, H, K]``; v: ``[B, T, HV, V]`` with HV a multiple of H (value head hv reads
        q/k head ``hv // (HV / H)``); any float dtypes, computed in float32.
      g: ``[B, T, HV]`` log decay (``<= 0``; ``-inf`` resets), or with ``use_gate_in_kernel`` the
        raw gate input, mapped to ``-exp(A_log) softplus(g + dt_bias)``.
      beta: ``[B, T, HV]`` step in [0, 1] ([0, 2] with ``allow_neg_eigval``), or logits with
        ``use_beta_sigmoid_in_kernel`` (step ``sigmoid(beta)``, ``2 sigmoid(beta)`` with
        ``allow_neg_eigval``).
      scale: multiplies q; None means ``K ** -0.5``.
      initial_state: ``[N, HV, K, V]`` float32 (``[N, HV, V, K]`` with ``state_v_first``) or None.
      output_final_state: also return the final state.
      use_qk_l2norm_in_kernel: L2-normalise q and k over K (float32, eps 1e-6) first.
      state_v_first: states in ``[N, HV, V, K]`` order.
      cu_seqlens: ``[N + 1]`` int offsets of packed sequences (B == 1).
      chunk_size: tokens per chunk (static); T need not be a multiple.
      use_gate_in_kernel, A_log, dt_bias: compute the log decay from ``A_log [HV]`` and the
        optional ``dt_bias [HV]`` (both differentiable).
      implementation: ``"xla"`` (the XLA chunk form), ``"pallas"`` (the Pallas kernels; on a
        machine without TPU or GPU they run interpreted) or None (the kernels on TPU and CUDA GPUs
        when they support the inputs, XLA otherwise); see ``docs/kernels.md``.

    Returns:
      ``(o [B, T, HV, V] in v's dtype, final_state float32 or None)``.

    >>> import jax, jax.numpy as jnp
    >>> q, k = jax.random.normal(jax.random.key(0), (2, 1, 50, 2, 16))
    >>> v = jax.random.normal(jax.random.key(1), (1, 50, 4, 8))             # 4 value heads
    >>> g = jax.nn.log_sigmoid(jax.random.normal(jax.random.key(2), (1, 50, 4)))
    >>> o, S = chunk_gated_delta_rule(q, k, v, g, jnp.full((1, 50, 4), 0.5), use_qk_l2norm_in_kernel=True,
    ...                               output_final_state=True)
    >>> o.shape, S.shape
    ((1, 50, 4, 8), (1, 4, 16, 8))
    """
    size = checks.check_chunk_size(chunk_size)
    checks.check_array("beta", beta)
    checks.check_array("g", g)
    x = prepare(q, k, v, g=g, beta=beta, scale=scale, initial_state=initial_state,
                output_final_state=output_final_state, cu_seqlens=cu_seqlens, grouped_values=True,
                qk_l2norm=use_qk_l2norm_in_kernel, beta_logits=use_beta_sigmoid_in_kernel,
                allow_neg_eigval=allow_neg_eigval, state_v_first=state_v_first, repeat_key_heads=False,
                **gate_arguments(use_gate_in_kernel, A_log, dt_bias))
    o, final = chunk_diagonal_dispatch(x, "head", size, 16, implementation, _chunk_delta_grouped, (size,),
                                       runner=run_delta_kernels)
    return finish(x, o, final)


def _chunk_delta_grouped(x, chunk_size: int):
    """The XLA chunk form, q and k repeated over the grouped value heads first."""
    return chunk_delta(with_repeated_key_heads(x), chunk_size)


def chunk_gated_transitions(k, v, g, beta, *, use_qk_l2norm_in_kernel=False, use_beta_sigmoid_in_kernel=False,
                            allow_neg_eigval=False, chunk_size=64):
    """Each chunk's affine map of the GDN state, ``S_next = M S + S_ext``: float32
    ``(M [B, NC, HV, K, K], S_ext [B, NC, HV, K, V])`` (unpacked batches only); see
    :func:`~lolax.ops.delta_rule.chunk_transitions`.

    >>> import jax, jax.numpy as jnp
    >>> k, v = jax.random.normal(jax.random.key(0), (2, 1, 20, 1, 4))
    >>> M, S_ext = chunk_gated_transitions(k, v, jnp.full((1, 20, 1), -0.1), jnp.full((1, 20, 1), 0.5))
    >>> M.shape
    (1, 1, 1, 4, 4)
    """
    size = checks.check_chunk_size(chunk_size)
    x = prepare(k, k, v, g=g, beta=beta, scale=1.0, grouped_values=True, qk_l2norm=use_qk_l2norm_in_kernel,
                beta_logits=use_beta_sigmoid_in_kernel, allow_neg_eigval=allow_neg_eigval)
    return transitions(x, size)
