"""Shared docstring fragment for the gated delta rule entry points."""

ARGS = """
    Args:
      q, k: ``[B, T, H, K]``; v: ``[B, T, HV, V]`` with ``HV`` a multiple of ``H`` (value head
        ``hv`` reads q/k head ``hv // (HV // H)``, FLA's grouped values); any float dtypes,
        computed in float32.
      g: ``[B, T, HV]`` log decay (``g <= 0``, decay ``exp(g)``), e.g. ``logsigmoid(·)`` or
        ``−exp(A_log)·softplus(·)``.
      beta: ``[B, T, HV]`` write strength.
      scale: multiplies q; None means ``K ** -0.5``.
      initial_state: ``[N, HV, K, V]`` float32 or None (zeros).
      output_final_state: also return the ``[N, HV, K, V]`` float32 final state.
      use_qk_l2norm_in_kernel: L2-normalise q and k (over K, float32, eps 1e-6) first;
        ``use_qk_l2norm`` is an accepted alias.
      allow_neg_eigval: use ``2·beta`` instead of ``beta`` (beta = sigmoid(·) then spans [0, 2] and
        the eigenvalue ``1 − β`` along k spans [−1, 1]).  Do not also double beta yourself.
      cu_seqlens: ``[N + 1]`` int offsets of N packed sequences (B must be 1).
      chunk_size: static chunk length (chunk form only; accepted and ignored by the others).

    Returns:
      ``(o [B, T, HV, V] in v's dtype, final_state [N, HV, K, V] float32 or None)``.
"""
