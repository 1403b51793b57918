"""Projection utilities shared by the low-rank optimizers.

Everything here works on one *matrix view* of a parameter: an array of any
rank is reshaped into a 2-D matrix ``(m, n) = (prod(reduction axes),
prod(output axes))`` with :class:`MatrixDims` (Flax kernels are ``(in, out)``,
so the default for a 2-D kernel is ``reduction_axis=0, output_axis=1``).

Conventions (used by every optimizer in :mod:`optim`):

* A projector is always stored as a matrix ``Q`` of shape ``(d, r)`` where
  ``d`` is the *projected* dimension (``m`` for the ``'left'`` side, ``n`` for
  the ``'right'`` side).
* Left side: ``R = Qᵀ G`` (``r × n``), back-projection ``Q N``.
* Right side: ``R = G Q`` (``m × r``), back-projection ``N Qᵀ``.
* Side rule ``'std'`` (the GaLore authors' default) projects the **smaller**
  dimension: right if ``m >= n`` else left. ``'reverse_std'`` is the opposite
  (what ``optax.contrib.galore`` does); ``'left'``/``'right'`` force a side.

Example:
  >>> import jax, jax.numpy as jnp
  >>> from lolax.optim import projection
  >>> g = jax.random.normal(jax.random.key(0), (6, 10))
  >>> side = projection.resolve_side(6, 10, "std")
  >>> q = projection.svd_projector(g, 2, side)
  >>> q.shape, side
  ((6, 2), 'left')
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple, Sequence, Union

import jax
import jax.numpy as jnp

PROJ_SIDES = ("std", "reverse_std", "left", "right")


class MatrixDims(NamedTuple):
    """Which axes of an N-D kernel form the rows and columns of its matrix view.

    Attributes:
      reduction_axis: axis or axes flattened into the rows (``m``), e.g. the
        input axis of a Flax kernel.
      output_axis: axis or axes flattened into the columns (``n``).

    Every axis must appear in exactly one of the two.
    """

    reduction_axis: Union[int, Sequence[int]] = 0
    output_axis: Union[int, Sequence[int]] = 1


def _axes(a, ndim: int) -> tuple[int, ...]:
    if isinstance(a, int):
        a = (a,)
    return tuple(int(x) % ndim for x in a)


def default_matrix_dims(shape: Sequence[int]) -> MatrixDims:
    """Matrix view used when none is given.

    2-D: ``(0, 1)``. N-D: a contiguous split ``(axes[:k], axes[k:])`` choosing
    the ``k`` that makes the matrix most square, e.g. a DenseGeneral query
    kernel ``(embed, heads, head_dim)`` -> ``(embed, heads*head_dim)`` and an
    output kernel ``(heads, head_dim, embed)`` -> ``(heads*head_dim, embed)``.
    """
    nd = len(shape)
    if nd < 2:
        raise ValueError(f"a matrix view needs ndim >= 2, got shape {tuple(shape)}")
    if nd == 2:
        return MatrixDims(0, 1)
    best = min(
        range(1, nd),
        key=lambda k: abs(math.log(math.prod(shape[:k])) - math.log(math.prod(shape[k:]))),
    )
    return MatrixDims(tuple(range(best)), tuple(range(best, nd)))


class MatrixView(NamedTuple):
    """Static description of a parameter's matrix view (not a pytree of arrays)."""

    shape: tuple[int, ...]
    perm: tuple[int, ...]
    m: int
    n: int

    def to_matrix(self, x: jax.Array) -> jax.Array:
        return jnp.transpose(x, self.perm).reshape(self.m, self.n)

    def from_matrix(self, x2: jax.Array) -> jax.Array:
        tshape = tuple(self.shape[a] for a in self.perm)
        inv = tuple(sorted(range(len(self.perm)), key=lambda i: self.perm[i]))
        return jnp.transpose(x2.reshape(tshape), inv)


def matrix_view(shape: Sequence[int], dims: MatrixDims | None) -> MatrixView:
    """Builds the :class:`MatrixView` of an array of ``shape`` under ``dims``."""
    shape = tuple(int(s) for s in shape)
    if dims is None:
        dims = default_matrix_dims(shape)
    nd = len(shape)
    if nd < 2:
        raise ValueError(f"a matrix view needs ndim >= 2, got shape {shape}")
    red, out = _axes(dims.reduction_axis, nd), _axes(dims.output_axis, nd)
    if set(red) & set(out) or len(set(red) | set(out)) != nd or not red or not out:
        raise ValueError(
            f"dimension numbers {dims} must split all {nd} axes of shape {shape} "
            "into two disjoint, non-empty groups")
    perm = red + out
    return MatrixView(shape, perm, math.prod(shape[a] for a in red),
                      math.prod(shape[a] for a in out))


def resolve_side(m: int, n: int, proj_side: str) -> str:
    """Returns ``'left'`` or ``'right'`` for an ``m × n`` matrix."""
    if proj_side == "std":
        return "right" if m >= n else "left"
    if proj_side == "reverse_std":
        return "left" if m >= n else "right"
    if proj_side in ("left", "right"):
        return proj_side
    raise ValueError(f"proj_side={proj_side!r}; expected one of {PROJ_SIDES}")


def projected_dim(m: int, n: int, side: str) -> int:
    return m if side == "left" else n


def project(g2: jax.Array, q: jax.Array, side: str, out_sharding=None) -> jax.Array:
    """``Qᵀ G`` (left, ``r × n``) or ``G Q`` (right, ``m × r``).

    ``out_sharding`` (a PartitionSpec) places the result when ``G`` and ``Q`` are sharded
    over an explicit mesh along the contracted dimension: each device multiplies its shard and
    the partial products are summed, so ``G`` is never gathered."""
    a, b = (q.T, g2) if side == "left" else (g2, q)
    return jnp.matmul(a, b, out_sharding=out_sharding)


def project_back(r2: jax.Array, q: jax.Array, side: str, out_sharding=None) -> jax.Array:
    """``Q N`` (left) or ``N Qᵀ`` (right)."""
    a, b = (q, r2) if side == "left" else (r2, q.T)
    return jnp.matmul(a, b, out_sharding=out_sharding)


def canonicalize_signs(u: jax.Array) -> jax.Array:
    """Flips each column of ``u`` so that its largest-magnitude entry is positive.

    SVD routines on CPU, GPU and TPU may return ``±`` singular vectors; this
    makes the projector (and hence the whole trajectory) backend independent.
    """
    idx = jnp.argmax(jnp.abs(u), axis=0)
    s = jnp.sign(jnp.take_along_axis(u, idx[None, :], axis=0))
    s = jnp.where(s == 0, 1, s)
    return u * s


def _top_left_vectors(a: jax.Array, rank: int) -> jax.Array:
    u, _, _ = jnp.linalg.svd(a, full_matrices=False)
    return u[:, :rank]


def _randomized_left_vectors(a: jax.Array, rank: int, key: jax.Array,
                             oversample: int, power_iters: int) -> jax.Array:
    """Halko-Martinsson-Tropp randomized range finder + small SVD."""
    m, n = a.shape
    k = min(rank + oversample, min(m, n))
    omega = jax.random.normal(key, (n, k), jnp.float32)
    y, _ = jnp.linalg.qr(a @ omega)
    for _ in range(power_iters):
        z, _ = jnp.linalg.qr(a.T @ y)
        y, _ = jnp.linalg.qr(a @ z)
    ub, _, _ = jnp.linalg.svd(y.T @ a, full_matrices=False)
    return (y @ ub)[:, :rank]


def _subspace_left_vectors(a: jax.Array, rank: int, start: jax.Array, iters: int) -> jax.Array:
    """Top-``rank`` left singular vectors of ``a [d, n]`` by subspace iteration from the
    orthonormal ``start [d, rank]``: ``iters`` steps of ``Y <- orth(A A^T Y)``, then the exact
    SVD of the small ``Y^T A [rank, n]`` orders the basis by singular value (Rayleigh-Ritz).

    Each step costs two ``d x n x rank`` products and a ``d x rank`` QR, against the
    ``d x n x min(d, n)`` of a full SVD; it converges at the rate
    ``(sigma_{rank+1} / sigma_rank) ** (2 iters)`` from a start that already spans most of the
    subspace, which the previous projector does when the gradients drift slowly.
    """
    y = start
    for _ in range(iters):
        y, _ = jnp.linalg.qr(a @ (a.T @ y))
    ub, _, _ = jnp.linalg.svd(y.T @ a, full_matrices=False)
    return (y @ ub)[:, :rank]


SVD_METHODS = ("full", "randomized", "subspace")


def svd_projector(
    g2: jax.Array,
    rank: int,
    side: str,
    *,
    method: str = "full",
    key: jax.Array | None = None,
    oversample: int = 8,
    power_iters: int = 2,
    previous: jax.Array | None = None,
    subspace_iters: int = 2,
) -> jax.Array:
    """Top-``rank`` singular vectors of the projected side, shape ``(d, rank)``.

    The decomposition runs in float32; the result is sign-canonicalised and
    returned in ``g2.dtype``. ``method='randomized'`` uses a randomized SVD
    (needs ``key``); ``method='subspace'`` runs ``subspace_iters`` steps of
    subspace iteration warm-started from ``previous`` (the last projector,
    ``(d, rank)``), and the full SVD when ``previous`` is None or all zeros
    (the first refresh).
    """
    a = g2.astype(jnp.float32)
    if side == "right":
        a = a.T
    if method == "full":
        u = _top_left_vectors(a, rank)
    elif method == "randomized":
        if key is None:
            raise ValueError("svd_method='randomized' needs a PRNG key")
        u = _randomized_left_vectors(a, rank, key, oversample, power_iters)
    elif method == "subspace":
        if previous is None:
            u = _top_left_vectors(a, rank)
        else:
            start = previous.astype(jnp.float32)
            u = jax.lax.cond(jnp.any(start != 0),
                             lambda: _subspace_left_vectors(a, rank, start, subspace_iters),
                             lambda: _top_left_vectors(a, rank))
    else:
        raise ValueError(f"svd_method={method!r}; expected one of {SVD_METHODS}")
    return canonicalize_signs(u).astype(g2.dtype)


def random_projector(key_data: jax.Array, leaf_id: int, refresh_index: jax.Array,
                     dim: int, rank: int, dtype) -> jax.Array:
    """APOLLO's Gaussian projector, i.i.d. ``N(0, 1/rank)``, shape ``(dim, rank)``.

    Regenerated from ``key_data`` (raw ``uint32`` key data, as stored in the
    optimizer state) folded with the leaf index and the refresh index
    ``step // update_proj_gap``, so it never has to be stored.
    """
    key = jax.random.wrap_key_data(key_data)
    key = jax.random.fold_in(jax.random.fold_in(key, leaf_id), refresh_index)
    p = jax.random.normal(key, (dim, rank), jnp.float32) / math.sqrt(rank)
    return p.astype(dtype)


def semi_orthogonal_projector(key: jax.Array, dim: int, rank: int, dtype) -> jax.Array:
    """Random ``(dim, rank)`` matrix with orthonormal columns (QR of a Gaussian)."""
    q, r = jnp.linalg.qr(jax.random.normal(key, (dim, rank), jnp.float32))
    q = q * jnp.where(jnp.diag(r) < 0, -1.0, 1.0)[None, :]
    return q.astype(dtype)


def keep_if_finite(new: jax.Array, old: jax.Array) -> jax.Array:
    """Returns ``new`` if all its entries are finite, else ``old`` (SVD failure guard)."""
    return jnp.where(jnp.all(jnp.isfinite(new)), new, old)


DimsSpec = Union[None, MatrixDims, Callable, object]
