"""Flax NNX sequence-mixer layers and decoder-only language models built on ``ops``.

See ``docs/models.md``: the mixers (``models.mixers.MIXERS``), layer patterns, presets
(``experiments/configs/presets.py``) and cached generation; ``peft`` holds the adapters
(``docs/peft.md``).
"""

from . import peft  # noqa: E402  (adapters; after the model classes it wraps)
from .config import MIXER_LETTERS, ModelConfig
from .lm import Block, LanguageModel, count_params
from .mixers import MIXERS
from .sampling import generate

__all__ = ["peft", "LanguageModel", "ModelConfig", "count_params", "generate", "Block", "MIXERS", "MIXER_LETTERS"]
