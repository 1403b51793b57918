"""APOLLO and APOLLO-Mini (Zhu et al., 2024), implemented from the paper's maths.

Per projected matrix ``G`` (``m × n``), the side rule of GaLore ``'std'``
(project the smaller dimension):

1. ``Q`` (``d × r``): i.i.d. ``N(0, 1/r)`` entries (not orthogonalised),
   regenerated from the stored PRNG key folded with the leaf index and
   ``step // T`` — never stored (``cache_projector=True`` stores it);
   ``proj='svd'`` uses GaLore's SVD projector instead (stored);
2. ``R = QᵀG`` / ``G Q``; Adam moments on ``R``; ``R̃`` = Adam direction;
3. scaling ``s = ‖R̃‖/‖R‖`` per channel of the larger dimension (norms over
   the rank axis, ``scale_type='channel'``) or for the whole tensor
   (``'tensor'``); ``+1e-8`` in the denominator;
4. ``Ĝ = G · Diag(s)`` on the *raw* gradient, then the norm-growth limiter
   (``γ = norm_growth_limit``; nothing limited on the first step), then
   ``× √scale``: the ``scale`` argument is ``α²``, like the hyperparameter
   of the APOLLO authors' code (APOLLO 1, APOLLO-Mini 128 → ``α = √128``);
5. ``W ← W - lr·Ĝ - lr·wd·W``.

With ``eps_mode='hf'`` the direction is ``m/(√v+ε)`` and the bias-correction
factor ``√(1-β2ᵗ)/(1-β1ᵗ)`` multiplies the limited update (the limiter sees
the uncorrected update, as in the HF-style optimizers of the authors' code).

State per matrix: low-rank moments ``2·r·(larger dim)``, one limiter norm;
plus one PRNG key (2 uint32) for the whole transform.

Example:
  >>> import jax, jax.numpy as jnp
  >>> from lolax import optim
  >>> params = {'attn': {'q_proj': {'kernel': jnp.ones((16, 16))}}}
  >>> tx = optim.apollo_mini(1e-2)
  >>> state = tx.init(params)
  >>> updates, state = tx.update(jax.tree.map(jnp.ones_like, params), state, params)
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from . import _core, _lowrank
from .galore import check_common
from .masking import MaskOrFn


class ApolloState(NamedTuple):
    """``key``: raw uint32 key data (2,); ``projector``: ``()`` unless stored
    (``proj='svd'`` or ``cache_projector``); ``prev_norm``: float32 scalar per matrix."""

    count: jax.Array
    moment_count: jax.Array
    key: jax.Array
    mu: Any
    nu: Any
    projector: Any
    prev_norm: Any


def scale_by_apollo(
    rank: int = 128,
    update_proj_gap: int = 200,
    scale: float = 1.0,
    scale_type: str = "channel",
    proj: str = "random",
    norm_growth_limit: float | None = 1.01,
    proj_side: str = "std",
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-6,
    eps_mode: str = "hf",
    moment_policy: str = "keep",
    cache_projector: bool = False,
    seed: int = 0,
    dimension_numbers=None,
    moments_8bit: bool = False,
) -> optax.GradientTransformation:
    """APOLLO scaling of the raw gradient (see module docstring).

    ``norm_growth_limit=None`` disables the limiter. ``moment_policy='rotate'``
    needs ``proj='svd'`` (a Gaussian projector has no orthonormal basis).
    """
    check_common(rank, update_proj_gap, proj_side, moment_policy, eps_mode, b1, b2, eps)
    _core.check_float("scale", scale, lo=0.0)
    _core.check_choice("scale_type", scale_type, ("channel", "tensor"))
    _core.check_choice("proj", proj, ("random", "svd"))
    if norm_growth_limit is not None:
        _core.check_float("norm_growth_limit", norm_growth_limit, lo=1.0)
    if moment_policy == "rotate" and proj != "svd":
        raise ValueError(
            f"moment_policy='rotate' with proj={proj!r}; expected proj='svd' "
            "(rotation needs orthonormal projectors) or moment_policy in ('keep', 'reset')")

    def combine(ctx, g2, q, r, d, c, ex, first):
        s = _core.channel_scale(d, r, ctx.side, scale_type)
        u = g2 * s
        prev = ex["prev_norm"]
        if norm_growth_limit is not None:
            u, prev = _core.norm_growth_limit(u, prev, first, norm_growth_limit)
        else:
            prev = jnp.linalg.norm(u)
        alpha = jnp.sqrt(jnp.asarray(scale, jnp.float32))
        return c * alpha * u, {"prev_norm": prev}

    store = proj == "svd" or cache_projector
    return _lowrank.make_lowrank(
        state_cls=ApolloState, rank_fn=lambda m, n, side: rank,
        update_proj_gap=update_proj_gap, proj_side=proj_side,
        projector="svd" if proj == "svd" else "random", store_projector=store,
        b1=b1, b2=b2, eps=eps, eps_mode=eps_mode, moment_policy=moment_policy,
        combine=combine, extra_init=_lowrank.scalar_state, seed=seed,
        dimension_numbers=dimension_numbers, store_key=True, moments_8bit=moments_8bit)


def apollo(
    learning_rate: optax.ScalarOrSchedule,
    rank: int = 128,
    update_proj_gap: int = 200,
    scale: float = 1.0,
    scale_type: str = "channel",
    proj: str = "random",
    norm_growth_limit: float | None = 1.01,
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
    cache_projector: bool = False,
    seed: int = 0,
    dimension_numbers=None,
    moments_8bit: bool = False,
) -> optax.GradientTransformation:
    """APOLLO (channel-wise scaling, rank ≈ d/4) with Adam on the other leaves.

    ``chain(partition({'lowrank': scale_by_apollo, 'adam': scale_by_adam}, labels),
    add_decayed_weights, scale_by_learning_rate)``, as in :func:`optim.galore`.

    Paper defaults: lr 1e-2, ``T = 200``, ``scale = 1`` (α = 1).
    """
    return _core.assemble(
        scale_by_apollo(rank, update_proj_gap, scale, scale_type, proj, norm_growth_limit,
                        proj_side, b1, b2, eps, eps_mode, moment_policy, cache_projector,
                        seed, dimension_numbers, moments_8bit),
        learning_rate=learning_rate, b1=b1, b2=b2, eps=eps, eps_mode=eps_mode,
        weight_decay=weight_decay, weight_decay_mask=weight_decay_mask,
        projection_mask=projection_mask, rank=rank, dimension_numbers=dimension_numbers,
        moments_8bit=moments_8bit)


def apollo_mini(
    learning_rate: optax.ScalarOrSchedule,
    rank: int = 1,
    update_proj_gap: int = 200,
    scale: float = 128.0,
    scale_type: str = "tensor",
    proj: str = "random",
    norm_growth_limit: float | None = 1.01,
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
    cache_projector: bool = False,
    seed: int = 0,
    dimension_numbers=None,
    moments_8bit: bool = False,
) -> optax.GradientTransformation:
    """APOLLO-Mini: rank 1, tensor-wise scaling, ``scale = 128`` (applied as √128).

    Same keywords as :func:`apollo`, with the Mini defaults.
    """
    return apollo(learning_rate, rank, update_proj_gap, scale, scale_type, proj,
                  norm_growth_limit, b1, b2, eps, weight_decay, projection_mask,
                  proj_side=proj_side, weight_decay_mask=weight_decay_mask, eps_mode=eps_mode,
                  moment_policy=moment_policy, cache_projector=cache_projector, seed=seed,
                  dimension_numbers=dimension_numbers, moments_8bit=moments_8bit)


del math
