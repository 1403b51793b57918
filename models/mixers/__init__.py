"""Sequence-mixer layers ``[B, T, D] -> [B, T, D]``, each usable on its own (see ``base.Mixer``).

``MIXERS`` maps the canonical names of :mod:`models.config` to the classes; every class takes
``(cfg: ModelConfig, rngs, layer_idx=0)``.
"""

from .attention import SlidingWindowAttention, SoftmaxAttention
from .base import Context, Mixer, make_context
from .conv import BaseConv
from .hybrid import LigerAttention, LoLCATsAttention
from .linear import (
                                  GLA,
                                  BasedAttention,
                                  DeltaNet,
                                  GatedDeltaNet,
                                  HedgehogAttention,
                                  LinearAttention,
                                  RecurrentMixer,
)
from .mom import MoM
from .retention import Lightning, RetNet

MIXERS = {
    "linear_attn": LinearAttention, "hedgehog": HedgehogAttention, "based": BasedAttention,
    "retnet": RetNet, "lightning": Lightning, "gla": GLA, "deltanet": DeltaNet,
    "gated_deltanet": GatedDeltaNet, "mom": MoM, "softmax": SoftmaxAttention,
    "swa": SlidingWindowAttention, "conv": BaseConv, "lolcats": LoLCATsAttention, "liger": LigerAttention,
}

__all__ = ["MIXERS", "Mixer", "RecurrentMixer", "Context", "make_context", "LinearAttention",
           "HedgehogAttention", "BasedAttention", "RetNet", "Lightning", "GLA", "DeltaNet",
           "GatedDeltaNet", "MoM", "SoftmaxAttention", "SlidingWindowAttention", "BaseConv",
           "LoLCATsAttention", "LigerAttention"]
