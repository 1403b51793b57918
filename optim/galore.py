"""GaLore: gradient low-rank projection (Zhao et al., 2024), as optax transforms.

Per projected matrix ``G`` (``m × n``), rank ``r``, gap ``T``, scale ``α``:

* steps ``0, T, 2T, ...``: ``Q`` = top-``r`` singular vectors (float32 SVD,
  sign-canonicalised; after the first refresh, by default, two steps of subspace
  iteration from the previous ``Q``) of the projected side — ``proj_side='std'`` projects the
  smaller dimension (the GaLore authors' default), ``'reverse_std'`` the larger
  (``optax.contrib.galore``), ``'left'``/``'right'`` force it;
* ``R = QᵀG`` or ``G Q``; Adam moments on ``R``; ``N`` = Adam direction;
* update ``α · Q N`` (or ``α · N Qᵀ``), then weight decay and ``-lr``.

Epsilon placement: ``eps_mode='hf'`` (default, that of Hugging Face's AdamW,
which the GaLore authors' code uses: ``N = m/(√v+ε) · √(1-β2ᵗ)/(1-β1ᵗ)``,
ε = 1e-6) or ``'optax'`` (``m̂/(√v̂+ε)``). Moments on refresh:
``moment_policy='keep'`` (as in the authors' code), ``'reset'`` (zero
moments and restart bias correction) or ``'rotate'`` (``μ ← Cμ``,
``ν ← (C∘C)ν`` with ``C = Q_newᵀ Q_old``).

State per projected matrix: moments ``2·r·(larger dim)`` + projector
``(smaller dim)·r`` for ``'std'``.

Example:
  >>> import jax, jax.numpy as jnp, optax
  >>> from lolax import optim
  >>> params = {'mlp': {'up_proj': {'kernel': jnp.ones((8, 16))}},
  ...           'norm': {'scale': jnp.ones((8,))}}
  >>> tx = optim.galore(1e-2, rank=4, update_proj_gap=10)
  >>> state = tx.init(params)
  >>> state[0].inner_states['lowrank'].inner_state.mu['mlp']['up_proj']['kernel'].shape
  (4, 16)
  >>> grads = jax.tree.map(jnp.ones_like, params)
  >>> updates, state = tx.update(grads, state, params)
  >>> params = optax.apply_updates(params, updates)
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import optax

from . import _core, _lowrank
from . import projection as proj_lib
from .masking import MaskOrFn


class GaLoreState(NamedTuple):
    """``count``/``moment_count``: int32 scalars; ``mu``/``nu``: low-rank moments
    per matrix; ``projector``: ``(d, r)`` orthonormal projectors."""

    count: jax.Array
    moment_count: jax.Array
    mu: Any
    nu: Any
    projector: Any


def check_common(rank, update_proj_gap, proj_side, moment_policy, eps_mode, b1, b2, eps):
    _core.check_int("rank", rank)
    _core.check_int("update_proj_gap", update_proj_gap)
    _core.check_choice("proj_side", proj_side, proj_lib.PROJ_SIDES)
    _core.check_choice("moment_policy", moment_policy, _core.MOMENT_POLICIES)
    _core.check_choice("eps_mode", eps_mode, _core.EPS_MODES)
    _core.check_adam(b1, b2, eps)


def scale_by_galore(
    rank: int = 128,
    update_proj_gap: int = 200,
    scale: float = 0.25,
    proj_side: str = "std",
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-6,
    eps_mode: str = "hf",
    moment_policy: str = "keep",
    svd_method: str = "subspace",
    seed: int = 0,
    dimension_numbers=None,
    moments_8bit: bool = False,
) -> optax.GradientTransformation:
    """GaLore scaling for every leaf it receives (each must have ``ndim >= 2``).

    Returns the *un-negated* direction ``α · Q N``; chain with
    ``scale_by_learning_rate``. ``svd_method='randomized'`` uses a randomized
    SVD seeded from ``seed``, the leaf index and the refresh index;
    ``svd_method='subspace'`` (the default) refines the previous projector by two
    steps of subspace iteration (the full SVD at the first refresh), and
    ``svd_method='full'`` takes the exact SVD at every refresh, as the paper does.  ``moments_8bit=True``
    stores the moments block-wise in 8 bits (:mod:`optim.quantized`; the aliases
    apply it to their Adam branch too); the other low-rank methods take it as well.
    """
    check_common(rank, update_proj_gap, proj_side, moment_policy, eps_mode, b1, b2, eps)
    _core.check_float("scale", scale, lo=0.0)
    _core.check_choice("svd_method", svd_method, proj_lib.SVD_METHODS)

    def combine(ctx, g2, q, r, d, c, ex, first):
        return scale * c * proj_lib.project_back(d, q, ctx.side), ex

    return _lowrank.make_lowrank(
        state_cls=GaLoreState, rank_fn=lambda m, n, side: rank,
        update_proj_gap=update_proj_gap, proj_side=proj_side, projector="svd",
        store_projector=True, b1=b1, b2=b2, eps=eps, eps_mode=eps_mode,
        moment_policy=moment_policy, combine=combine, seed=seed,
        svd_method=svd_method, dimension_numbers=dimension_numbers, moments_8bit=moments_8bit)


def galore(
    learning_rate: optax.ScalarOrSchedule,
    rank: int = 128,
    update_proj_gap: int = 200,
    scale: float = 0.25,
    proj_side: str = "std",
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-6,
    weight_decay: float = 0.0,
    projection_mask: MaskOrFn = None,
    *,
    weight_decay_mask: Any = None,
    eps_mode: str = "hf",
    moment_policy: str = "keep",
    svd_method: str = "subspace",
    seed: int = 0,
    dimension_numbers=None,
    moments_8bit: bool = False,
) -> optax.GradientTransformation:
    """GaLore with Adam on the non-projected leaves.

    ``chain(partition({'lowrank': scale_by_galore, 'adam': scale_by_adam},
    labels), add_decayed_weights(weight_decay, weight_decay_mask),
    scale_by_learning_rate(learning_rate))``: the non-projected leaves get
    :func:`optim.scale_by_adam` with the same ``b1``, ``b2``, ``eps`` and
    ``eps_mode``, and the same decoupled weight decay and learning rate.
    ``projection_mask``: pytree of bools or ``params -> pytree``; ``None`` =
    :func:`optim.masking.default_projection_mask`.
    Defaults follow the paper (``T = 200``, ``α = 0.25``); use with lr ≈ 1e-2.
    """
    return _core.assemble(
        scale_by_galore(rank, update_proj_gap, scale, proj_side, b1, b2, eps, eps_mode,
                        moment_policy, svd_method, seed, dimension_numbers, moments_8bit),
        learning_rate=learning_rate, b1=b1, b2=b2, eps=eps, eps_mode=eps_mode,
        weight_decay=weight_decay, weight_decay_mask=weight_decay_mask,
        projection_mask=projection_mask, rank=rank, dimension_numbers=dimension_numbers,
        moments_8bit=moments_8bit)
