"""Softmax baselines: causal (optionally sliding-window) attention, blockwise and naive.

Layout ``[B, T, H, D]``; k and v may have fewer heads ``Hk`` dividing H (grouped-query attention,
query head h reads kv head ``h // (H // Hk)``).  These ops return only ``o`` (there is no
fixed-size state); decoding uses :func:`attention_step` over a KV cache.

Sliding-window convention: query i attends keys ``i − window < j <= i``, i.e. ``window`` keys
including itself (FlashAttention's ``window_size=(window − 1, 0)``).

:func:`attention` runs the same causal (or sliding-window) attention on the vendors' fused
kernels where they take the inputs (cuDNN on CUDA GPUs, splash attention on TPUs) and on the
blockwise XLA form otherwise; :func:`select_attention` is its choice (see :mod:`.fast`).
"""

from .fast import attention, select_attention
from .softmax import (
                                   attention_step,
                                   naive_sliding_window_attention,
                                   naive_softmax_attention,
                                   sliding_window_attention,
                                   softmax_attention,
)

__all__ = ["softmax_attention", "sliding_window_attention", "naive_softmax_attention",
           "naive_sliding_window_attention", "attention_step", "attention", "select_attention"]
