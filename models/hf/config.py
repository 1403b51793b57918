"""Hugging Face ``config.json`` <-> :class:`~lolax.models.ModelConfig`.

Four decoder architectures are read and written; each is the same pre-norm SwiGLU Transformer
with rotary softmax attention and differs only in options :class:`ModelConfig` already has:

======================== ============================================================================
``architectures``        what it sets in ModelConfig
======================== ============================================================================
``LlamaForCausalLM``     ``attention_bias`` -> ``qkv_bias`` and ``o_bias``; every layer ``S``
``MistralForCausalLM``   ``sliding_window`` -> every layer ``W`` with ``window = sliding_window``
                         (null: every layer ``S``); no biases
``Qwen2ForCausalLM``     ``qkv_bias`` always, no ``o_bias``; ``layer_types`` (or
                         ``use_sliding_window`` / ``max_window_layers``) -> a per-layer pattern
``Qwen3ForCausalLM``     ``qk_norm``; ``attention_bias`` -> both biases; windows as Qwen2
======================== ============================================================================

Common to all: ``vocab_size``, ``hidden_size`` -> ``d_model``, ``intermediate_size`` ->
``mlp_hidden``, ``num_hidden_layers``, ``num_attention_heads``, ``num_key_value_heads``,
``head_dim``, ``rms_norm_eps`` -> ``norm_eps``, ``tie_word_embeddings``, and the rotary
parameters (``rope_parameters``, or the older ``rope_theta`` plus ``rope_scaling``) of type
``default``, ``linear`` or ``llama3``.  A key missing from the file takes the default of the
architecture's transformers config class.  Anything the model cannot reproduce exactly raises
a ValueError naming the file, the key and its value.

>>> cfg = config_from_hf({"architectures": ["MistralForCausalLM"], "model_type": "mistral",
...     "vocab_size": 256, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
...     "num_attention_heads": 4, "num_key_value_heads": 2, "sliding_window": 8})
>>> cfg.pattern, cfg.window, cfg.kv_heads, cfg.head_size
('W', 8, 2, 16)
>>> config_to_hf(cfg)["architectures"], config_to_hf(cfg)["sliding_window"]
(['MistralForCausalLM'], 8)
"""

from __future__ import annotations

import json
import pathlib
from typing import Any, Callable, Mapping

from ..config import ModelConfig

ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}
"""Supported ``architectures`` entry -> its ``model_type``."""

ROPE_TYPES = ("default", "linear", "llama3")
"""Supported rotary types (``rope_parameters.rope_type``)."""

# Defaults of transformers' config classes for the optional keys read here (a file that omits
# a key gets what transformers would give it).
_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": {"num_key_value_heads": None, "head_dim": None, "max_position_embeddings": 2048},
    "mistral": {"num_key_value_heads": 8, "head_dim": None, "max_position_embeddings": 131072,
                "sliding_window": 4096},
    "qwen2": {"num_key_value_heads": 32, "head_dim": None, "max_position_embeddings": 32768,
              "sliding_window": 4096, "use_sliding_window": False, "max_window_layers": 28},
    "qwen3": {"num_key_value_heads": 32, "head_dim": 128, "max_position_embeddings": 32768,
              "sliding_window": 4096, "use_sliding_window": False, "max_window_layers": 28},
}
_COMMON_DEFAULTS = {"hidden_act": "silu", "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
                    "attention_bias": False, "mlp_bias": False, "rope_theta": 10_000.0}
_REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
_LAYER_TYPES = {"full_attention": "S", "sliding_attention": "W"}

SUPPORTED = (f"supported: architectures {sorted(ARCHITECTURES)} with hidden_act 'silu', mlp_bias false and "
             f"rotary types {list(ROPE_TYPES)} over the full head (no partial_rotary_factor)")


def _unsupported(source: str, key: str, value: Any, why: str = "") -> ValueError:
    why = f" ({why})" if why else ""
    return ValueError(f"{source}: {key} = {value!r} is not supported{why}; {SUPPORTED}")


def _architecture(hf: Mapping[str, Any], source: str) -> str:
    """The supported architecture named by ``architectures`` (or, without it, ``model_type``)."""
    archs = hf.get("architectures")
    model_type = hf.get("model_type")
    if archs is None:
        by_type = {v: k for k, v in ARCHITECTURES.items()}
        if model_type not in by_type:
            raise _unsupported(source, "model_type", model_type)
        return by_type[model_type]
    if not isinstance(archs, list) or len(archs) != 1 or archs[0] not in ARCHITECTURES:
        raise _unsupported(source, "architectures", archs)
    arch = archs[0]
    if model_type is not None and model_type != ARCHITECTURES[arch]:
        raise ValueError(f"{source}: model_type = {model_type!r} does not match architectures = {archs!r} "
                         f"(expected model_type {ARCHITECTURES[arch]!r})")
    return arch


def _rope(hf: Mapping[str, Any], source: str, max_len: int) -> dict[str, Any]:
    """The ModelConfig rotary fields from ``rope_scaling`` / ``rope_parameters`` / ``rope_theta``."""
    key = "rope_scaling" if hf.get("rope_scaling") else "rope_parameters"
    params = dict(hf.get(key) or {})
    layer_types = hf.get("layer_types") or ()
    nested = [k for k in params if k in layer_types]
    if nested:
        raise _unsupported(source, key, params, "rotary parameters per layer type")
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise _unsupported(source, f"{key}.rope_type", rope_type)
    for where, value in ((f"{key}.partial_rotary_factor", params.get("partial_rotary_factor")),
                         ("partial_rotary_factor", hf.get("partial_rotary_factor"))):
        if value is not None and float(value) != 1.0:
            raise _unsupported(source, where, value, "rotary over part of the head")
    theta = params.get("rope_theta", hf.get("rope_theta", _COMMON_DEFAULTS["rope_theta"]))
    out: dict[str, Any] = {"rope_theta": float(theta), "rope_scaling": "none" if rope_type == "default" else rope_type,
                           "rope_original_max_len": int(max_len)}

    def number(name: str) -> float:
        if params.get(name) is None:
            raise ValueError(f"{source}: {key}.{name} is missing (needed by rope_type {rope_type!r})")
        return float(params[name])

    if rope_type in ("linear", "llama3"):
        out["rope_scaling_factor"] = number("factor")
    if rope_type == "llama3":
        out["rope_low_freq_factor"] = number("low_freq_factor")
        out["rope_high_freq_factor"] = number("high_freq_factor")
        # transformers gives a top-level original_max_position_embeddings priority, then the
        # rotary parameters', then max_position_embeddings
        original = hf.get("original_max_position_embeddings",
                          params.get("original_max_position_embeddings", max_len))
        out["rope_original_max_len"] = int(original)
    return out


def _layer_pattern(hf: Mapping[str, Any], arch: str, num_layers: int, get: Callable[[str], Any],
                   source: str) -> tuple[str, int | None]:
    """(one letter per layer, sliding window or None) as transformers builds the layers."""
    if arch == "LlamaForCausalLM":
        return "S" * num_layers, None
    window = get("sliding_window")
    if arch == "MistralForCausalLM":
        return ("S" if window is None else "W") * num_layers, window
    # Qwen2 / Qwen3: the window applies only with use_sliding_window; the layer types come from
    # layer_types or else from max_window_layers (layers from that index on slide)
    if not get("use_sliding_window"):
        window = None
    layer_types = hf.get("layer_types")
    if layer_types is None:
        first = get("max_window_layers")
        layer_types = ["sliding_attention" if window is not None and i >= first else "full_attention"
                       for i in range(num_layers)]
    if not isinstance(layer_types, list) or len(layer_types) != num_layers:
        raise ValueError(f"{source}: layer_types = {layer_types!r} must list one type per layer "
                         f"(num_hidden_layers = {num_layers})")
    for value in layer_types:
        if value not in _LAYER_TYPES:
            raise _unsupported(source, "layer_types", layer_types, f"layer type {value!r}; known: {list(_LAYER_TYPES)}")
    letters = "".join(_LAYER_TYPES[t] for t in layer_types)
    if "W" in letters and window is None:
        raise ValueError(f"{source}: layer_types has sliding_attention layers but sliding_window = "
                         f"{hf.get('sliding_window')!r} with use_sliding_window = {hf.get('use_sliding_window')!r} "
                         f"gives no window")
    return letters, window


def _compact(letters: str) -> str:
    """``"SSSS"`` -> ``"S"``; a mixed pattern stays one letter per layer."""
    return letters[0] if len(set(letters)) == 1 else letters


def config_from_hf(hf_config: Mapping[str, Any], source: str = "config.json") -> ModelConfig:
    """A Hugging Face config (the dict of ``config.json``) -> :class:`ModelConfig`.

    ``source`` names the file in error messages.  The compute and parameter dtypes keep their
    defaults (``float32``): :func:`lolax.models.hf.load` sets them.  ``rope_original_max_len``
    holds ``original_max_position_embeddings`` for ``llama3`` rotary scaling and
    ``max_position_embeddings`` otherwise (so that :func:`config_to_hf` can write it back).
    Raises ValueError naming ``source``, the key and the value for what cannot be reproduced.
    """
    hf = dict(hf_config)
    arch = _architecture(hf, source)
    defaults = {**_COMMON_DEFAULTS, **_DEFAULTS[ARCHITECTURES[arch]]}

    def get(key: str):
        return hf[key] if key in hf else defaults.get(key)

    for key in _REQUIRED:
        value = hf.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{source}: {key} must be a positive int, got {value!r}")
    if get("hidden_act") != "silu":
        raise _unsupported(source, "hidden_act", get("hidden_act"), "the MLP is SwiGLU with SiLU")
    if get("mlp_bias"):
        raise _unsupported(source, "mlp_bias", hf["mlp_bias"], "the MLP projections have no biases")
    d, heads, layers = hf["hidden_size"], hf["num_attention_heads"], hf["num_hidden_layers"]
    kv = get("num_key_value_heads") or heads
    head_dim = get("head_dim") or d // heads
    max_len = get("max_position_embeddings")
    letters, window = _layer_pattern(hf, arch, layers, get, source)
    bias = bool(get("attention_bias"))
    qkv_bias, o_bias = {"LlamaForCausalLM": (bias, bias), "MistralForCausalLM": (False, False),
                        "Qwen2ForCausalLM": (True, False), "Qwen3ForCausalLM": (bias, bias)}[arch]
    values: dict[str, Any] = dict(
        vocab_size=hf["vocab_size"], d_model=d, num_layers=layers, pattern=_compact(letters),
        num_heads=heads, head_dim=None if head_dim * heads == d else head_dim,
        num_kv_heads=None if kv == heads else kv, mlp_hidden=hf["intermediate_size"],
        tie_embeddings=bool(get("tie_word_embeddings")), norm_eps=float(get("rms_norm_eps")),
        qkv_bias=qkv_bias, o_bias=o_bias, qk_norm=arch == "Qwen3ForCausalLM",
        **_rope(hf, source, max_len))
    if window is not None:
        values["window"] = int(window)
    try:
        return ModelConfig(**values)
    except ValueError as e:
        raise ValueError(f"{source}: {e}") from None


def _window_keys(cfg: ModelConfig) -> dict[str, Any]:
    """Qwen2 / Qwen3 sliding-window keys for ``cfg``'s layer pattern."""
    types = ["sliding_attention" if k == "swa" else "full_attention" for k in cfg.layer_kinds]
    sliding = "sliding_attention" in types
    return {"use_sliding_window": sliding, "sliding_window": cfg.window if sliding else None,
            "max_window_layers": types.index("sliding_attention") if sliding else cfg.num_layers,
            "layer_types": types}


def _choose_architecture(cfg: ModelConfig) -> str:
    kinds = set(cfg.layer_kinds)
    if cfg.qk_norm:
        if cfg.qkv_bias != cfg.o_bias:
            raise ValueError(f"model.qk_norm = True with model.qkv_bias = {cfg.qkv_bias} and model.o_bias = "
                             f"{cfg.o_bias}: Qwen3 (the architecture with q/k norms) has either both biases or "
                             f"neither")
        return "Qwen3ForCausalLM"
    if cfg.qkv_bias and not cfg.o_bias:
        return "Qwen2ForCausalLM"
    if cfg.o_bias and not cfg.qkv_bias:
        raise ValueError("model.o_bias = True with model.qkv_bias = False: no supported architecture has an "
                         "output bias without q/k/v biases")
    if kinds == {"softmax"}:
        return "LlamaForCausalLM"
    if kinds == {"swa"} and not cfg.qkv_bias:
        return "MistralForCausalLM"
    raise ValueError(f"model.pattern = {cfg.pattern!r} with model.qkv_bias = model.o_bias = {cfg.qkv_bias}: "
                     f"per-layer sliding windows exist only in Qwen2 (q/k/v biases, no output bias) and "
                     f"Qwen3 (qk_norm), and Mistral (every layer sliding) has no biases")


def config_to_hf(cfg: ModelConfig, *, max_position_embeddings: int | None = None) -> dict[str, Any]:
    """:class:`ModelConfig` -> the dict of a Hugging Face ``config.json`` transformers can load.

    The architecture follows from the options: ``qk_norm`` -> Qwen3; q/k/v biases without an
    output bias -> Qwen2; otherwise Llama when every layer is softmax and Mistral when every
    layer is a sliding window.  Both the current (``rope_parameters``, ``dtype``) and the older
    (``rope_theta``, ``rope_scaling``, ``torch_dtype``) keys are written.  ``max_position_embeddings``
    defaults to ``rope_original_max_len`` (times the factor under ``llama3`` scaling).  Raises
    ValueError for a config no supported architecture expresses (mixers other than softmax and
    sliding-window attention, SLTrain, bias or window combinations none of them has).
    """
    other = sorted(set(cfg.layer_kinds) - {"softmax", "swa"})
    if other:
        raise ValueError(f"model.pattern = {cfg.pattern!r} has {other} layers: Hugging Face checkpoints hold "
                         f"softmax (S) and sliding-window (W) attention layers only")
    if cfg.sltrain_rank:
        raise ValueError(f"model.sltrain_rank = {cfg.sltrain_rank}: SLTrain projections (A B + S) are not dense "
                         f"kernels a Hugging Face checkpoint can hold")
    arch = _choose_architecture(cfg)
    if max_position_embeddings is None:
        scale = cfg.rope_scaling_factor if cfg.rope_scaling == "llama3" else 1.0
        max_position_embeddings = int(round(cfg.rope_original_max_len * scale))
    rope: dict[str, Any] = {"rope_type": "default" if cfg.rope_scaling == "none" else cfg.rope_scaling}
    if cfg.rope_scaling in ("linear", "llama3"):
        rope["factor"] = float(cfg.rope_scaling_factor)
    if cfg.rope_scaling == "llama3":
        rope.update(low_freq_factor=float(cfg.rope_low_freq_factor),
                    high_freq_factor=float(cfg.rope_high_freq_factor),
                    original_max_position_embeddings=cfg.rope_original_max_len)
    out: dict[str, Any] = {
        "architectures": [arch], "model_type": ARCHITECTURES[arch],
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model, "intermediate_size": cfg.hidden_size,
        "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.kv_heads, "head_dim": cfg.head_size, "hidden_act": "silu",
        "max_position_embeddings": max_position_embeddings, "rms_norm_eps": float(cfg.norm_eps),
        "tie_word_embeddings": cfg.tie_embeddings,
        "rope_parameters": {**rope, "rope_theta": float(cfg.rope_theta)},
        "rope_theta": float(cfg.rope_theta), "rope_scaling": None if cfg.rope_scaling == "none" else rope,
        "dtype": cfg.param_dtype, "torch_dtype": cfg.param_dtype,
        "initializer_range": 0.02, "attention_dropout": 0.0, "use_cache": True,
        "bos_token_id": None, "eos_token_id": None, "pad_token_id": None,
    }
    if arch == "LlamaForCausalLM":
        out.update(attention_bias=cfg.qkv_bias, mlp_bias=False, pretraining_tp=1)
    elif arch == "MistralForCausalLM":
        out["sliding_window"] = cfg.window if "swa" in cfg.layer_kinds else None
    else:
        out.update(_window_keys(cfg))
        if arch == "Qwen3ForCausalLM":
            out["attention_bias"] = cfg.qkv_bias
    return out


def read_config(path: str | pathlib.Path) -> tuple[dict[str, Any], pathlib.Path]:
    """``(the dict of <path>/config.json, its path)``; FileNotFoundError / ValueError naming the file."""
    file = pathlib.Path(path) / "config.json"
    if not file.is_file():
        raise FileNotFoundError(f"{file} not found: a Hugging Face checkpoint folder holds config.json "
                                f"next to its safetensors files")
    try:
        hf = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{file} is not valid JSON: {e}") from None
    if not isinstance(hf, dict):
        raise ValueError(f"{file} must hold a JSON object, got {type(hf).__name__}")
    return hf, file


def is_checkpoint(path: str | pathlib.Path) -> bool:
    """Whether ``path`` is a folder whose ``config.json`` has a ``model_type`` (never raises)."""
    try:
        hf, _ = read_config(path)
    except (OSError, ValueError):
        return False
    return "model_type" in hf

