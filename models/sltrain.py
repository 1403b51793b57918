"""SLTrain: a linear layer whose weight is a trained low-rank product plus a trained sparse matrix.

SLTrain pretrains a model from scratch with every projection weight written as

    W = (alpha / r) * A @ B + S            A [in, r], B [r, out], S [in, out] sparse

in this library's ``[in, out]`` kernel layout (``y = x @ W + b``).  ``A`` and ``B`` are ordinary
trained factors; ``S`` has a fixed random support of ``nnz = round(density * in * out)`` entries
chosen before training, and only its ``nnz`` values are trained.  The layer therefore stores and
optimises ``in * r + r * out + nnz`` numbers instead of ``in * out``, which is where the savings
in weights, gradients and optimizer state come from (AdamW's two moments follow the parameters).

The sparse support
------------------
The support is not stored: it is a pure function of a seed and the layer's id, regenerated in
every forward pass.  We use a *stratified* random support: the flattened ``in * out`` kernel is cut
into ``nnz`` consecutive stretches (lengths ``q`` or ``q + 1`` where ``q = (in * out) // nnz``, the
longer ones first, so they tile the kernel exactly) and one position is drawn uniformly inside each
stretch, all ``nnz`` of them in one vectorised draw keyed by ``(seed, layer_id)``.  Consequences:

* the ``nnz`` indices are distinct and already sorted, by construction (no rejection, no sort);
* every kernel entry is chosen with probability ``1 / (length of its stretch)``, i.e. equally likely
  up to the one-off difference between ``q`` and ``q + 1`` (exactly equal when ``nnz`` divides
  ``in * out``);
* regenerating it costs ``O(nnz)`` integer operations per call, where an unrestricted uniform
  subset (a permutation or a top-k of ``in * out`` random keys) would cost ``O(in * out)``.

This is our choice, not the published method's, which draws an unrestricted uniform subset once
and keeps it in a buffer.  The stratified support is slightly more regular (exactly one entry per
stretch, so consecutive chosen entries are less than two stretches apart), which does not matter
for a support that only has to be random and fixed.

The draw itself is a counter-based integer hash rather than ``jax.random``: entry ``k`` gets
``h(k) mod length_k`` with ``h`` two rounds of a 32-bit xor-shift-multiply finaliser over the
Weyl sequence ``k * 0x9E3779B9 + s`` (``s`` added again between the rounds), where the 32-bit
stream word ``s`` is mixed on the host from ``seed`` and ``layer_id``.  A threefry ``randint`` is
inlined into the program at every layer and made compilation noticeably slower: in one ad-hoc
trial (an 8-layer ``LS`` model of width 32, AdamW train step, 2 busy CPU cores; no committed
script) it compiled in 6-8 s dense, 24-27 s with threefry supports and 8-16 s with this hash.
The hash is plain uint32 arithmetic, so the support is the same on every backend and does not
depend on ``jax_default_prng_impl``; the modulo bias is below ``length / 2**32``.
Which entries are chosen depends only on ``(seed, layer_id, in, out, density)``, never on the
parameter values or the ``Rngs``.

Initialisation
--------------
The published method starts like LoRA (``B = 0``, so the initial weight is ``S`` alone).  We
instead start both factors from Kaiming-style uniform draws scaled so that ``(alpha / r) * A @ B`` has the
variance ``1 / in`` of the dense projections' default (LeCun) initialisation: ``A`` entries are
uniform with variance ``1 / in`` and ``B`` entries uniform with variance
``1 / (r * (alpha / r)^2)``.
The reasons: the model then starts from the same signal scale as the dense model it replaces,
whose recipe it is compared with, and both factors receive gradients from the first step (with
``B = 0`` the first gradient of ``A`` is zero).  ``alpha`` keeps its LoRA role of scaling the
updates of the low-rank part relative to the learning rate.  The sparse values are uniform in
``+-1/sqrt(in)`` as in the published method; at density ``delta`` they add only ``delta / 3`` of
the dense variance at the start.  A bias, if any, starts at zero like the dense layers' biases.

Defaults: the published pretraining runs use density 0.03 (0.05 at 7B), a rank of about a quarter
of the model width and alpha between 8 and 32 depending on size; ``ModelConfig`` defaults to
density 0.03 and alpha 32 and leaves the rank to the user (``sltrain_rank``).

Forward pass: the weight is materialised densely (``scale * A @ B`` in float32, the sparse values
scattered onto it), cast to the compute dtype, and multiplied like ``nnx.Linear`` does; the
backward pass of the scatter is a gather, so ``d values = dW[support]``.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def sltrain_nnz(d_in: int, d_out: int, density: float) -> int:
    """Stored sparse values of an ``[d_in, d_out]`` SLTrain weight: ``round(density * d_in * d_out)``,
    at least 1 (``optim.accounting`` repeats this formula; it does not import ``models``)."""
    return max(1, round(density * d_in * d_out))


_MASK32 = 0xFFFFFFFF
_WEYL = 0x9E3779B9                       # odd, about 2**32 / golden ratio
_MIX = (0x85EBCA6B, 0xC2B2AE35)          # a 32-bit xor-shift-multiply finaliser's multipliers


def _mix32(x):
    """Xor-shift-multiply finaliser: a bijection of 32-bit words (uint32 arrays wrap)."""
    x = x ^ (x >> 16)
    x = x * jnp.uint32(_MIX[0])
    x = x ^ (x >> 13)
    x = x * jnp.uint32(_MIX[1])
    return x ^ (x >> 16)


def _mix32_host(x: int) -> int:
    """:func:`_mix32` on a Python int (host side, masked to 32 bits)."""
    x &= _MASK32
    x ^= x >> 16
    x = (x * _MIX[0]) & _MASK32
    x ^= x >> 13
    x = (x * _MIX[1]) & _MASK32
    return x ^ (x >> 16)


def support_stream(seed: int, layer_id: int) -> int:
    """The 32-bit stream word that keys one layer's support draw."""
    return _mix32_host(_mix32_host(seed * _WEYL + 0x3C6EF372) ^ (layer_id * 0x85157AF5 + 0xA54FF53A))


def stratified_support(size: int, nnz: int, stream: int) -> jax.Array:
    """``nnz`` distinct sorted int32 indices into ``range(size)``: one uniform draw per stretch.

    ``range(size)`` is cut into ``nnz`` consecutive stretches, the first ``size % nnz`` of length
    ``size // nnz + 1`` and the rest of length ``size // nnz``; one index is drawn in each from the
    hash of its number under the 32-bit ``stream`` word (e.g. :func:`support_stream`).
    """
    if not 1 <= nnz <= size:
        raise ValueError(f"need 1 <= nnz <= size, got nnz={nnz}, size={size}")
    if size >= 2 ** 31:
        raise ValueError(f"a sparse support over {size} entries does not fit int32 indices")
    return _stratified_support(size, nnz, np.uint32(stream & _MASK32))


@functools.partial(jax.jit, static_argnums=(0, 1))
def _stratified_support(size: int, nnz: int, stream: jax.Array) -> jax.Array:
    q, rem = divmod(size, nnz)
    k = jnp.arange(nnz, dtype=jnp.uint32)
    bits = _mix32(_mix32(k * jnp.uint32(_WEYL) + stream) + stream)
    length = jnp.uint32(q) + (k < rem).astype(jnp.uint32)
    start = k * jnp.uint32(q) + jnp.minimum(k, jnp.uint32(rem))
    return (start + bits % length).astype(jnp.int32)


class SLTrainLinear(nnx.Module):
    """``y = x @ ((alpha / r) A @ B + S) + b`` with a fixed stratified random support for ``S``.

    Parameters (``nnx.Param``): ``lora_a [in, r]`` (logical names ``(in_name, "lora_rank")``),
    ``lora_b [r, out]`` (``("lora_rank", out_name)``), ``sparse_values [nnz]`` (``("sparse",)``; both
    helper names are absent from the sharding rules, so replicated) and ``bias [out]`` when
    ``use_bias``.  Static: ``seed`` and ``layer_id`` fix the support (see the module docstring).

    ``dtype`` is the compute dtype (None: the promoted dtype of the input and the parameters, as
    ``nnx.Linear``), ``param_dtype`` the storage dtype.

    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> layer = SLTrainLinear(64, 32, rank=8, density=0.05, alpha=16.0, rngs=nnx.Rngs(0))
    >>> layer.lora_a.shape, layer.lora_b.shape, layer.sparse_values.shape
    ((64, 8), (8, 32), (102,))
    >>> layer(jnp.ones((2, 64))).shape, layer.dense_kernel().shape
    ((2, 32), (64, 32))
    """

    def __init__(self, in_features: int, out_features: int, rank: int, density: float = 0.03,
                 alpha: float = 32.0, *, rngs: nnx.Rngs, names: tuple[str | None, str | None] = (None, None),
                 use_bias: bool = False, seed: int = 0, layer_id: int = 0, dtype=None,
                 param_dtype=jnp.float32):
        if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank:
            raise ValueError(f"SLTrain rank must be a positive int, got {rank!r}")
        if not 0 < density < 1:
            raise ValueError(f"SLTrain density must be in (0, 1), got {density!r}")
        if not alpha > 0:
            raise ValueError(f"SLTrain alpha must be > 0, got {alpha!r}")
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.rank, self.density, self.alpha = rank, float(density), float(alpha)
        self.scale = self.alpha / rank
        self.nnz = sltrain_nnz(self.in_features, self.out_features, self.density)
        self.seed, self.layer_id = int(seed), int(layer_id)
        self.dtype, self.param_dtype = dtype, param_dtype
        in_name, out_name = names

        def uniform(shape, bound):
            return jax.random.uniform(rngs.params(), shape, jnp.float32, -bound, bound).astype(param_dtype)

        def make(value, *axis_names):
            return nnx.Param(value, out_sharding=axis_names, eager_sharding=False)

        # Var(A) = 1/in and Var(B) = 1/(r scale^2): Var(scale * A @ B) = 1/in, the LeCun variance.
        self.lora_a = make(uniform((self.in_features, rank), math.sqrt(3.0 / self.in_features)),
                           in_name, "lora_rank")
        self.lora_b = make(uniform((rank, self.out_features), math.sqrt(3.0 / rank) / self.scale),
                           "lora_rank", out_name)
        self.sparse_values = make(uniform((self.nnz,), 1.0 / math.sqrt(self.in_features)), "sparse")
        self.bias = make(jnp.zeros((self.out_features,), param_dtype), out_name) if use_bias else None

    @property
    def kernel(self):
        raise AttributeError("SLTrainLinear stores no dense kernel (its weight is (alpha / r) A @ B + S); "
                             "use .dense_kernel() for the [in, out] weight, or lora_a / lora_b / sparse_values")

    def support(self) -> jax.Array:
        """The ``nnz`` flat indices (row-major into ``[in, out]``) of the sparse part, int32, sorted."""
        return stratified_support(self.in_features * self.out_features, self.nnz,
                                  support_stream(self.seed, self.layer_id))

    def dense_kernel(self) -> jax.Array:
        """The float32 weight ``(alpha / r) A @ B + S``, ``[in, out]``."""
        a = self.lora_a[...].astype(jnp.float32)
        b = self.lora_b[...].astype(jnp.float32)
        w = (self.scale * (a @ b)).reshape(-1)
        w = w.at[self.support()].add(self.sparse_values[...].astype(jnp.float32),
                                     indices_are_sorted=True, unique_indices=True)
        return w.reshape(self.in_features, self.out_features)

    def __call__(self, x: jax.Array) -> jax.Array:
        bias = None if self.bias is None else self.bias[...]
        dtype = self.dtype or jnp.result_type(x.dtype, self.param_dtype)
        y = jnp.dot(x.astype(dtype), self.dense_kernel().astype(dtype))
        return y if bias is None else y + bias.astype(dtype)
