"""``(I + A)^{-1}`` for strictly lower-triangular ``A``: the delta rules' UT transform."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from .precision import einsum, matmul


@jax.custom_vjp
def unit_tril_inverse(a: jax.Array) -> jax.Array:
    """``(I + tril(a, -1))^{-1}`` over the last two axes, by forward substitution, in float32.

    Only the strictly lower triangle of ``a`` is read.  The VJP uses ``d(L^{-1}) = -L^{-1} dL L^{-1}``,
    i.e. ``dA = tril(-Yᵀ dY Yᵀ, -1)``: two products, no loop.  On CPU forward substitution was
    ~50x faster than XLA's batched ``triangular_solve`` and ~3x faster than the doubling product.

    >>> import jax.numpy as jnp
    >>> a = jnp.array([[0.0, 0.0], [0.5, 0.0]])
    >>> unit_tril_inverse(a)
    Array([[ 1. ,  0. ],
           [-0.5,  1. ]], dtype=float32)
    """
    return _forward_substitution(a)


def _forward_substitution(a):
    c = a.shape[-1]
    a = jnp.tril(a.astype(jnp.float32), -1)
    eye = jnp.eye(c, dtype=jnp.float32)

    def row(i, y):
        # Row i of Y is e_i - sum_{j<i} a[i, j] Y[j]; rows j >= i of y are still zero.
        a_i = jax.lax.dynamic_index_in_dim(a, i, axis=a.ndim - 2, keepdims=False)
        e_i = jax.lax.dynamic_index_in_dim(eye, i, axis=0, keepdims=False)
        return jax.lax.dynamic_update_index_in_dim(y, e_i - einsum("...j,...jc->...c", a_i, y), i,
                                                   axis=a.ndim - 2)

    return jax.lax.fori_loop(0, c, row, jnp.zeros_like(a))


def _fwd(a):
    y = _forward_substitution(a)
    return y, y


def _bwd(y, dy):
    yt = jnp.swapaxes(y, -1, -2)
    return (jnp.tril(-matmul(matmul(yt, dy), yt), -1),)


unit_tril_inverse.defvjp(_fwd, _bwd)
