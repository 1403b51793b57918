"""Fira (Chen et al., 2024): GaLore plus the scaled, norm-limited residual.

Per projected matrix ``G`` with GaLore projector ``Q`` (SVD, side rule
``'std'``, refresh every ``T`` steps):

* ``R = QᵀG`` (left) / ``G Q`` (right); ``ψ(R)`` = Adam direction on ``R``;
* channel factor ``φ_j = ‖ψ(R)_{:,j}‖ / (‖R_{:,j}‖ + 1e-8)`` along the larger
  dimension (APOLLO's axis rule);
* residual ``Δ = G - Q R`` (``residual='paper'``, default) or ``G - α Q R``
  (``residual='reference'``, the form in the Fira authors' code, which leaks
  ``(1-α)`` of the in-subspace component into the residual);
* ``S = limit(φ ⊙ Δ)`` with the norm-growth limiter (``γ = 1.01``);
* update ``c · (α · Q ψ(R) + S)`` where ``c`` is the HF bias-correction
  factor (``eps_mode='hf'``) or 1 (``'optax'``).

State per matrix: GaLore's plus one float32 limiter norm.

Example:
  >>> import jax, jax.numpy as jnp
  >>> from lolax import optim
  >>> params = {'mlp': {'down_proj': {'kernel': jnp.ones((16, 8))}}}
  >>> tx = optim.fira(1e-2, rank=4)
  >>> state = tx.init(params)
  >>> updates, state = tx.update(jax.tree.map(jnp.ones_like, params), state, params)
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import optax

from . import _core, _lowrank
from . import projection as proj_lib
from .galore import check_common
from .masking import MaskOrFn


class FiraState(NamedTuple):
    count: jax.Array
    moment_count: jax.Array
    mu: Any
    nu: Any
    projector: Any
    prev_norm: Any


def scale_by_fira(
    rank: int = 128,
    update_proj_gap: int = 200,
    scale: float = 0.25,
    norm_growth_limit: float = 1.01,
    proj_side: str = "std",
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-6,
    eps_mode: str = "hf",
    moment_policy: str = "keep",
    residual: str = "paper",
    svd_method: str = "subspace",
    seed: int = 0,
    dimension_numbers=None,
    moments_8bit: bool = False,
) -> optax.GradientTransformation:
    """Fira scaling (see module docstring); ``svd_method`` as in :func:`optim.scale_by_galore`
    (default ``'subspace'``)."""
    check_common(rank, update_proj_gap, proj_side, moment_policy, eps_mode, b1, b2, eps)
    _core.check_float("scale", scale, lo=0.0)
    _core.check_float("norm_growth_limit", norm_growth_limit, lo=1.0)
    _core.check_choice("residual", residual, ("paper", "reference"))
    _core.check_choice("svd_method", svd_method, proj_lib.SVD_METHODS)

    def combine(ctx, g2, q, r, d, c, ex, first):
        low = proj_lib.project_back(d, q, ctx.side)
        back = proj_lib.project_back(r, q, ctx.side)
        delta = g2 - (scale * back if residual == "reference" else back)
        phi = _core.channel_scale(d, r, ctx.side, "channel")
        s, prev = _core.norm_growth_limit(phi * delta, ex["prev_norm"], first, norm_growth_limit)
        return c * (scale * low + s), {"prev_norm": prev}

    return _lowrank.make_lowrank(
        state_cls=FiraState, rank_fn=lambda m, n, side: rank,
        update_proj_gap=update_proj_gap, proj_side=proj_side, projector="svd",
        store_projector=True, b1=b1, b2=b2, eps=eps, eps_mode=eps_mode,
        moment_policy=moment_policy, combine=combine, extra_init=_lowrank.scalar_state,
        seed=seed, svd_method=svd_method, dimension_numbers=dimension_numbers, moments_8bit=moments_8bit)


def fira(
    learning_rate: optax.ScalarOrSchedule,
    rank: int = 128,
    update_proj_gap: int = 200,
    scale: float = 0.25,
    norm_growth_limit: float = 1.01,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-6,
    weight_decay: float = 0.0,
    projection_mask: MaskOrFn = None,
    *,
    proj_side: str = "std",
    weight_decay_mask: Any = None,
    eps_mode: str = "hf",
    moment_policy: str = "keep",
    residual: str = "paper",
    svd_method: str = "subspace",
    seed: int = 0,
    dimension_numbers=None,
    moments_8bit: bool = False,
) -> optax.GradientTransformation:
    """Fira with Adam on the non-projected leaves (60M recipe: r 128, α 0.25, lr 1e-2)."""
    return _core.assemble(
        scale_by_fira(rank, update_proj_gap, scale, norm_growth_limit, proj_side, b1, b2, eps,
                      eps_mode, moment_policy, residual, svd_method, seed, dimension_numbers, moments_8bit),
        learning_rate=learning_rate, b1=b1, b2=b2, eps=eps, eps_mode=eps_mode,
        weight_decay=weight_decay, weight_decay_mask=weight_decay_mask,
        projection_mask=projection_mask, rank=rank, dimension_numbers=dimension_numbers,
        moments_8bit=moments_8bit)
