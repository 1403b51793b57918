"""Feature maps φ for linear attention, applied per head to q and k by the layer.

Each map is a pure function on ``[..., D]`` (the last axis is the head dimension); learnable ones
take their weights as arguments (weights ``[D, D']`` shared across heads, or ``[H, D, D']`` with
``x`` laid out ``[..., H, D]``).  Maps that already contain their temperature (Taylor, softmax
forms) should be paired with ``scale=1.0`` in the op.

| name | φ(x) |
|---|---|
| :func:`identity` | x |
| :func:`elu_plus_one` | 1 + elu(x) (positive) |
| :func:`relu` | max(x W + b, clamp_min) (T2R when W is learnt; LoLCATs clamps at 1e-12) |
| :func:`hedgehog` ``form="lolcats"`` | [softmax(x W + b), softmax(−x W − b)], each half over its own D' |
| :func:`hedgehog` ``form="fla"`` | softmax([2 z, −2 z]) over all 2D', z = x W + b |
| :func:`based_taylor` | [1, x/d^{1/4}, vec(x⊗x)/(√2 √d)] so φ(q)·φ(k) = 1 + q·k/√d + (q·k)²/(2d) |
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


def identity(x: Array) -> Array:
    """φ(x) = x.

    >>> identity(jnp.array([-1.0, 2.0]))
    Array([-1.,  2.], dtype=float32)
    """
    return x


def elu_plus_one(x: Array) -> Array:
    """φ(x) = 1 + elu(x) > 0: the classic "linear transformer" map.

    >>> elu_plus_one(jnp.array([0.0, 2.0]))
    Array([1., 3.], dtype=float32)
    """
    return jax.nn.elu(x) + 1.0


def _project(x: Array, weight, bias) -> Array:
    if weight is None:
        z = x
    elif weight.ndim == 2:
        if weight.shape[0] != x.shape[-1]:
            raise ValueError(f"weight must have shape [D={x.shape[-1]}, D'], got {weight.shape}")
        z = jnp.einsum("...d,de->...e", x, weight.astype(x.dtype))
    elif weight.ndim == 3:
        if x.ndim < 2 or weight.shape[:2] != x.shape[-2:]:
            raise ValueError(f"per-head weight must have shape [H, D, D'] matching x [..., H, D] = "
                             f"{x.shape}, got {weight.shape}")
        z = jnp.einsum("...hd,hde->...he", x, weight.astype(x.dtype))
    else:
        raise ValueError(f"weight must have shape [D, D'] or [H, D, D'], got {weight.shape}")
    if bias is not None:
        if bias.shape[-1] != z.shape[-1]:
            raise ValueError(f"bias must end in D' = {z.shape[-1]}, got {bias.shape}")
        z = z + bias.astype(z.dtype)
    return z


def relu(x: Array, weight=None, bias=None, clamp_min: float = 0.0) -> Array:
    """φ(x) = max(x W + b, clamp_min); without weights a plain ReLU.  T2R learns W and b;
    LoLCATs uses ``clamp_min=1e-12`` so normalised attention never divides by zero.

    >>> relu(jnp.array([-1.0, 2.0]))
    Array([0., 2.], dtype=float32)
    """
    return jnp.maximum(_project(x, weight, bias), clamp_min)


def hedgehog(x: Array, weight: Array, bias=None, form: str = "lolcats", eps: float = 1e-12) -> Array:
    """Hedgehog's learnable softmax feature map (2·D' features).

    Args:
      x: ``[..., D]`` (or ``[..., H, D]`` with a per-head weight).
      weight: ``[D, D']`` or ``[H, D, D']``; LoLCATs inits Kaiming-uniform (untied for q and k),
        FLA inits the identity (D' = D).
      bias: optional ``[D']`` or ``[H, D']``.
      form: ``"lolcats"``: ``[softmax(z), softmax(−z)]``, each half normalised over its own D',
        clamped at ``eps``; ``"fla"``: ``softmax([2z, −2z])``, one softmax over all 2D'
        (FLA's ``HedgehogFeatureMap``: z = Linear(x), then ``cat([2z, −2z]).softmax(-1)``).

    >>> x = jnp.ones((5, 4))
    >>> hedgehog(x, jnp.eye(4), form="fla").shape              # 2 D' features
    (5, 8)
    """
    z = _project(x, weight, bias)
    if form == "lolcats":
        return jnp.maximum(jnp.concatenate([jax.nn.softmax(z, -1), jax.nn.softmax(-z, -1)], -1), eps)
    if form == "fla":
        return jax.nn.softmax(jnp.concatenate([2 * z, -2 * z], -1), -1)
    raise ValueError(f"form must be 'lolcats' or 'fla', got {form!r}")


def based_taylor(x: Array, compact: bool = False) -> Array:
    """Based's second-order Taylor map of ``exp(q·k/√d)``, d = x.shape[-1].

    ``φ(q)·φ(k) = 1 + q·k/√d + (q·k)²/(2d)``.  The full form has ``1 + d + d²`` features
    (273 for d = 16): ``[1, x/d^{1/4}, vec(x⊗x)/(√2·√d)]``; the compact form keeps each
    unordered pair once, ``1 + d + d(d+1)/2`` features (153 for d = 16): diagonal terms
    ``x_i²/(√2·√d)`` and off-diagonal ``x_i x_j/√d`` for i < j.  Use ``scale=1.0`` in the op.

    >>> q, k = jnp.ones(16) * 0.5, jnp.ones(16) * 0.25
    >>> s = q @ k / 4.0                                        # q·k/√d
    >>> bool(jnp.isclose(based_taylor(q) @ based_taylor(k), 1 + s + s ** 2 / 2))
    True
    """
    d = x.shape[-1]
    rd = math.sqrt(d)
    ones = jnp.ones(x.shape[:-1] + (1,), x.dtype)
    first = x / math.sqrt(rd)
    if not compact:
        second = (x[..., :, None] * x[..., None, :]).reshape(x.shape[:-1] + (d * d,))
        second = second / (math.sqrt(2.0) * rd)
    else:
        i, j = np.triu_indices(d)
        w = np.where(i == j, 1.0 / (math.sqrt(2.0) * rd), 1.0 / rd).astype(np.float32)
        second = x[..., i] * x[..., j] * jnp.asarray(w, x.dtype)
    return jnp.concatenate([ones, first, second], -1)


def based_taylor_dim(d: int, compact: bool = False) -> int:
    """Number of features :func:`based_taylor` returns for head dimension d."""
    return 1 + d + (d * (d + 1) // 2 if compact else d * d)


FEATURE_MAPS = {"identity": identity, "elu_plus_one": elu_plus_one, "relu": relu,
                "hedgehog": hedgehog, "based_taylor": based_taylor}
"""Every feature map by name: the one registry the models and configs use."""

TEMPERATURE_INCLUDED = frozenset({"hedgehog", "based_taylor"})
"""Maps whose similarity already contains its temperature: use them with ``scale=1.0``."""
