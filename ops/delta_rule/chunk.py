"""Chunkwise DeltaNet (the WY / UT chunk form of :mod:`..common.delta`), the training default."""

from __future__ import annotations

from ..common import checks
from ..common.delta import chunk_delta, transitions
from ..common.delta_kernels import run_delta_kernels
from ..common.diagonal_kernels import chunk_diagonal_dispatch
from ..common.prepare import finish, prepare


def chunk_delta_rule(q, k, v, beta, scale=None, initial_state=None, output_final_state=False,
                     use_qk_l2norm_in_kernel=False, cu_seqlens=None, *, chunk_size=64,
                     use_beta_sigmoid_in_kernel=False, allow_neg_eigval=False, state_v_first=False,
                     implementation=None):
    """Chunkwise DeltaNet: ``S_t = (I - β_t k_t k_tᵀ) S_{t-1} + β_t k_t v_tᵀ``, ``o_t = S_tᵀ (s q_t)``.

    Args:
      q, k: ``[B, T, H, K]``; v: ``[B, T, H, V]``; beta: ``[B, T, H]`` (any float dtypes; computed
        in float32).
      scale: multiplies q; None means ``K ** -0.5``.
      initial_state: ``[N, H, K, V]`` float32 (``[N, H, V, K]`` with ``state_v_first``) or None.
      output_final_state: also return the final state.
      use_qk_l2norm_in_kernel: L2-normalise q and k over K (float32, eps 1e-6) first.
      cu_seqlens: ``[N + 1]`` int offsets of packed sequences (B == 1).
      chunk_size: tokens per chunk (static); T need not be a multiple.
      use_beta_sigmoid_in_kernel: beta holds logits; the step is ``sigmoid(beta)``.
      allow_neg_eigval: steps up to 2, so the eigenvalue ``1 - β`` along k reaches -1: beta may
        lie in [0, 2], or with logits the step is ``2 sigmoid(beta)``.
      state_v_first: states in ``[N, H, V, K]`` order.
      implementation: ``"xla"`` (the XLA chunk form), ``"pallas"`` (the Pallas kernels; on a
        machine without TPU or GPU they run interpreted) or None (the kernels on TPU and CUDA GPUs
        when they support the inputs, XLA otherwise); see ``docs/kernels.md``.

    Returns:
      ``(o [B, T, H, V] in v's dtype, final_state float32 or None)``.

    >>> import jax, jax.numpy as jnp
    >>> q, k, v = jax.random.normal(jax.random.key(0), (3, 1, 50, 2, 16))
    >>> beta = jax.nn.sigmoid(jax.random.normal(jax.random.key(1), (1, 50, 2)))
    >>> o, S = chunk_delta_rule(q, k, v, beta, use_qk_l2norm_in_kernel=True, output_final_state=True)
    >>> o.shape, S.shape
    ((1, 50, 2, 16), (1, 2, 16, 16))
    """
    size = checks.check_chunk_size(chunk_size)
    checks.check_array("beta", beta)
    x = prepare(q, k, v, beta=beta, scale=scale, initial_state=initial_state, output_final_state=output_final_state,
                cu_seqlens=cu_seqlens, qk_l2norm=use_qk_l2norm_in_kernel, beta_logits=use_beta_sigmoid_in_kernel,
                allow_neg_eigval=allow_neg_eigval, state_v_first=state_v_first)
    o, final = chunk_diagonal_dispatch(x, None, size, 16, implementation, chunk_delta, (size,),
                                       runner=run_delta_kernels)
    return finish(x, o, final)


def chunk_transitions(k, v, beta, *, use_qk_l2norm_in_kernel=False, use_beta_sigmoid_in_kernel=False,
                      allow_neg_eigval=False, chunk_size=64):
    """Each chunk's affine map of the DeltaNet state, ``S_next = M S + S_ext``.

    Returns ``(M [B, NC, H, K, K], S_ext [B, NC, H, K, V])`` float32 for chunks of ``chunk_size``
    tokens (the last one partial); unpacked batches only.  Folding the maps of consecutive
    chunks (later ones on the left) gives the map of a whole block of tokens, which is what a
    device needs from the devices before it under sequence parallelism.

    >>> import jax, jax.numpy as jnp
    >>> k, v = jax.random.normal(jax.random.key(0), (2, 1, 20, 1, 4))
    >>> M, S_ext = chunk_transitions(k, v, jnp.full((1, 20, 1), 0.5), chunk_size=8)
    >>> M.shape, S_ext.shape
    ((1, 3, 1, 4, 4), (1, 3, 1, 4, 4))
    """
    size = checks.check_chunk_size(chunk_size)
    x = prepare(k, k, v, beta=beta, scale=1.0, qk_l2norm=use_qk_l2norm_in_kernel,
                beta_logits=use_beta_sigmoid_in_kernel, allow_neg_eigval=allow_neg_eigval)
    return transitions(x, size)
