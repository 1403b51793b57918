"""Sequence mixers in the flash-linear-attention layout ``[B, T, H, D]``.

One sub-package per family, each exposing ``chunk_*`` (chunkwise, the training default),
``recurrent_*`` (token-by-token ``lax.scan``, for decoding) and ``naive_*`` (the float32 oracle):

    from ops import gla
    o, final_state = gla.chunk_gla(q, k, v, g, output_final_state=True)

Families: ``linear_attn`` (with ``feature_maps``), ``simple_gla`` (RetNet, Lightning),
``gla``, ``delta_rule``, ``gated_delta_rule``, and the softmax baselines in ``attention``.
This package never imports Flax.
"""
