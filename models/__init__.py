"""Flax NNX sequence-mixer layers and decoder-only language models built on ``ops``."""

from models.config import ModelConfig
from models.lm import LanguageModel, count_params
from models.sampling import generate

__all__ = ["LanguageModel", "ModelConfig", "count_params", "generate"]
