"""FRUGAL (Zmushko et al., 2024): state-full subspace + state-free complement.

Per projected matrix ``G`` with an orthonormal projector ``Q`` (``d × r``,
``r = rank`` or ``max(1, round(density · d))`` on the projected dimension
``d``), refreshed every ``T`` steps:

* ``G_sub = Q QᵀG`` → Adam on ``R = QᵀG`` (moments **reset at every refresh**
  by default: ``moment_policy='reset'``), update ``scale · c · Q N``;
* ``G_rest = G - Q QᵀG`` → state-free rule ``state_free='sign'`` (signSGD:
  ``inactive_lr_scale · sign(G_rest)``), ``'sgd'`` (``inactive_lr_scale ·
  G_rest``) or ``'none'``;
* projector ``proj='svd'`` (top singular vectors, sign-canonicalised) or
  ``'random'`` (semi-orthogonal: QR of a Gaussian seeded by ``seed``, leaf
  and refresh index).

``moment_policy='keep'``, ``state_free='none'`` and ``scale=0.25`` reproduce
GaLore. State per matrix: projector ``d·r`` + moments ``2·r·(other dim)``.

Example:
  >>> import jax, jax.numpy as jnp
  >>> from lolax import optim
  >>> params = {'mlp': {'up_proj': {'kernel': jnp.ones((8, 16))}}}
  >>> tx = optim.frugal(1e-3, density=0.25)
  >>> state = tx.init(params)   # r = round(0.25 * 8) = 2
  >>> updates, state = tx.update(jax.tree.map(jnp.ones_like, params), state, params)
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from . import _core, _lowrank
from . import projection as proj_lib
from .masking import MaskOrFn


class FrugalState(NamedTuple):
    count: jax.Array
    moment_count: jax.Array
    mu: Any
    nu: Any
    projector: Any


def scale_by_frugal(
    rank: int | None = None,
    update_proj_gap: int = 200,
    scale: float = 1.0,
    density: float = 0.25,
    state_free: str = "sign",
    inactive_lr_scale: float = 1.0,
    proj: str = "svd",
    proj_side: str = "std",
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-6,
    eps_mode: str = "hf",
    moment_policy: str = "reset",
    seed: int = 0,
    dimension_numbers=None,
    moments_8bit: bool = False,
) -> optax.GradientTransformation:
    """FRUGAL scaling (see module docstring)."""
    if rank is not None:
        _core.check_int("rank", rank)
    else:
        _core.check_float("density", density, lo=0.0, hi=1.0, lo_open=True)
        if not isinstance(density, (int, float)):
            raise ValueError(f"density={density!r}; expected a static Python float in (0, 1]")
    _core.check_int("update_proj_gap", update_proj_gap)
    _core.check_choice("proj_side", proj_side, proj_lib.PROJ_SIDES)
    _core.check_choice("moment_policy", moment_policy, _core.MOMENT_POLICIES)
    _core.check_choice("eps_mode", eps_mode, _core.EPS_MODES)
    _core.check_choice("state_free", state_free, ("sign", "sgd", "none"))
    _core.check_choice("proj", proj, ("svd", "random"))
    _core.check_adam(b1, b2, eps)
    _core.check_float("scale", scale, lo=0.0)
    _core.check_float("inactive_lr_scale", inactive_lr_scale, lo=0.0)

    def rank_fn(m, n, side):
        if rank is not None:
            return rank
        return max(1, int(round(density * proj_lib.projected_dim(m, n, side))))

    def combine(ctx, g2, q, r, d, c, ex, first):
        sub = scale * c * proj_lib.project_back(d, q, ctx.side)
        if state_free == "none":
            return sub, ex
        rest = g2 - proj_lib.project_back(r, q, ctx.side)
        free = jnp.sign(rest) if state_free == "sign" else rest
        return sub + inactive_lr_scale * free, ex

    return _lowrank.make_lowrank(
        state_cls=FrugalState, rank_fn=rank_fn, update_proj_gap=update_proj_gap,
        proj_side=proj_side, projector="svd" if proj == "svd" else "semi_orthogonal",
        store_projector=True, b1=b1, b2=b2, eps=eps, eps_mode=eps_mode,
        moment_policy=moment_policy, combine=combine, seed=seed,
        dimension_numbers=dimension_numbers, moments_8bit=moments_8bit)


def frugal(
    learning_rate: optax.ScalarOrSchedule,
    rank: int | None = None,
    update_proj_gap: int = 200,
    scale: float = 1.0,
    density: float = 0.25,
    state_free: str = "sign",
    inactive_lr_scale: float = 1.0,
    proj: str = "svd",
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-6,
    weight_decay: float = 0.0,
    projection_mask: MaskOrFn = None,
    *,
    proj_side: str = "std",
    weight_decay_mask: Any = None,
    eps_mode: str = "hf",
    moment_policy: str = "reset",
    seed: int = 0,
    dimension_numbers=None,
    moments_8bit: bool = False,
) -> optax.GradientTransformation:
    """FRUGAL with Adam on the non-projected leaves (pre-training: ``inactive_lr_scale=1``)."""
    return _core.assemble(
        scale_by_frugal(rank, update_proj_gap, scale, density, state_free, inactive_lr_scale,
                        proj, proj_side, b1, b2, eps, eps_mode, moment_policy, seed,
                        dimension_numbers, moments_8bit),
        learning_rate=learning_rate, b1=b1, b2=b2, eps=eps, eps_mode=eps_mode,
        weight_decay=weight_decay, weight_decay_mask=weight_decay_mask,
        projection_mask=projection_mask, rank=rank, dimension_numbers=dimension_numbers,
        moments_8bit=moments_8bit)
