"""Shared pieces: validation, the Adam core with both epsilon placements,
the norm-growth limiter, per-leaf plumbing and the ``'adam'`` branch that the
low-rank aliases use on the leaves they do not project."""

from __future__ import annotations

import numbers
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from optax.transforms import MaskedNode

from . import projection as proj_lib

EPS_MODES = ("hf", "optax")
MOMENT_POLICIES = ("keep", "reset", "rotate")


# ----------------------------------------------------------------- validation
def _is_static_number(x) -> bool:
    return isinstance(x, numbers.Number) and not isinstance(x, bool)


def check_int(name: str, value, *, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(
            f"{name}={value!r} (type {type(value).__name__}); expected a Python int "
            f">= {minimum} (it determines shapes/schedules, so it must be static: "
            f"pass it in static_args of optax.inject_hyperparams)")
    if value < minimum:
        raise ValueError(f"{name}={value!r}; expected an int >= {minimum}")


def check_bool(name: str, value) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{name}={value!r} (type {type(value).__name__}); expected True or False")


def check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r}; expected one of {tuple(choices)}")


def check_float(name: str, value, *, lo=None, hi=None, lo_open=False, hi_open=False) -> None:
    """Checks a float hyperparameter when it is a concrete Python number.

    Traced values (``optax.inject_hyperparams``) are not checked.
    """
    if not _is_static_number(value):
        return
    v = float(value)
    ok = True
    if lo is not None:
        ok &= v > lo if lo_open else v >= lo
    if hi is not None:
        ok &= v < hi if hi_open else v <= hi
    if not ok:
        lb = "(" if lo_open else "["
        rb = ")" if hi_open else "]"
        raise ValueError(
            f"{name}={value!r}; expected a number in {lb}{lo if lo is not None else '-inf'}, "
            f"{hi if hi is not None else 'inf'}{rb}")


def check_adam(b1, b2, eps) -> None:
    check_float("b1", b1, lo=0.0, hi=1.0, hi_open=True)
    check_float("b2", b2, lo=0.0, hi=1.0, hi_open=True)
    check_float("eps", eps, lo=0.0)


def check_rank_fits(rank: int, m: int, n: int, leaf: str, what: str = "rank") -> None:
    if rank > min(m, n):
        raise ValueError(
            f"{what}={rank} is larger than the matrix: leaf {leaf} has matrix view "
            f"{m}x{n}, so {what} must be <= {min(m, n)}")


# ----------------------------------------------------------------- Adam core
def adam_moments(r, mu, nu, b1, b2):
    """EMA of ``r`` and ``r²`` (computed in float32)."""
    r = r.astype(jnp.float32)
    mu = b1 * mu.astype(jnp.float32) + (1.0 - b1) * r
    nu = b2 * nu.astype(jnp.float32) + (1.0 - b2) * r * r
    return mu, nu


def adam_direction(mu, nu, t, b1, b2, eps, eps_mode: str):
    """Returns ``(direction, step_factor)``; the Adam update is ``factor * direction``.

    ``'hf'`` (the epsilon placement of Hugging Face's AdamW, which the GaLore,
    APOLLO and Fira authors' code uses): direction ``m / (√v + ε)``, factor
    ``√(1-β2ᵗ)/(1-β1ᵗ)``.
    ``'optax'`` (``optax.scale_by_adam``): direction ``m̂ / (√v̂ + ε)``, factor 1.
    ``t`` is the 1-based step (float32 scalar).
    """
    bc1 = 1.0 - jnp.asarray(b1, jnp.float32) ** t
    bc2 = 1.0 - jnp.asarray(b2, jnp.float32) ** t
    if eps_mode == "hf":
        return mu / (jnp.sqrt(nu) + eps), jnp.sqrt(bc2) / bc1
    return (mu / bc1) / (jnp.sqrt(nu / bc2) + eps), jnp.ones((), jnp.float32)


def norm_growth_limit(u, prev_norm, first, gamma):
    """Fira's norm-growth limiter.

    ``ratio = ‖u‖ / (prev + 1e-8)``; ``limiter = max(ratio, γ) / γ``; returns
    ``(u / limiter, ‖u‖ / limiter)``. On the first step (``first``) nothing is
    limited and ``‖u‖`` is stored.
    """
    norm = jnp.linalg.norm(u.astype(jnp.float32))
    limiter = jnp.maximum(norm / (prev_norm + 1e-8), gamma) / gamma
    limiter = jnp.where(first, 1.0, limiter)
    return u / limiter, norm / limiter


def channel_norm_axis(side: str) -> int:
    """Axis of ``R`` over which channel norms are taken (the rank axis)."""
    return 0 if side == "left" else 1


def channel_scale(u_dir, r, side: str, scale_type: str):
    """APOLLO scaling factor(s) ``‖Ũ‖/‖R‖`` per channel or per tensor, float32.

    Channel factors are shaped to broadcast against the full ``m × n`` gradient:
    ``(1, n)`` on the left side, ``(m, 1)`` on the right side.
    """
    u_dir = u_dir.astype(jnp.float32)
    r = r.astype(jnp.float32)
    if scale_type == "tensor":
        return jnp.linalg.norm(u_dir) / (jnp.linalg.norm(r) + 1e-8)
    ax = channel_norm_axis(side)
    return (jnp.linalg.norm(u_dir, axis=ax, keepdims=True)
            / (jnp.linalg.norm(r, axis=ax, keepdims=True) + 1e-8))


def rotate_moments(mu, nu, q_old, q_new, side: str):
    """Moves moments from the old basis into the new one.

    ``C = Q_newᵀ Q_old`` (``r × r``): ``μ' = C μ`` (left) / ``μ C ᵀ`` (right);
    ``ν' = (C∘C) ν`` resp. ``ν (C∘C)ᵀ`` — exact for signed permutations, keeps
    ``ν >= 0`` otherwise.
    """
    c = basis_overlap(q_new, q_old)
    c2 = c * c
    mu32, nu32 = mu.astype(jnp.float32), nu.astype(jnp.float32)
    if side == "left":
        return c @ mu32, c2 @ nu32
    return mu32 @ c.T, nu32 @ c2.T


def basis_overlap(q_new, q_old):
    """``Q_newᵀ Q_old`` in float32 (``r × r``), replicated when the projectors are sharded along
    ``d`` (a small all-reduce instead of gathering them)."""
    from jax.sharding import PartitionSpec as P
    out = P() if explicit_spec(q_old) is not None else None
    return jnp.matmul(q_new.astype(jnp.float32).T, q_old.astype(jnp.float32), out_sharding=out)


# ----------------------------------------------------------------- plumbing
class _Box:
    __slots__ = ("v",)

    def __init__(self, v):
        self.v = v


def _is_masked(x) -> bool:
    return isinstance(x, MaskedNode)


def leaf_names(tree) -> list[str]:
    """'/'-joined path of every array leaf (for error messages)."""
    from .masking import path_names
    return ["/".join(path_names(p)) or "<root>"
            for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def resolve_views(tree, dims) -> list[proj_lib.MatrixView]:
    """Matrix views of the array leaves of ``tree`` (MaskedNodes skipped).

    ``dims``: ``None`` (default views), one :class:`MatrixDims` for all, a
    pytree of ``MatrixDims``/``None`` matching the params (a prefix match is
    enough), or a callable ``tree -> such a pytree``.
    """
    leaves = jax.tree.leaves(tree)
    if dims is None or isinstance(dims, proj_lib.MatrixDims):
        return [proj_lib.matrix_view(x.shape, dims) for x in leaves]
    d = dims(tree) if callable(dims) else dims
    boxed = jax.tree.map(lambda u, dd: None if _is_masked(u) else _Box(dd), tree, d,
                         is_leaf=_is_masked)
    ds = [b.v for b in jax.tree.leaves(boxed)]
    return [proj_lib.matrix_view(x.shape, dd) for x, dd in zip(leaves, ds)]


def unflatten_like(tree, values: list):
    return jax.tree.structure(tree).unflatten(values)


def flatten_like(tree, other) -> list:
    return jax.tree.structure(tree).flatten_up_to(other)


# ----------------------------------------------------------------- 'adam' branch
class ScaleByAdamState(NamedTuple):
    """State of :func:`scale_by_adam` (``count`` int32 scalar, moments like params)."""

    count: jax.Array
    mu: Any
    nu: Any


def scale_by_adam(b1: float = 0.9, b2: float = 0.999, eps: float = 1e-6,
                  eps_mode: str = "hf", moments_8bit: bool = False) -> optax.GradientTransformation:
    """Adam scaling with a selectable epsilon placement (see :func:`adam_direction`).

    ``eps_mode='optax'`` reproduces ``optax.scale_by_adam`` exactly; the default
    ``'hf'`` is the Adam of the low-rank aliases' ``'adam'`` branch. Moments are
    stored in the parameter dtype, or block-wise in 8 bits with ``moments_8bit=True``
    (:mod:`optim.quantized`); the arithmetic is float32.
    """
    from . import quantized as q8
    check_adam(b1, b2, eps)
    check_choice("eps_mode", eps_mode, EPS_MODES)
    check_bool("moments_8bit", moments_8bit)
    codes = (q8.FIRST, q8.SECOND)

    def stored(x, like, which):
        return q8.store(x, codes[which]) if moments_8bit else x.astype(like.dtype)

    def read(s, like, which):
        return q8.load(s, like.shape, codes[which]) if moments_8bit else s

    def init_fn(params):
        zeros = lambda which: jax.tree.map(lambda p: stored(jnp.zeros_like(p), p, which), params)
        return ScaleByAdamState(jnp.zeros([], jnp.int32), zeros(0), zeros(1))

    def update_fn(updates, state, params=None):
        del params
        t = optax.safe_int32_increment(state.count)
        tf = t.astype(jnp.float32)

        def one(g, mu, nu):
            mu2, nu2 = adam_moments(g, read(mu, g, 0), read(nu, g, 1), b1, b2)
            d, c = adam_direction(mu2, nu2, tf, b1, b2, eps, eps_mode)
            return (c * d).astype(g.dtype), stored(mu2, g, 0), stored(nu2, g, 1)

        outs = [one(g, mu, nu) for g, mu, nu in zip(
            jax.tree.leaves(updates), flatten_like(updates, state.mu),
            flatten_like(updates, state.nu))]
        u, mu, nu = ([unflatten_like(updates, [o[i] for o in outs]) for i in range(3)]
                     if outs else (updates, state.mu, state.nu))
        return u, ScaleByAdamState(t, mu, nu)

    return optax.GradientTransformation(init_fn, update_fn)


def assemble(lowrank_tx: optax.GradientTransformation, *, learning_rate, b1, b2, eps,
             eps_mode, weight_decay, weight_decay_mask, projection_mask,
             rank: int | None = None, dimension_numbers=None, moments_8bit: bool = False
             ) -> optax.GradientTransformation:
    """``chain(partition({lowrank, adam}), add_decayed_weights, scale_by_learning_rate)``."""
    from . import masking
    check_float("weight_decay", weight_decay, lo=0.0)
    if _is_static_number(learning_rate):
        check_float("learning_rate", learning_rate, lo=0.0)
    return optax.chain(
        optax.partition(
            {masking.LOWRANK: lowrank_tx,
             masking.ADAM: scale_by_adam(b1, b2, eps, eps_mode, moments_8bit)},
            masking.labels_fn(projection_mask, rank, dimension_numbers)),
        optax.add_decayed_weights(weight_decay, weight_decay_mask),
        optax.scale_by_learning_rate(learning_rate),
    )


# ----------------------------------------------------------------- sharding
def explicit_spec(x):
    """PartitionSpec of ``x`` when it is sharded over an all-Explicit mesh, else None."""
    from jax.sharding import AxisType
    sh = getattr(jax.typeof(x), "sharding", None)
    mesh = getattr(sh, "mesh", None)
    if mesh is None or mesh.empty or not mesh.axis_types:
        return None
    if not all(t == AxisType.Explicit for t in mesh.axis_types):
        return None
    return sh.spec


def replicate(x):
    """All-gathers an explicitly sharded array (SVD/QR need unsharded matrices)."""
    from jax.sharding import PartitionSpec as P
    spec = explicit_spec(x)
    if spec is None or all(s is None for s in spec):
        return x
    return jax.sharding.reshard(x, P())


def reshard_to(x, spec):
    """Reshards ``x`` to ``spec`` (a PartitionSpec or None = leave as is)."""
    if spec is None:
        return x
    return jax.sharding.reshard(x, spec)


def lowrank_specs(param, view, side: str):
    """Shardings of a projected leaf's state that follow the parameter's.

    For a 2-D kernel with spec ``(a, b)``: moments ``(r, n)`` get ``(None, b)``
    (left side) and ``(m, r)`` get ``(a, None)`` (right side); the ``(d, r)``
    projector keeps the spec of the projected dimension. Other layouts (N-D
    kernels viewed as matrices) are replicated. Returns ``(moment_spec,
    projector_spec)`` or ``(None, None)`` when the parameter is not explicitly
    sharded.
    """
    from jax.sharding import PartitionSpec as P
    spec = explicit_spec(param)
    if spec is None:
        return None, None
    if param.ndim == 2 and view.perm == (0, 1):
        a, b = (tuple(spec) + (None, None))[:2]
    else:
        a = b = None
    if side == "left":
        return P(None, b), P(a, None)
    return P(a, None), P(b, None)
