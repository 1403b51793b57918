"""Sequence mixers in flash-linear-attention's layout ``[B, T, H, D]`` and its names.

One sub-package per family, each with ``chunk_*`` (chunkwise, the training default),
``fused_recurrent_*`` (token by token, for decoding) and ``naive_*`` (the float32 oracle); shared
machinery lives in :mod:`.common`.  Every ``chunk_*`` and ``fused_recurrent_*`` op is also
importable from here, as from ``fla.ops``:

>>> import jax
>>> from lolax.ops import chunk_gla
>>> q, k, v, g = jax.random.normal(jax.random.key(0), (4, 1, 32, 2, 8))
>>> o, _ = chunk_gla(q, k, v, jax.nn.log_sigmoid(g))
>>> o.shape
(1, 32, 2, 8)

Families: ``linear_attn`` (with :mod:`.feature_maps`), ``simple_gla`` (with :mod:`.retention`
and :mod:`.lightning_attn`), ``gla``, ``delta_rule``, ``gated_delta_rule``, and the softmax
baselines in :mod:`.attention`.  :func:`get_op` looks an op up by family and form.  This package
never imports Flax.
"""

from __future__ import annotations

import importlib
from typing import Callable

from .common.diagonal_kernels import current_tuning, interpret_kernels, kernel_tuning
from .delta_rule import chunk_delta_rule, fused_recurrent_delta_rule
from .gated_delta_rule import chunk_gated_delta_rule, fused_recurrent_gated_delta_rule
from .gla import chunk_gla, fused_recurrent_gla
from .lightning_attn import chunk_lightning_attn, fused_recurrent_lightning_attn
from .linear_attn import chunk_linear_attn, fused_recurrent_linear_attn
from .retention import chunk_retention, fused_recurrent_retention
from .simple_gla import chunk_simple_gla, fused_recurrent_simple_gla

FAMILIES = ("linear_attn", "simple_gla", "gla", "delta_rule", "gated_delta_rule")
"""The linear-attention families, each a sub-package with the three forms."""

PALLAS_FAMILIES = FAMILIES
"""Families whose ``chunk_*`` ops take ``implementation=`` (Pallas kernels on TPU and GPU)."""

FORMS = ("chunk", "fused_recurrent", "naive")
"""``chunk``: chunkwise (training); ``fused_recurrent``: token by token (decoding); ``naive``: the oracle."""


def get_op(family: str, form: str = "chunk") -> Callable:
    """The op ``<form>_<family>`` of a family, e.g. ``get_op("gla", "fused_recurrent")``.

    >>> get_op("delta_rule").__name__
    'chunk_delta_rule'
    """
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    if form not in FORMS:
        raise ValueError(f"form must be one of {FORMS}, got {form!r}")
    return getattr(importlib.import_module(f".{family}", __name__), f"{form}_{family}")


__all__ = ["FAMILIES", "PALLAS_FAMILIES", "FORMS", "get_op", "interpret_kernels", "kernel_tuning", "current_tuning",
           "chunk_linear_attn", "fused_recurrent_linear_attn", "chunk_simple_gla",
           "fused_recurrent_simple_gla", "chunk_retention", "fused_recurrent_retention", "chunk_lightning_attn",
           "fused_recurrent_lightning_attn", "chunk_gla", "fused_recurrent_gla", "chunk_delta_rule",
           "fused_recurrent_delta_rule", "chunk_gated_delta_rule", "fused_recurrent_gated_delta_rule"]
