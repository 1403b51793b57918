"""Adapters built on frozen random bases that are regenerated, never stored: NOLA and RandLoRA.

Both methods train a handful of numbers per layer (mixing coefficients, diagonal scalings) that
act on large random matrices. The random matrices are a pure function of ``(cfg.seed,
layer_id, stream)`` through :func:`~lolax.models.peft.core.layer_key`: the layer keeps only
two Python ints (``seed``, ``layer_id``), so the bases are in no ``nnx.State``, in no
checkpoint and count in neither ``trainable`` nor ``buffers`` of :func:`peft.count`. An
adapter checkpoint plus the seed reproduces the update exactly.

The bases are drawn inside functions wrapped in ``jax.checkpoint``: the backward pass draws them
again instead of keeping them as residuals (for NOLA ``k * in * r + l * r * out`` values per
layer, for RandLoRA a full ``min(in, out) x out`` matrix per layer), so their memory cost is
transient in both passes. Drawing them costs a few random-number kernels per layer and step
(two per layer in the forward pass, two more in the backward pass), and each adapted layer adds
its draws to the compiled program.

Layout: kernels are ``[in, out]`` (``y = x W + b``). Bases are drawn in float32 whatever the
compute dtype (so eager, ``jit``, float32 and bfloat16 see the same matrices) and cast to
``x``'s dtype for the forward pass; :meth:`delta` stays in float32.

NOLA (``nola``)
    ``dW = s * A @ B`` with ``A = sum_{i<k} coef_a[i] A_i`` (``A_i [in, r]``) and
    ``B = sum_{j<l} coef_b[j] B_j`` (``B_j [r, out]``), ``k = l = num_bases`` (64 when 0),
    ``s = alpha / r``. Only ``coef_a [k]`` and ``coef_b [l]`` train.

    - Bases: ``A_i`` entries ``N(0, 1/in)`` (Kaiming-like: ``x A_i`` has entries of the size of
      ``x``'s), ``B_j`` entries ``N(0, 1/r)`` (likewise for the rank-``r`` activations). Each
      stack is one flat draw, reshaped: ``A_i = (normal(layer_key(seed, layer_id, "nola_a"),
      (k*in*r,)) / sqrt(in)).reshape(k, in, r)[i]`` and ``B_j`` likewise from ``"nola_b"``,
      ``(l*r*out,)``, ``/ sqrt(r)``, ``.reshape(l, r, out)[j]``.
    - Init: ``coef_b = 0`` (so ``dW = 0``), ``coef_a ~ U(-1/sqrt(k), 1/sqrt(k))`` from
      ``rngs.params()``. Then ``A``'s entries have variance ``k * (1/(3k)) / in = 1/(3 in)``,
      the variance of LoRA's Kaiming-uniform ``A``, whatever ``k``: NOLA starts where LoRA with
      the same rank and ``alpha`` would, in distribution.
    - Where this may differ from the paper: the method only needs fixed random matrices
      rebuilt from a seed; the distribution and scales above are our own choice, not a copy of
      the authors' generator, so a given seed does not reproduce their bases. The scaling is
      LoRA's ``alpha / r``. The paper's point of generating the bases on the fly instead of
      storing them is realised with ``jax.checkpoint`` (they are drawn again in the backward
      pass) rather than with a dedicated kernel.

RandLoRA (``randlora``)
    In math layout (``W [out, in]``) the update is
    ``dW = s * sum_{i<n} B_i diag(lambda_i) A diag(gamma_i)`` with distinct frozen
    ``B_i [out, r]``, one shared frozen ``A [r, in]``, trainable ``lambda_i [r]`` and
    ``gamma_i [in]``, ``s = alpha / r`` and ``n = num_bases`` or ``ceil(min(in, out) / r)``
    (enough bases for a full-rank ``dW``). In our ``[in, out]`` layout that is the transpose,
    ``dW = s * sum_i diag(gamma_i) A^T diag(lambda_i) B_i^T``, i.e. a rank-``n r`` product
    ``s * G @ L`` of ``G [in, n r]`` (block ``i``: ``gamma_i[:, None] * A^T``) and
    ``L [n r, out]`` (block ``i``: ``lambda_i[:, None] * B_i^T``). The forward pass contracts
    ``x`` with ``G`` and then ``L`` (``n r (in + out)`` multiply-adds per token) and never forms
    ``dW``.

    - Bases: drawn directly in our layout, ``A^T [in, r]`` entries ``N(0, 1/in)`` from
      ``layer_key(seed, layer_id, "randlora_a")`` and the stacked ``B_i^T [n, r, out]`` entries
      ``N(0, 1/r)`` from ``"randlora_b"`` (same reasoning as NOLA), each one flat draw reshaped
      as for NOLA.
    - Init: ``lambdas [n, r] = 0`` (so ``dW = 0``) and ``gammas [n, in] = 1/n``. With
      ``gamma = 1/n`` every basis starts with the same weight and the ``n`` terms are averaged
      rather than summed, so a larger ``n`` does not inflate the update; the gradient of
      ``lambda_i`` at step 0 is ``s/n * (x A^T) * (g B_i)`` summed over tokens (``g`` the
      output gradient), nonzero, while ``gammas`` get zero gradient until the ``lambdas`` move
      (as LoRA's ``A`` does while ``B = 0``).
    - Where this may differ from the paper: the paper treats the scale of the update as a
      hyperparameter of its own, here it follows this library's ``alpha / r``; the bases here
      are dense Gaussians with the scales above, drawn independently for every layer from the
      seed (the paper also considers sparse random bases, and an implementation that stores
      its bases may share one set between layers of a shape to save memory, which regeneration
      makes unnecessary); the ``1/n`` init of ``gammas`` is our choice.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx

from .config import PeftConfig
from .core import AdaptedLinear, layer_key, register

NOLA_DEFAULT_BASES = 64


# -- drawing the bases -----------------------------------------------------------------------
@functools.partial(jax.jit, static_argnums=(1, 2))
def _normal(key: jax.Array, shape: tuple[int, ...], std: float) -> jax.Array:
    """``std * normal(key, (prod(shape),))`` reshaped to ``shape``, float32.

    One flat draw: with partitionable threefry a multi-axis draw compiles several times slower,
    and a flat one fixes the values independently of how the axes are split. Jitted with the
    key as an argument, so every layer of a shape shares one compilation and eager callers get
    the same bits as jitted ones.
    """
    return (jax.random.normal(key, (math.prod(shape),), jnp.float32) * std).reshape(shape)


# -- NOLA ------------------------------------------------------------------------------------
def _nola_keys(seed: int, layer_id: int) -> tuple[jax.Array, jax.Array]:
    return layer_key(seed, layer_id, "nola_a"), layer_key(seed, layer_id, "nola_b")


def _nola_draw(key_a, key_b, k: int, l: int, d_in: int, r: int, d_out: int):
    return _normal(key_a, (k, d_in, r), d_in ** -0.5), _normal(key_b, (l, r, d_out), r ** -0.5)


def nola_bases(seed: int, layer_id: int, k: int, l: int, d_in: int, r: int,
               d_out: int) -> tuple[jax.Array, jax.Array]:
    """NOLA's frozen bases of layer ``layer_id``: ``A_i`` stacked ``[k, in, r]`` and ``B_j``
    stacked ``[l, r, out]``, float32."""
    return _nola_draw(*_nola_keys(seed, layer_id), k, l, d_in, r, d_out)


@functools.partial(jax.checkpoint, static_argnums=(4, 5, 6))
def _nola_factors(coef_a: jax.Array, coef_b: jax.Array, key_a: jax.Array, key_b: jax.Array, d_in: int, r: int,
                  d_out: int) -> tuple[jax.Array, jax.Array]:
    """``A = sum_i coef_a[i] A_i`` and ``B = sum_j coef_b[j] B_j`` (float32); under
    ``jax.checkpoint`` the bases are drawn again in the backward pass, not saved."""
    a_bases, b_bases = _nola_draw(key_a, key_b, coef_a.shape[0], coef_b.shape[0], d_in, r, d_out)
    return jnp.einsum("k,kir->ir", coef_a, a_bases), jnp.einsum("l,lro->ro", coef_b, b_bases)


@register
class NOLA(AdaptedLinear):
    """``y = x W0 + b + (alpha / r) * x A B``, ``A``/``B`` mixtures of frozen random bases whose
    coefficients ``coef_a [k]``, ``coef_b [l]`` are all that trains (see the module docstring)."""

    method = "nola"

    def __init__(self, base: nnx.Linear, cfg: PeftConfig, rngs: nnx.Rngs, layer_id: int, path: str):
        super().__init__(base, cfg, rngs, layer_id, path)
        k = cfg.num_bases or NOLA_DEFAULT_BASES
        self.num_bases = k
        self.seed = int(cfg.seed)
        self.scaling = cfg.alpha / cfg.rank
        bound = k ** -0.5
        self.coef_a = self.adapter_param(jax.random.uniform(rngs.params(), (k,), jnp.float32, -bound, bound),
                                         "lora_bases")
        self.coef_b = self.adapter_param(jnp.zeros((k,)), "lora_bases")

    def bases(self) -> tuple[jax.Array, jax.Array]:
        """The frozen bases, regenerated: ``A_i [k, in, r]`` and ``B_j [l, r, out]`` (float32)."""
        return nola_bases(self.seed, self.layer_id, self.num_bases, self.num_bases, self.in_features,
                          self.rank, self.out_features)

    def factors(self) -> tuple[jax.Array, jax.Array]:
        """``A [in, r]`` and ``B [r, out]`` (float32, unscaled)."""
        return _nola_factors(self.coef_a[...], self.coef_b[...], *_nola_keys(self.seed, self.layer_id),
                             self.in_features, self.rank, self.out_features)

    def delta(self) -> jax.Array:
        a, b = self.factors()
        return self.scaling * (a @ b)

    def adapter(self, x: jax.Array) -> jax.Array:
        a, b = self.factors()
        return (x @ a.astype(x.dtype)) @ b.astype(x.dtype) * jnp.asarray(self.scaling, x.dtype)


# -- RandLoRA --------------------------------------------------------------------------------
def _randlora_keys(seed: int, layer_id: int) -> tuple[jax.Array, jax.Array]:
    return layer_key(seed, layer_id, "randlora_a"), layer_key(seed, layer_id, "randlora_b")


def _randlora_draw(key_a, key_b, n: int, d_in: int, r: int, d_out: int):
    return _normal(key_a, (d_in, r), d_in ** -0.5), _normal(key_b, (n, r, d_out), r ** -0.5)


def randlora_bases(seed: int, layer_id: int, n: int, d_in: int, r: int,
                   d_out: int) -> tuple[jax.Array, jax.Array]:
    """RandLoRA's frozen bases of layer ``layer_id`` in ``[in, out]`` layout: the shared
    ``A^T [in, r]`` and the stacked ``B_i^T [n, r, out]``, float32."""
    return _randlora_draw(*_randlora_keys(seed, layer_id), n, d_in, r, d_out)


def _randlora_blocks(lambdas, gammas, key_a, key_b, d_out, dtype):
    """``G [n, in, r]`` (``gamma_i[:, None] * A^T``) and ``L [n, r, out]``
    (``lambda_i[:, None] * B_i^T``) in ``dtype``."""
    n, r = lambdas.shape
    a, b = _randlora_draw(key_a, key_b, n, gammas.shape[1], r, d_out)
    g = gammas.astype(dtype)[:, :, None] * a.astype(dtype)[None]
    l = lambdas.astype(dtype)[:, :, None] * b.astype(dtype)
    return g, l


@functools.partial(jax.checkpoint, static_argnums=(5,))
def _randlora_apply(x: jax.Array, lambdas: jax.Array, gammas: jax.Array, key_a: jax.Array, key_b: jax.Array,
                    d_out: int) -> jax.Array:
    """``x G L`` in ``x.dtype`` (unscaled); the bases (and ``G``, ``L``) are recomputed in the
    backward pass, so only ``x``, ``lambdas``, ``gammas`` (and the keys) are saved."""
    g, l = _randlora_blocks(lambdas, gammas, key_a, key_b, d_out, x.dtype)
    h = jnp.einsum("...d,ndr->...nr", x, g)
    return jnp.einsum("...nr,nro->...o", h, l)


@functools.partial(jax.checkpoint, static_argnums=(4,))
def _randlora_delta(lambdas: jax.Array, gammas: jax.Array, key_a: jax.Array, key_b: jax.Array,
                    d_out: int) -> jax.Array:
    g, l = _randlora_blocks(lambdas, gammas, key_a, key_b, d_out, jnp.float32)
    return jnp.einsum("ndr,nro->do", g, l)


@register
class RandLoRA(AdaptedLinear):
    """``y = x W0 + b + (alpha / r) * sum_i (x * gamma_i) A^T diag(lambda_i) B_i^T``: a full-rank
    update from frozen random bases; ``lambdas [n, r]`` and ``gammas [n, in]`` train (see the
    module docstring)."""

    method = "randlora"

    def __init__(self, base: nnx.Linear, cfg: PeftConfig, rngs: nnx.Rngs, layer_id: int, path: str):
        super().__init__(base, cfg, rngs, layer_id, path)
        r = cfg.rank
        n = cfg.num_bases or math.ceil(min(self.in_features, self.out_features) / r)
        self.num_bases = n
        self.seed = int(cfg.seed)
        self.scaling = cfg.alpha / r
        self.lambdas = self.adapter_param(jnp.zeros((n, r)), "lora_bases", "lora_rank")
        self.gammas = self.adapter_param(jnp.full((n, self.in_features), 1.0 / n), "lora_bases", self.in_name)

    def bases(self) -> tuple[jax.Array, jax.Array]:
        """The frozen bases, regenerated: ``A^T [in, r]`` and ``B_i^T [n, r, out]`` (float32)."""
        return randlora_bases(self.seed, self.layer_id, self.num_bases, self.in_features, self.rank,
                              self.out_features)

    def delta(self) -> jax.Array:
        return self.scaling * _randlora_delta(self.lambdas[...], self.gammas[...],
                                              *_randlora_keys(self.seed, self.layer_id), self.out_features)

    def adapter(self, x: jax.Array) -> jax.Array:
        y = _randlora_apply(x, self.lambdas[...], self.gammas[...], *_randlora_keys(self.seed, self.layer_id),
                            self.out_features)
        return y * jnp.asarray(self.scaling, x.dtype)
