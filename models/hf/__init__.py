"""Hugging Face checkpoints in and out: Llama, Mistral, Qwen2 and Qwen3 safetensors folders.

* :func:`load` ``(path, dtype, mesh, **overrides) -> (LanguageModel, ModelConfig)``: a folder
  as ``save_pretrained`` writes it (``config.json`` and ``model.safetensors`` or shards with
  ``model.safetensors.index.json``), optionally straight onto a mesh, each device reading only
  its slice of every tensor.
* :func:`save` ``(model, path, max_shard_size)``: the same layout, loadable by transformers.
* :func:`config_from_hf` / :func:`config_to_hf`: ``config.json`` <-> :class:`ModelConfig`.
* :func:`is_checkpoint`: whether a folder holds a Hugging Face config.

See ``docs/checkpoints.md`` for the supported architectures, what each key maps to, what is
refused and the measured agreement with transformers.
"""

from .checkpoint import RUNTIME_FIELDS, load, save
from .config import ARCHITECTURES, ROPE_TYPES, config_from_hf, config_to_hf, is_checkpoint, read_config
from .weights import SafetensorsFolder, TensorSpec, tensor_specs

__all__ = ["ARCHITECTURES", "ROPE_TYPES", "RUNTIME_FIELDS", "SafetensorsFolder", "TensorSpec", "config_from_hf",
           "config_to_hf", "is_checkpoint", "load", "read_config", "save", "tensor_specs"]
