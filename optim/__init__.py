"""Memory-efficient optimizers as optax transformations.

Public aliases ``(learning_rate, ...) -> optax.GradientTransformation``:
:func:`galore`, :func:`apollo`, :func:`apollo_mini`, :func:`fira`,
:func:`frugal`, :func:`natural_galore`, :func:`adamw` (the reference-style
AdamW every alias uses on non-projected leaves). Composable pieces:
``scale_by_galore``, ``scale_by_apollo``, ``scale_by_fira``,
``scale_by_frugal``, ``scale_by_natural_galore``, ``scale_by_adam``.
Accounting: :func:`state_bytes`, :func:`format_state_bytes`. Training
integration: :func:`from_config`. See ``docs/optim.md``.

Example:
  >>> import jax.numpy as jnp
  >>> import optim
  >>> params = {'attn': {'q_proj': {'kernel': jnp.ones((8, 8))}}}
  >>> tx = optim.from_config('apollo_mini', 1e-2)
  >>> print(optim.format_state_bytes(optim.state_bytes(tx, params)))  # doctest: +SKIP
"""

from __future__ import annotations

from typing import Any

import optax

from optim import projection
from optim import masking
from optim._core import ScaleByAdamState, scale_by_adam
from optim.accounting import format_state_bytes, param_bytes, state_bytes
from optim.apollo import ApolloState, apollo, apollo_mini, scale_by_apollo
from optim.fira import FiraState, fira, scale_by_fira
from optim.frugal import FrugalState, frugal, scale_by_frugal
from optim.galore import GaLoreState, galore, scale_by_galore
from optim.masking import default_projection_mask
from optim.natural_galore import (NaturalGaLoreState, natural_galore,
                                  scale_by_natural_galore)
from optim.projection import MatrixDims


def adamw(learning_rate: optax.ScalarOrSchedule, b1: float = 0.9, b2: float = 0.999,
          eps: float = 1e-6, weight_decay: float = 0.0, *, weight_decay_mask: Any = None,
          eps_mode: str = "hf") -> optax.GradientTransformation:
  """AdamW with the same epsilon placement as the low-rank aliases' AdamW branch.

  ``eps_mode='optax', eps=1e-8`` is ``optax.adamw`` (up to its default wd).
  """
  from optim import _core
  _core.check_float("weight_decay", weight_decay, lo=0.0)
  return optax.chain(scale_by_adam(b1, b2, eps, eps_mode),
                     optax.add_decayed_weights(weight_decay, weight_decay_mask),
                     optax.scale_by_learning_rate(learning_rate))


OPTIMIZERS = {
    "adamw": adamw,
    "galore": galore,
    "apollo": apollo,
    "apollo_mini": apollo_mini,
    "fira": fira,
    "frugal": frugal,
    "natural_galore": natural_galore,
}


def from_config(name: str, learning_rate: optax.ScalarOrSchedule, **kwargs
                ) -> optax.GradientTransformation:
  """Builds an optimizer by name (``--config.optim.name=...``).

  ``kwargs`` go to the constructor unchanged (e.g. ``rank=64``,
  ``update_proj_gap=50``, ``weight_decay=0.1``); unknown keywords raise
  ``TypeError`` from the constructor.
  """
  if name not in OPTIMIZERS:
    raise ValueError(f"optimizer name={name!r}; expected one of {sorted(OPTIMIZERS)}")
  return OPTIMIZERS[name](learning_rate, **kwargs)


__all__ = [
    "ApolloState", "FiraState", "FrugalState", "GaLoreState", "MatrixDims",
    "NaturalGaLoreState", "OPTIMIZERS", "ScaleByAdamState", "adamw", "apollo",
    "apollo_mini", "default_projection_mask", "fira", "format_state_bytes",
    "from_config", "frugal", "galore", "masking", "natural_galore", "param_bytes",
    "projection", "scale_by_adam", "scale_by_apollo", "scale_by_fira",
    "scale_by_frugal", "scale_by_galore", "scale_by_natural_galore", "state_bytes",
]
