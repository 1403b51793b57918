"""Natural GaLore (Das, 2024): GaLore with Woodbury inverse-Fisher preconditioning.

After projecting (GaLore's SVD projector, side rule, refresh), the flattened
low-rank gradient ``g`` (length ``k = r·n`` or ``m·r``) is written into a ring
buffer ``H`` of the last ``s = history_size`` projected gradients (slot
``step mod s``; unfilled slots are zero and contribute nothing), and replaced by
``F⁻¹ g`` with ``F = λI + HᵀH`` (``λ = damping``), via Woodbury:

    S = I_s + H Hᵀ / λ;   z = S⁻¹ (H g);   g̃ = g/λ - Hᵀ z / λ²

(``s × s`` Cholesky solve). Adam then runs on ``g̃`` and the update is projected
back with ``α = scale``. The current gradient is in ``H`` when it is solved.
The history follows ``moment_policy``: kept (default), zeroed on ``'reset'``,
or rotated linearly on ``'rotate'``.

State per matrix: GaLore's + ``s·r·(larger dim)`` history values.

Example:
  >>> import jax, jax.numpy as jnp
  >>> from lolax import optim
  >>> params = {'mlp': {'up_proj': {'kernel': jnp.ones((8, 16))}}}
  >>> tx = optim.natural_galore(1e-2, rank=2, history_size=4)
  >>> state = tx.init(params)
  >>> updates, state = tx.update(jax.tree.map(jnp.ones_like, params), state, params)
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from . import _core, _lowrank
from . import projection as proj_lib
from .galore import check_common
from .masking import MaskOrFn


class NaturalGaLoreState(NamedTuple):
    count: jax.Array
    moment_count: jax.Array
    mu: Any
    nu: Any
    projector: Any
    history: Any


def woodbury_inverse_fisher(g: jax.Array, h: jax.Array, damping) -> jax.Array:
    """``(λI + HᵀH)⁻¹ g`` for ``g`` of any shape and history ``h`` (s, *g.shape), float32.

    ``H`` is ``h`` with each history entry flattened; the contractions are written over the
    entries' own axes, so a history sharded like ``g`` (FSDP) needs only two small all-reduces
    (the ``s × s`` Gram matrix and ``Hg``), never a gather of the history."""
    from jax.sharding import PartitionSpec as P
    s = h.shape[0]
    axes = tuple(range(1, h.ndim))
    replicated = P() if _core.explicit_spec(h) is not None else None
    gram = jnp.tensordot(h, h, axes=(axes, axes), out_sharding=replicated)
    hg = jnp.tensordot(h, g, axes=(axes, tuple(range(g.ndim))), out_sharding=replicated)
    sm = jnp.eye(s, dtype=jnp.float32) + gram / damping
    z = jax.scipy.linalg.cho_solve(jax.scipy.linalg.cho_factor(sm, lower=True), hg)
    return g / damping - jnp.tensordot(z, h, axes=1) / (damping * damping)


def scale_by_natural_galore(
    rank: int = 128,
    update_proj_gap: int = 200,
    scale: float = 0.25,
    history_size: int = 20,
    damping: float = 1e-3,
    proj_side: str = "std",
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-6,
    eps_mode: str = "hf",
    moment_policy: str = "keep",
    seed: int = 0,
    dimension_numbers=None,
    moments_8bit: bool = False,
) -> optax.GradientTransformation:
    """Natural GaLore scaling (see module docstring)."""
    check_common(rank, update_proj_gap, proj_side, moment_policy, eps_mode, b1, b2, eps)
    _core.check_int("history_size", history_size)
    _core.check_float("damping", damping, lo=0.0, lo_open=True)
    _core.check_float("scale", scale, lo=0.0)

    def extra_init(ctx, p):
        shp = (ctx.rank, ctx.view.n) if ctx.side == "left" else (ctx.view.m, ctx.rank)
        return {"history": jnp.zeros((history_size,) + shp, p.dtype)}

    def precondition(ctx, r, ex, count):
        h = ex["history"]
        h = jax.lax.dynamic_update_index_in_dim(h, r.astype(h.dtype), count % history_size, 0)
        gt = woodbury_inverse_fisher(r.astype(jnp.float32), h.astype(jnp.float32), damping)
        return gt, {"history": h}

    def combine(ctx, g2, q, r, d, c, ex, first):
        return scale * c * proj_lib.project_back(d, q, ctx.side), ex

    return _lowrank.make_lowrank(
        state_cls=NaturalGaLoreState, rank_fn=lambda m, n, side: rank,
        update_proj_gap=update_proj_gap, proj_side=proj_side, projector="svd",
        store_projector=True, b1=b1, b2=b2, eps=eps, eps_mode=eps_mode,
        moment_policy=moment_policy, combine=combine, extra_init=extra_init,
        precondition=precondition, seed=seed, dimension_numbers=dimension_numbers, moments_8bit=moments_8bit)


def natural_galore(
    learning_rate: optax.ScalarOrSchedule,
    rank: int = 128,
    update_proj_gap: int = 200,
    scale: float = 0.25,
    history_size: int = 20,
    damping: float = 1e-3,
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
    seed: int = 0,
    dimension_numbers=None,
    moments_8bit: bool = False,
) -> optax.GradientTransformation:
    """Natural GaLore with Adam on the non-projected leaves."""
    return _core.assemble(
        scale_by_natural_galore(rank, update_proj_gap, scale, history_size, damping, proj_side,
                                b1, b2, eps, eps_mode, moment_policy, seed, dimension_numbers, moments_8bit),
        learning_rate=learning_rate, b1=b1, b2=b2, eps=eps, eps_mode=eps_mode,
        weight_decay=weight_decay, weight_decay_mask=weight_decay_mask,
        projection_mask=projection_mask, rank=rank, dimension_numbers=dimension_numbers,
        moments_8bit=moments_8bit)
