"""Softmax baselines: causal (optionally sliding-window) attention, blockwise and naive.

Layout ``[B, T, H, D]``; k and v may have fewer heads ``Hk`` dividing H (grouped-query attention,
query head h reads kv head ``h // (H // Hk)``).  These ops return only ``o`` (there is no
fixed-size state); decoding uses :func:`attention_step` over a KV cache.

Sliding-window convention: query i attends keys ``i − window < j <= i``, i.e. ``window`` keys
including itself (FlashAttention's ``window_size=(window − 1, 0)``).
"""

from .softmax import (
                                   attention_step,
                                   naive_sliding_window_attention,
                                   naive_softmax_attention,
                                   sliding_window_attention,
                                   softmax_attention,
)

__all__ = ["softmax_attention", "sliding_window_attention", "naive_softmax_attention",
           "naive_sliding_window_attention", "attention_step"]
