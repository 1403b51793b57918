"""Language-model configuration with validation that names the bad field.

The layer pattern picks one sequence mixer per layer, either as one letter per layer
(``"LLLS"``) or as comma-separated mixer names (``"gdn,gdn,gdn,softmax"``); a shorter pattern is
tiled over ``num_layers``.

| letter | name (aliases)                | mixer                                                   |
|--------|-------------------------------|---------------------------------------------------------|
| ``L``  | ``linear_attn``               | linear attention, feature map ``feature_map``           |
| ``H``  | ``hedgehog``                  | linear attention with Hedgehog's learnable softmax map |
| ``B``  | ``based``                     | Based: Taylor feature map, normalised linear attention |
| ``R``  | ``retnet``                    | RetNet multi-scale retention (fixed per-head decay)     |
| ``N``  | ``lightning``                 | Lightning Attention (TransNormerLLM layer)              |
| ``G``  | ``gla``                       | Gated Linear Attention (low-rank data-dependent gate)   |
| ``D``  | ``deltanet``                  | DeltaNet (delta rule)                                   |
| ``E``  | ``gated_deltanet`` (``gdn``)  | Gated DeltaNet                                          |
| ``M``  | ``mom``                       | Mixture-of-Memories (GDN memories, top-k router)        |
| ``S``  | ``softmax`` (``attn``)        | softmax attention, rotary, grouped-query heads          |
| ``W``  | ``swa``                       | sliding-window softmax attention (``window`` keys)      |
| ``C``  | ``conv`` (``baseconv``)       | BaseConv: a gated short convolution (``conv_size`` taps) |
| ``O``  | ``lolcats``                   | LoLCATs: windowed softmax + Hedgehog linear attention   |
| ``I``  | ``liger``                     | Liger: sliding-window softmax + GLA, no new parameters  |

Softmax and sliding-window layers take the options of the common pretrained checkpoints
(:mod:`lolax.models.hf`): biases on q/k/v (``qkv_bias``) and on the output (``o_bias``), a
per-head RMSNorm of q and k before rotary (``qk_norm``), rotary scaling (``rope_scaling``:
``linear`` divides every frequency by ``rope_scaling_factor``; ``llama3`` divides the low
frequencies only and blends the middle band, with ``rope_low_freq_factor``,
``rope_high_freq_factor`` and ``rope_original_max_len``), an explicit ``head_dim`` and
``tie_embeddings``.  They are ordinary options: a model trained from scratch may use them too.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import jax.numpy as jnp
import numpy as np

from ..ops.feature_maps import FEATURE_MAPS
from ..ops.simple_gla import LIGHTNING_DECAYS
from ..parallelism.ring import MODES as SEQUENCE_ATTENTION_MODES

# One letter per mixer kind in a layer pattern; models.mixers registers the classes.
MIXER_LETTERS = {
    "L": "linear_attn", "H": "hedgehog", "B": "based", "R": "retnet", "N": "lightning",
    "G": "gla", "D": "deltanet", "E": "gated_deltanet", "M": "mom", "S": "softmax", "W": "swa",
    "C": "conv", "O": "lolcats", "I": "liger",
}
MIXER_ALIASES = {"gdn": "gated_deltanet", "attn": "softmax", "attention": "softmax",
                 "sliding_window": "swa", "delta_rule": "deltanet",
                 "gated_delta_rule": "gated_deltanet", "linear": "linear_attn",
                 "baseconv": "conv"}
MIXER_NAMES = tuple(MIXER_LETTERS.values())
HEDGEHOG_FORMS = ("fla", "lolcats")
GDN_GATE_ACTIVATIONS = ("swish", "sigmoid")      # GDN output gate: FLA's / the paper's, or Kimi's KDA's
RETNET_NORMS = ("group", "rms")                  # per-head mean/variance norm (the paper's), or FLA's RMSNorm
LIGHTNING_NORMS = ("srms", "rms")                # one scale-free RMS over all heads (TransNormerLLM), or per head
LIGHTNING_GATES = ("identity", "swish")          # u = u_proj x (TransNormerLLM), or swish(g_proj x)
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
REMAT_POLICIES = ("none", "dots", "full")
ROPE_SCALINGS = ("none", "linear", "llama3")


def parse_pattern(pattern: str) -> tuple[str, ...]:
    """``"LLLS"`` or ``"gla,gla,softmax"`` -> canonical mixer names; ValueError naming the field."""
    if not isinstance(pattern, str) or not pattern.strip():
        raise ValueError(f"model.pattern must name at least one layer, e.g. 'LLLS', got {pattern!r}")
    known = (f"letters {', '.join(f'{k}={v}' for k, v in MIXER_LETTERS.items())}; or comma-separated "
             f"names {', '.join(MIXER_NAMES + tuple(MIXER_ALIASES))}")
    if "," in pattern or pattern.strip().lower() in MIXER_NAMES + tuple(MIXER_ALIASES):
        names = []
        for raw in pattern.split(","):
            name = raw.strip().lower()
            name = MIXER_ALIASES.get(name, name)
            if name not in MIXER_NAMES:
                raise ValueError(f"model.pattern = {pattern!r} has unknown mixer {raw.strip()!r}; known: {known}")
            names.append(name)
        return tuple(names)
    unknown = sorted(set(pattern) - set(MIXER_LETTERS))
    if unknown:
        raise ValueError(f"model.pattern = {pattern!r} has unknown mixer letter(s) {unknown}; known: {known}")
    return tuple(MIXER_LETTERS[c] for c in pattern)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shape and mixer choices of a decoder-only language model (see the module docstring)."""

    vocab_size: int = 256
    d_model: int = 128
    num_layers: int = 4
    pattern: str = "LLLS"
    num_heads: int = 4
    head_dim: int | None = None          # default d_model // num_heads
    num_kv_heads: int | None = None      # softmax / SWA grouped-query heads; default num_heads
    mlp_hidden: int | None = None        # default 8/3 d_model rounded up to a multiple of 32
    feature_map: str = "elu_plus_one"    # linear attention's (L) feature map, a key of ops.feature_maps.FEATURE_MAPS
    normalize: bool = False              # L/H: divide by s q.z (positive maps only) instead of RMSNorm
    chunk_size: int = 64
    implementation: str | None = None    # linear ops: None (Pallas kernels on GPU/TPU when supported) | xla | pallas
    rope_theta: float = 10_000.0
    tie_embeddings: bool = False
    norm_eps: float = 1e-6
    window: int = 64                     # SWA: keys per query, including itself
    sequence_attention: str = "ring"     # softmax/SWA under a sharded sequence: ring | ulysses | allgather
    conv_size: int = 4                   # short causal conv (DeltaNet, GDN, BaseConv); 0 disables it
    hedgehog_dim: int | None = None      # Hedgehog features per half (D'); default head size
    hedgehog_form: str = "fla"
    based_feature_dim: int = 16          # Based: q/k projected to this many dims before Taylor
    retnet_expand_v: int = 1             # RetNet value (and output gate) dim = expand_v * head size; the paper's is 2
    retnet_norm: str = "group"           # RetNet: group (the paper: per-head mean/variance, no scale) | rms (FLA)
    lightning_decay: str = "alibi_slopes"
    lightning_norm: str = "srms"         # Lightning: srms (TransNormerLLM: over all heads, no scale) | rms (per head)
    lightning_gate: str = "identity"     # Lightning: identity (TransNormerLLM's u_proj x) | swish (swish(g_proj x))
    gla_expand_k: float = 0.5            # GLA key dim = expand_k * head size
    gla_gate_rank: int = 16
    gla_gate_normalizer: float = 16.0
    gdn_expand_v: int = 1                # GDN / MoM value dim = expand_v * head size
    gdn_num_v_heads: int | None = None   # GDN value heads (a multiple of num_heads; None = num_heads)
    gdn_use_gate: bool = True            # GDN: output gate (FLA's use_gate); False: o_norm(o) with no g_proj
    gdn_gate_activation: str = "swish"   # GDN output gate: swish (FLA, the paper) | sigmoid (Kimi's KDA)
    allow_neg_eigval: bool = False       # DeltaNet / GDN / MoM: beta = 2 sigmoid(.)
    mom_num_memories: int = 4
    mom_topk: int = 2
    mom_shared_memory: bool = True
    aux_loss_weight: float = 0.01        # MoM load-balancing loss weight (already in the aux)
    dtype: str = "float32"               # compute dtype of projections and activations: float32 | bfloat16 | float16
    param_dtype: str = "float32"         # dtype the parameters are stored (and trained) in
    scan_layers: bool = False            # run each repeat of the pattern under one lax.scan over stacked layers
    remat: str = "none"                  # per layer (or per scanned repeat): none | dots | full
    sltrain_rank: int = 0                # > 0: blocks' projections are SLTrain (alpha/r) A B + S (models/sltrain.py)
    sltrain_density: float = 0.03        # SLTrain: fraction of each weight's entries in the sparse part S
    sltrain_alpha: float = 32.0          # SLTrain: the low-rank product is scaled by alpha / rank
    qkv_bias: bool = False               # softmax-family layers: biases on the q, k, v projections
    o_bias: bool = False                 # softmax-family layers: bias on the output projection
    qk_norm: bool = False                # softmax-family layers: per-head RMSNorm of q and k before rotary
    rope_scaling: str = "none"           # rotary frequency scaling: none | linear | llama3
    rope_scaling_factor: float = 1.0     # linear / llama3: how much longer the context gets
    rope_low_freq_factor: float = 1.0    # llama3: wavelengths above original_max_len / this are divided
    rope_high_freq_factor: float = 4.0   # llama3: wavelengths below original_max_len / this are kept
    rope_original_max_len: int = 8192    # llama3: the context length the model was pretrained at

    def __post_init__(self):
        positive = ("vocab_size", "d_model", "num_layers", "num_heads", "chunk_size", "window",
                    "based_feature_dim", "gla_gate_rank", "gdn_expand_v", "retnet_expand_v",
                    "mom_num_memories", "mom_topk")
        for name in positive:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"model.{name} must be a positive int, got {value!r}")
        for name in ("head_dim", "num_kv_heads", "mlp_hidden", "hedgehog_dim", "gdn_num_v_heads"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"model.{name} must be a positive int or None, got {value!r}")
        if isinstance(self.conv_size, bool) or not isinstance(self.conv_size, int) or self.conv_size < 0:
            raise ValueError(f"model.conv_size must be an int >= 0 (0 disables the short convolution), "
                             f"got {self.conv_size!r}")
        if self.head_dim is None and self.d_model % self.num_heads:
            raise ValueError(f"model.num_heads = {self.num_heads} must divide model.d_model = "
                             f"{self.d_model} (or set model.head_dim)")
        kinds = parse_pattern(self.pattern)
        if "conv" in kinds and self.conv_size < 1:
            raise ValueError(f"model.conv_size = {self.conv_size}: the BaseConv layers (C) in pattern "
                             f"{self.pattern!r} need a kernel of at least 1 tap")
        if self.num_layers % len(kinds):
            raise ValueError(f"model.num_layers = {self.num_layers} must be a multiple of the pattern "
                             f"length {len(kinds)} (pattern {self.pattern!r})")
        if self.gdn_num_v_heads is not None and self.gdn_num_v_heads % self.num_heads:
            raise ValueError(f"model.gdn_num_v_heads = {self.gdn_num_v_heads} must be a multiple of "
                             f"model.num_heads = {self.num_heads} (each key head serves a group of value heads)")
        kv = self.kv_heads
        if self.num_heads % kv:
            raise ValueError(f"model.num_kv_heads = {kv} must divide model.num_heads = {self.num_heads}")
        if self.feature_map not in FEATURE_MAPS:
            raise ValueError(f"model.feature_map must be one of {sorted(FEATURE_MAPS)}, got {self.feature_map!r}")
        if self.hedgehog_form not in HEDGEHOG_FORMS:
            raise ValueError(f"model.hedgehog_form must be one of {HEDGEHOG_FORMS}, got {self.hedgehog_form!r}")
        if self.sequence_attention not in SEQUENCE_ATTENTION_MODES:
            raise ValueError(f"model.sequence_attention must be one of {SEQUENCE_ATTENTION_MODES}, "
                             f"got {self.sequence_attention!r}")
        if self.lightning_decay not in LIGHTNING_DECAYS:
            raise ValueError(f"model.lightning_decay must be one of {sorted(LIGHTNING_DECAYS)}, "
                             f"got {self.lightning_decay!r}")
        if not isinstance(self.gdn_use_gate, bool):
            raise ValueError(f"model.gdn_use_gate must be a bool, got {self.gdn_use_gate!r}")
        for name, choices in (("gdn_gate_activation", GDN_GATE_ACTIVATIONS), ("retnet_norm", RETNET_NORMS),
                              ("lightning_norm", LIGHTNING_NORMS), ("lightning_gate", LIGHTNING_GATES)):
            if getattr(self, name) not in choices:
                raise ValueError(f"model.{name} must be one of {choices}, got {getattr(self, name)!r}")
        if self.implementation not in (None, "xla", "pallas"):
            raise ValueError(f"model.implementation must be None, 'xla' or 'pallas', got {self.implementation!r}")
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in DTYPES:
                raise ValueError(f"model.{name} must be one of {sorted(DTYPES)}, got {getattr(self, name)!r}")
        if not isinstance(self.scan_layers, bool):
            raise ValueError(f"model.scan_layers must be a bool, got {self.scan_layers!r}")
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"model.remat must be one of {REMAT_POLICIES}, got {self.remat!r}")
        if self.scan_layers and "lightning" in kinds:
            raise ValueError("model.scan_layers = True cannot stack Lightning layers (N): their decay "
                             "depends on the layer's depth, so repeats of the pattern differ; set "
                             "model.scan_layers = False")
        if not isinstance(self.normalize, bool):
            raise ValueError(f"model.normalize must be a bool, got {self.normalize!r}")
        if "gla" in kinds and (not self.gla_expand_k > 0 or (self.gla_expand_k * self.head_size) % 1):
            raise ValueError(f"model.gla_expand_k = {self.gla_expand_k} times the head size "
                             f"{self.head_size} must be a positive integer")
        if not self.gla_expand_k > 0:
            raise ValueError(f"model.gla_expand_k must be > 0, got {self.gla_expand_k!r}")
        if self.mom_topk > self.mom_num_memories:
            raise ValueError(f"model.mom_topk = {self.mom_topk} must be <= model.mom_num_memories = "
                             f"{self.mom_num_memories}")
        if not self.gla_gate_normalizer > 0:
            raise ValueError(f"model.gla_gate_normalizer must be > 0, got {self.gla_gate_normalizer!r}")
        for name, what in (("norm_eps", "the RMSNorm epsilon"), ("rope_theta", "the rotary base")):
            value = getattr(self, name)
            if (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
                    or not value > 0):
                raise ValueError(f"model.{name} ({what}) must be a finite number > 0, got {value!r}")
        if (isinstance(self.aux_loss_weight, bool) or not isinstance(self.aux_loss_weight, (int, float))
                or not math.isfinite(self.aux_loss_weight) or self.aux_loss_weight < 0):
            raise ValueError(f"model.aux_loss_weight must be a finite number >= 0 (0 turns MoM's load-balancing "
                             f"loss off), got {self.aux_loss_weight!r}")
        if isinstance(self.sltrain_rank, bool) or not isinstance(self.sltrain_rank, int) or self.sltrain_rank < 0:
            raise ValueError(f"model.sltrain_rank must be an int >= 0 (0 keeps dense projections), "
                             f"got {self.sltrain_rank!r}")
        if (isinstance(self.sltrain_density, bool) or not isinstance(self.sltrain_density, (int, float))
                or not 0 < self.sltrain_density < 1):
            raise ValueError(f"model.sltrain_density must be a number in (0, 1), got {self.sltrain_density!r}")
        if (isinstance(self.sltrain_alpha, bool) or not isinstance(self.sltrain_alpha, (int, float))
                or not self.sltrain_alpha > 0):
            raise ValueError(f"model.sltrain_alpha must be a number > 0, got {self.sltrain_alpha!r}")
        if self.sltrain_rank and self.scan_layers:
            raise ValueError("model.sltrain_rank > 0 cannot be combined with model.scan_layers = True: every "
                             "SLTrain layer draws its own sparse support from a static layer id, so the "
                             "repeats of the pattern differ and cannot be stacked; set model.scan_layers = False")
        for name in ("qkv_bias", "o_bias", "qk_norm"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"model.{name} must be a bool, got {getattr(self, name)!r}")
        if self.rope_scaling not in ROPE_SCALINGS:
            raise ValueError(f"model.rope_scaling must be one of {ROPE_SCALINGS}, got {self.rope_scaling!r}")
        for name in ("rope_scaling_factor", "rope_low_freq_factor", "rope_high_freq_factor"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"model.{name} must be a number > 0, got {value!r}")
        if self.rope_scaling == "llama3" and not self.rope_high_freq_factor > self.rope_low_freq_factor:
            raise ValueError(f"model.rope_high_freq_factor = {self.rope_high_freq_factor} must exceed "
                             f"model.rope_low_freq_factor = {self.rope_low_freq_factor} for llama3 rotary scaling")
        value = self.rope_original_max_len
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"model.rope_original_max_len must be a positive int, got {value!r}")
        rotary_kinds = {"softmax", "swa", "retnet", "lolcats", "liger"}
        if rotary_kinds & set(kinds) and self.head_size % 2:
            raise ValueError(f"model.head_dim = {self.head_size} must be even for rotary embeddings "
                             f"(used by {sorted(rotary_kinds & set(kinds))})")

    @property
    def layer_kinds(self) -> tuple[str, ...]:
        kinds = parse_pattern(self.pattern)
        return tuple(kinds[i % len(kinds)] for i in range(self.num_layers))

    @property
    def head_size(self) -> int:
        return self.head_dim or self.d_model // self.num_heads

    @property
    def compute_dtype(self):
        """``dtype`` as a jnp dtype."""
        return DTYPES[self.dtype]

    @property
    def params_dtype(self):
        """``param_dtype`` as a jnp dtype."""
        return DTYPES[self.param_dtype]

    @property
    def pattern_length(self) -> int:
        """Layers in one repeat of the pattern (what a scanned model stacks)."""
        return len(parse_pattern(self.pattern))

    def rope_inv_freq(self) -> np.ndarray:
        """The rotary inverse frequencies ``[head_size / 2]`` (float64), scaled by ``rope_scaling``."""
        d = self.head_size
        inv_freq = self.rope_theta ** (-np.arange(0, d, 2, dtype=np.float64) / d)
        factor = float(self.rope_scaling_factor)
        if self.rope_scaling == "linear":
            return inv_freq / factor
        if self.rope_scaling == "llama3":
            low, high = float(self.rope_low_freq_factor), float(self.rope_high_freq_factor)
            wavelen = 2 * np.pi / inv_freq
            # long wavelengths (beyond the pretraining context / low) are stretched by the factor,
            # short ones (under context / high) kept, and the band between blended linearly
            scaled = np.where(wavelen > self.rope_original_max_len / low, inv_freq / factor, inv_freq)
            smooth = (self.rope_original_max_len / wavelen - low) / (high - low)
            blended = (1 - smooth) * scaled / factor + smooth * scaled
            middle = (wavelen >= self.rope_original_max_len / high) & (wavelen <= self.rope_original_max_len / low)
            return np.where(middle, blended, scaled)
        return inv_freq

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads

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
