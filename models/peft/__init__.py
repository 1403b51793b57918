"""Adapters for fine-tuning NNX models: the LoRA family, wrapped around ``nnx.Linear`` layers.

``apply(model, PeftConfig(...), rngs)`` wraps the targeted linear layers in place,
``trainable(model)`` is the NNX filter of what trains, ``merge(model)`` folds the adapters
back into ordinary kernels. Methods (``METHODS``): ``lora``, ``rslora``, ``dora``, ``dylora``,
``nola``, ``randlora``, ``lora_sb``, ``eva``, ``svfit``, ``loldu``. See ``docs/peft.md``.
"""

from . import data_init, decomposition, lora, random_bases  # noqa: F401  (register the methods)
from .api import (
    adapted_layers,
    adapter_state,
    apply,
    base_state,
    count,
    default_loss,
    fingerprint,
    linear_layers,
    merge,
    set_rank,
    trainable,
)
from .config import METHOD_NAMES, PeftConfig
from .core import ADAPTER_STATE, METHODS, AdaptedLinear, Adapter, AdapterBuffer, training

__all__ = ["ADAPTER_STATE", "METHODS", "METHOD_NAMES", "AdaptedLinear", "Adapter", "AdapterBuffer",
           "PeftConfig", "adapted_layers", "adapter_state", "apply", "base_state", "count", "default_loss",
           "fingerprint", "linear_layers", "merge", "set_rank", "trainable", "training"]
