"""Memory-efficient optimizers as optax transformations.

Public aliases ``(learning_rate, ...) -> optax.GradientTransformation``:
:func:`galore`, :func:`apollo`, :func:`apollo_mini`, :func:`fira`,
:func:`frugal`, :func:`natural_galore`, :func:`adamw_8bit` (AdamW with
block-wise 8-bit moments, :mod:`optim.quantized`), :func:`lisa` (layer sampling around any
optimizer; :func:`lisa_adamw`), :func:`owlore` (layer sampling weighted by
:func:`outlier_ratios`, GaLore on the sampled layers), and :func:`adamw`, which builds
``optax.adamw`` itself after checking the learning rate and weight decay (so that
``from_config('adamw', ...)`` and ``--config.optim.name=adamw`` build exactly optax's AdamW). The low-rank
aliases send the leaves they do not project to their own branch labelled
``'adam'``: :func:`scale_by_adam` with their ``b1``, ``b2``, ``eps`` and
``eps_mode`` (HF-style epsilon placement by default), followed by the same
decoupled weight decay and learning rate as the projected leaves. Composable
pieces: ``scale_by_galore``, ``scale_by_apollo``, ``scale_by_fira``,
``scale_by_frugal``, ``scale_by_natural_galore``, ``scale_by_adam``.
Accounting: :func:`state_bytes`, :func:`format_state_bytes`. Training
integration: :func:`from_config`. See ``docs/optim.md``.

Example:
  >>> import jax.numpy as jnp
  >>> from lolax import optim
  >>> params = {'attn': {'q_proj': {'kernel': jnp.ones((8, 8))}}}
  >>> tx = optim.from_config('apollo_mini', 1e-2)
  >>> print(optim.format_state_bytes(optim.state_bytes(tx, params)))  # doctest: +SKIP
"""

from __future__ import annotations

import functools
import inspect

import optax

from . import _core, masking, projection
from ._core import ScaleByAdamState, scale_by_adam
from .accounting import format_state_bytes, param_bytes, state_bytes
from .apollo import ApolloState, apollo, apollo_mini, scale_by_apollo
from .fira import FiraState, fira, scale_by_fira
from .frugal import FrugalState, frugal, scale_by_frugal
from .galore import GaLoreState, galore, scale_by_galore
from .lisa import LisaState, lisa, lisa_adamw
from .masking import default_projection_mask, default_weight_decay_mask
from .natural_galore import NaturalGaLoreState, natural_galore, scale_by_natural_galore
from .owlore import outlier_ratios, owlore
from .projection import MatrixDims
from .quantized import ScaleByAdam8bitState, adamw_8bit, scale_by_adam_8bit


@functools.wraps(optax.adamw)
def adamw(learning_rate: optax.ScalarOrSchedule, *args, **kwargs) -> optax.GradientTransformation:
    """``optax.adamw`` itself (same signature, defaults and transformation: eps 1e-8,
    weight_decay 1e-4), after refusing a negative learning rate or weight decay as every other
    optimizer here does.  lolax has no AdamW of its own; the HF-style Adam of the low-rank
    aliases' ``'adam'`` branch is ``scale_by_adam(..., eps_mode='hf')``."""
    bound = inspect.signature(optax.adamw).bind(learning_rate, *args, **kwargs)
    _core.check_float("learning_rate", learning_rate, lo=0.0)
    _core.check_float("weight_decay", bound.arguments.get("weight_decay", 1e-4), lo=0.0)
    return optax.adamw(learning_rate, *args, **kwargs)


OPTIMIZERS = {
    "adamw": adamw,
    "adamw_8bit": adamw_8bit,
    "lisa_adamw": lisa_adamw,
    "galore": galore,
    "apollo": apollo,
    "apollo_mini": apollo_mini,
    "fira": fira,
    "frugal": frugal,
    "natural_galore": natural_galore,
    "owlore": owlore,
}


def from_config(name: str, learning_rate: optax.ScalarOrSchedule, **kwargs
                ) -> optax.GradientTransformation:
    """Builds an optimizer by name (``--config.optim.name=...``).

    ``kwargs`` go to the constructor unchanged (e.g. ``rank=64``,
    ``update_proj_gap=50``, ``weight_decay=0.1``); unknown keywords raise
    ``TypeError`` from the constructor. ``'adamw'`` is ``optax.adamw``, so it
    takes optax's keywords (``b1``, ``b2``, ``eps``, ``weight_decay``, ``mask``, ...).
    """
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer name={name!r}; expected one of {sorted(OPTIMIZERS)}")
    return OPTIMIZERS[name](learning_rate, **kwargs)


__all__ = [
    "ApolloState", "FiraState", "FrugalState", "GaLoreState", "MatrixDims",
    "NaturalGaLoreState", "OPTIMIZERS", "ScaleByAdam8bitState", "ScaleByAdamState", "adamw", "adamw_8bit",
    "LisaState", "apollo", "lisa", "lisa_adamw", "outlier_ratios", "owlore",
    "apollo_mini", "default_projection_mask", "default_weight_decay_mask", "fira", "format_state_bytes",
    "from_config", "frugal", "galore", "masking", "natural_galore", "param_bytes",
    "projection", "scale_by_adam", "scale_by_apollo", "scale_by_fira",
    "scale_by_adam_8bit", "scale_by_frugal", "scale_by_galore", "scale_by_natural_galore", "state_bytes",
]
