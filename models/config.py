"""Language-model configuration with validation that names the bad field."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

# One letter per mixer kind in a layer pattern; models.mixers registers the classes.
MIXER_LETTERS = {"L": "linear_attn", "S": "softmax"}
FEATURE_MAPS = ("identity", "elu+1", "relu")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shape and mixer choices of a decoder-only language model.

    ``pattern`` lists one letter per layer (``L`` linear attention, ``S`` softmax attention); a
    shorter pattern is tiled, so ``pattern="LLLS", num_layers=8`` gives two ``LLLS`` groups.
    """

    vocab_size: int = 256
    d_model: int = 128
    num_layers: int = 4
    pattern: str = "LLLS"
    num_heads: int = 4
    head_dim: int | None = None          # default d_model // num_heads
    mlp_hidden: int | None = None        # default 8/3 d_model rounded up to a multiple of 32
    feature_map: str = "elu+1"           # linear attention's feature map on q and k
    chunk_size: int = 64
    rope_theta: float = 10_000.0
    tie_embeddings: bool = False
    norm_eps: float = 1e-6

    def __post_init__(self):
        positive = ("vocab_size", "d_model", "num_layers", "num_heads", "chunk_size")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"model.{name} must be a positive int, got {value!r}")
        if self.head_dim is None and self.d_model % self.num_heads:
            raise ValueError(f"model.num_heads = {self.num_heads} must divide model.d_model = "
                             f"{self.d_model} (or set model.head_dim)")
        if not self.pattern:
            raise ValueError("model.pattern must name at least one layer, e.g. 'LLLS'")
        unknown = sorted(set(self.pattern) - set(MIXER_LETTERS))
        if unknown:
            raise ValueError(f"model.pattern = {self.pattern!r} has unknown mixer letter(s) {unknown}; "
                             f"known: {', '.join(f'{k}={v}' for k, v in MIXER_LETTERS.items())}")
        if self.num_layers % len(self.pattern):
            raise ValueError(f"model.num_layers = {self.num_layers} must be a multiple of the pattern "
                             f"length {len(self.pattern)} (pattern {self.pattern!r})")
        if self.feature_map not in FEATURE_MAPS:
            raise ValueError(f"model.feature_map must be one of {FEATURE_MAPS}, got {self.feature_map!r}")

    @property
    def layer_kinds(self) -> tuple[str, ...]:
        return tuple(MIXER_LETTERS[self.pattern[i % len(self.pattern)]] for i in range(self.num_layers))

    @property
    def head_size(self) -> int:
        return self.head_dim or self.d_model // self.num_heads

    @property
    def hidden_size(self) -> int:
        return self.mlp_hidden or -(-(8 * self.d_model // 3) // 32) * 32

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown model config key(s) {unknown}; known: {sorted(known)}")
        return cls(**dict(values))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
