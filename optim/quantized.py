"""8-bit optimizer states: block-wise dynamic quantisation of Adam's moments.

A moment tensor is flattened and cut into blocks of ``block_size`` values; each block stores
one float32 scale (its largest magnitude) and one byte per value.  The byte is not a linear
code: a value ``x`` in a block of scale ``a`` is stored as ``c = round(L * (|x| / a) ** (1 / p))``
(with its sign for the first moment), and read back as ``a * (c / L) ** p``.  The power ``p``
spends the codes where the values are: small magnitudes get fine steps, so a block whose
largest entry is a thousand times its typical one still keeps the typical ones, which a linear
code would round to zero.  Quantisation error is relative to the block's scale, and blocks are
small, so one outlier costs precision in its own block only.

* first moment ``m``: signed ``int8``, ``L = 127``, ``p = 4``;
* second moment ``v``: unsigned ``uint8``, ``L = 255``, ``p = 4`` (``sqrt(v)``, the quantity
  Adam divides by, gets the ``p = 2`` resolution).

The roots are square roots, so coding costs about as much as the Adam arithmetic itself.

The arithmetic of a step is float32: each moment is read back, updated with the new gradient
and stored again.  Leaves smaller than ``min_size`` values keep float32 moments (their state
is negligible and norms/biases are sensitive).  State per quantised value: 2 bytes plus 8 bytes
of scales per block, against 8 bytes for float32 moments.

>>> import jax.numpy as jnp
>>> from lolax import optim
>>> params = {"w": jnp.ones((256, 64)), "b": jnp.ones((64,))}
>>> tx = optim.adamw_8bit(1e-3)
>>> state = tx.init(params)
>>> eight, full = (optim.state_bytes(t, params)["total"]["bytes"] for t in (tx, optim.adamw(1e-3)))
>>> round(eight / full, 2)        # the 64 bias values keep float32 moments
0.26
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from . import _core


class Quantized(NamedTuple):
    """A tensor stored block-wise in 8 bits: ``codes [blocks * block_size]``, ``scales [blocks]``."""

    codes: jax.Array
    scales: jax.Array


FIRST = (True, 127, 4)       # (signed, levels, power) of the first moment's code
SECOND = (False, 255, 4)     # ... and of the second moment's


def _root(u: jax.Array, power: int) -> jax.Array:
    """``u ** (1 / power)`` for ``u >= 0``; powers 2 and 4 by square roots, which cost about as
    much as a multiplication (a cube root or a general power costs a log and an exp per value,
    several times a whole Adam step on a CPU)."""
    if power == 2:
        return jnp.sqrt(u)
    if power == 4:
        return jnp.sqrt(jnp.sqrt(u))
    return u ** (1.0 / power)


def quantize(x: jax.Array, block_size: int, code: tuple[bool, int, int]) -> Quantized:
    """``x`` (any shape) -> :class:`Quantized` with ``code = (signed, levels, power)``."""
    signed, levels, power = code
    flat = x.astype(jnp.float32).reshape(-1)
    pad = -flat.size % block_size
    blocks = jnp.pad(flat, (0, pad)).reshape(-1, block_size)
    scales = jnp.max(jnp.abs(blocks), axis=1)
    inverse = jnp.where(scales > 0, 1.0 / jnp.where(scales > 0, scales, 1.0), 0.0)[:, None]
    mag = jnp.round(levels * _root(jnp.abs(blocks) * inverse, power))
    codes = (jnp.sign(blocks) * mag).astype(jnp.int8) if signed else mag.astype(jnp.uint8)
    return Quantized(codes.reshape(-1), scales)


def dequantize(q: Quantized, shape: tuple[int, ...], block_size: int, code: tuple[bool, int, int]) -> jax.Array:
    """The float32 tensor of ``shape`` that :func:`quantize` stored in ``q``."""
    _, levels, power = code
    c = q.codes.astype(jnp.float32).reshape(-1, block_size) * (1.0 / levels)
    values = jnp.sign(c) * jax.lax.integer_pow(jnp.abs(c), power) * q.scales[:, None]
    size = 1
    for dim in shape:
        size *= dim
    return values.reshape(-1)[:size].reshape(shape)


class ScaleByAdam8bitState(NamedTuple):
    count: jax.Array   # int32 step count
    mu: Any            # per leaf: Quantized, or a float32 array for small leaves
    nu: Any


def _is_quantized(leaf) -> bool:
    return isinstance(leaf, Quantized)


BLOCK_SIZE = 256
MIN_SIZE = 4096


def store(x: jax.Array, code: tuple[bool, int, int], block_size: int = BLOCK_SIZE,
          min_size: int = MIN_SIZE) -> Any:
    """A moment as kept in the state: :class:`Quantized` when it has at least ``min_size``
    values, else float32."""
    return quantize(x, block_size, code) if x.size >= min_size else x.astype(jnp.float32)


def load(s: Any, shape: tuple[int, ...], code: tuple[bool, int, int], block_size: int = BLOCK_SIZE) -> jax.Array:
    """The float32 moment of ``shape`` that :func:`store` kept in ``s``."""
    return dequantize(s, shape, block_size, code) if _is_quantized(s) else s


def scale_by_adam_8bit(b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8, block_size: int = BLOCK_SIZE,
                       min_size: int = MIN_SIZE) -> optax.GradientTransformation:
    """``optax.scale_by_adam`` (same epsilon placement, ``m_hat / (sqrt(v_hat) + eps)``) with
    both moments stored block-wise in 8 bits for leaves of at least ``min_size`` values (see
    the module docstring).  ``block_size`` values share one scale."""
    _core.check_adam(b1, b2, eps)
    _core.check_int("block_size", block_size)
    if isinstance(min_size, bool) or not isinstance(min_size, int) or min_size < 0:
        raise ValueError(f"min_size must be an int >= 0, got {min_size!r}")

    def stored(x: jax.Array, code) -> Any:
        return store(x, code, block_size, min_size)

    def read(s, like: jax.Array, code) -> jax.Array:
        return load(s, like.shape, code, block_size)

    def init_fn(params):
        zeros = lambda p, code: stored(jnp.zeros(p.shape, jnp.float32), code)
        return ScaleByAdam8bitState(jnp.zeros([], jnp.int32), jax.tree.map(lambda p: zeros(p, FIRST), params),
                                    jax.tree.map(lambda p: zeros(p, SECOND), params))

    def update_fn(updates, state, params=None):
        del params
        count = optax.safe_int32_increment(state.count)
        t = count.astype(jnp.float32)
        leaves, treedef = jax.tree.flatten(updates)
        mus = treedef.flatten_up_to(state.mu)
        nus = treedef.flatten_up_to(state.nu)
        outs, new_mu, new_nu = [], [], []
        for g, mu_s, nu_s in zip(leaves, mus, nus):
            g32 = g.astype(jnp.float32)
            mu = b1 * read(mu_s, g, FIRST) + (1 - b1) * g32
            nu = b2 * read(nu_s, g, SECOND) + (1 - b2) * g32 * g32
            m_hat, v_hat = mu / (1 - b1 ** t), nu / (1 - b2 ** t)
            outs.append((m_hat / (jnp.sqrt(v_hat) + eps)).astype(g.dtype))
            new_mu.append(stored(mu, FIRST))
            new_nu.append(stored(nu, SECOND))
        return (treedef.unflatten(outs),
                ScaleByAdam8bitState(count, treedef.unflatten(new_mu), treedef.unflatten(new_nu)))

    return optax.GradientTransformation(init_fn, update_fn)


def adamw_8bit(learning_rate: optax.ScalarOrSchedule, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
               weight_decay: float = 1e-4, mask: Any = None, *, block_size: int = BLOCK_SIZE,
               min_size: int = MIN_SIZE) -> optax.GradientTransformation:
    """``optax.adamw`` (same defaults and decoupled weight decay) with 8-bit moments:
    ``chain(scale_by_adam_8bit, add_decayed_weights(weight_decay, mask), scale_by_learning_rate)``."""
    _core.check_float("learning_rate", learning_rate, lo=0.0)
    _core.check_float("weight_decay", weight_decay, lo=0.0)
    return optax.chain(scale_by_adam_8bit(b1, b2, eps, block_size, min_size),
                       optax.add_decayed_weights(weight_decay, mask),
                       optax.scale_by_learning_rate(learning_rate))
