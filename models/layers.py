"""Building blocks shared by every mixer and model.

Logical-axis parameters (:func:`logical`, :func:`dense`; SLTrain projections inside a
:func:`sltrain` scope), :class:`RMSNorm`, :class:`GatedRMSNorm` (``norm(o) * swish(gate)`` or sigmoid),
:class:`SwiGLU`, the short causal depthwise :class:`ShortConv` with its decoding state,
:func:`rotary` and :func:`l2norm`.

Logical axis names used by the parameters: ``vocab``, ``embed`` (model width), ``mlp`` (MLP
hidden), ``heads`` (a flattened heads x head-dim projection axis, or a per-head vector),
``kv_heads`` (grouped-query key/value projections), ``kv``
(one head's dim, e.g. per-head norms and Hedgehog maps), ``lowrank`` (GLA's gate bottleneck),
``conv`` (short-convolution taps), ``features`` (Hedgehog's D') and ``memories`` (MoM's router
outputs); SLTrain layers add ``lora_rank`` and ``sparse``.  Names missing from
``parallelism.rules.LOGICAL_RULES`` are replicated.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from .sltrain import SLTrainLinear

default_kernel_init = nnx.initializers.lecun_normal()

# (compute dtype, parameter dtype) of the layers built in the current `dtypes` scope.
_DTYPES = contextvars.ContextVar("lolax_layer_dtypes", default=(None, jnp.float32))


@dataclasses.dataclass
class _SLTrainScope:
    rank: int
    density: float
    alpha: float
    seed: int
    next_id: int = 0


# The `sltrain` scope dense() is building in (None: plain nnx.Linear projections).
_SLTRAIN = contextvars.ContextVar("lolax_sltrain", default=None)


@contextlib.contextmanager
def dtypes(compute=None, params=jnp.float32):
    """Layers built inside compute in ``compute`` (None: their inputs' dtype, float32 in
    practice) and store their parameters in ``params``.

    :class:`lolax.models.LanguageModel` builds its layers inside this scope from
    ``model.dtype`` / ``model.param_dtype``; a mixer built on its own outside any scope is
    float32 throughout.

    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> with dtypes(jnp.bfloat16):
    ...     layer = dense(4, 8, ("embed", "mlp"), nnx.Rngs(0))
    >>> layer(jnp.ones((2, 4))).dtype, layer.kernel[...].dtype
    (dtype(bfloat16), dtype('float32'))
    """
    token = _DTYPES.set((compute, params))
    try:
        yield
    finally:
        _DTYPES.reset(token)


def compute_dtype():
    """The compute dtype of the current :func:`dtypes` scope (None outside one)."""
    return _DTYPES.get()[0]


def logical(init, *names: str):
    """Annotates an initializer with logical axis names (sharded later by parallelism rules)."""
    return nnx.with_partitioning(init, names, eager_sharding=False)


def param(value: jax.Array, *names: str) -> nnx.Param:
    """An ``nnx.Param`` holding ``value`` with logical axis ``names`` (one per dimension)."""
    if len(names) != value.ndim:
        raise ValueError(f"need one logical name per dimension of shape {value.shape}, got {names}")
    if jnp.issubdtype(value.dtype, jnp.floating):
        value = value.astype(_DTYPES.get()[1])
    return nnx.Param(value, out_sharding=names, eager_sharding=False)


@contextlib.contextmanager
def sltrain(rank: int, density: float = 0.03, alpha: float = 32.0, seed: int = 0):
    """Inside this scope :func:`dense` builds SLTrain layers (:class:`~.sltrain.SLTrainLinear`,
    ``W = (alpha / rank) A @ B + S`` with ``S`` of density ``density``) wherever
    ``rank < min(d_in, d_out)``, and plain ``nnx.Linear`` layers elsewhere.

    Each SLTrain layer gets the next layer id of the scope (0, 1, ... in build order), which with
    ``seed`` fixes its sparse support, so two layers never share one.  ``rank = 0`` is a no-op.
    :class:`lolax.models.LanguageModel` opens it around its blocks when ``model.sltrain_rank > 0``
    (the embedding and the output head stay dense).

    >>> from flax import nnx
    >>> with sltrain(4, density=0.1):
    ...     a, b = dense(16, 32, ("embed", "mlp"), nnx.Rngs(0)), dense(16, 2, ("embed", "heads"), nnx.Rngs(0))
    >>> type(a).__name__, a.layer_id, a.nnz, type(b).__name__
    ('SLTrainLinear', 0, 51, 'Linear')
    """
    token = _SLTRAIN.set(_SLTrainScope(rank, density, alpha, seed) if rank else None)
    try:
        yield
    finally:
        _SLTRAIN.reset(token)


def dense(d_in: int, d_out: int, names: tuple[str, str], rngs: nnx.Rngs, init=default_kernel_init,
          use_bias: bool = False) -> nnx.Linear | SLTrainLinear:
    """A projection ``[d_in] -> [d_out]`` with logical axis ``names``: an ``nnx.Linear``, or an
    SLTrain layer inside a :func:`sltrain` scope when its rank is below ``min(d_in, d_out)``
    (``init`` then does not apply: SLTrain initialises its own factors)."""
    compute, params = _DTYPES.get()
    scope = _SLTRAIN.get()
    if scope is not None and scope.rank < min(d_in, d_out):
        layer_id, scope.next_id = scope.next_id, scope.next_id + 1
        return SLTrainLinear(d_in, d_out, scope.rank, scope.density, scope.alpha, rngs=rngs, names=names,
                             use_bias=use_bias, seed=scope.seed, layer_id=layer_id, dtype=compute,
                             param_dtype=params)
    kw = {"bias_init": logical(nnx.initializers.zeros_init(), names[1])} if use_bias else {}
    return nnx.Linear(d_in, d_out, use_bias=use_bias, kernel_init=logical(init, *names), rngs=rngs,
                      dtype=compute, param_dtype=params, **kw)


def rms_normalize(x: jax.Array, eps: float) -> jax.Array:
    x32 = x.astype(jnp.float32)
    return x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)


class RMSNorm(nnx.Module):
    """Root-mean-square norm over the last axis, computed in float32, scale on logical ``embed``."""

    def __init__(self, dim: int, eps: float = 1e-6, axis_name: str = "embed"):
        self.eps = eps
        self.scale = param(jnp.ones((dim,), jnp.float32), axis_name)

    def __call__(self, x: jax.Array) -> jax.Array:
        return (rms_normalize(x, self.eps) * self.scale[...]).astype(x.dtype)


GATE_ACTIVATIONS = {"swish": jax.nn.silu, "sigmoid": jax.nn.sigmoid}
"""Output-gate activations of :class:`GatedRMSNorm` by name."""


class GatedRMSNorm(nnx.Module):
    """``RMSNorm(o) * act(gate)`` over the last axis (one head), FLA's ``FusedRMSNormGated``.

    ``activation`` is ``"swish"`` (FLA's default) or ``"sigmoid"`` (Kimi's KDA layer); both keep
    the same parameter, the norm's ``scale``.
    """

    def __init__(self, dim: int, eps: float = 1e-6, axis_name: str = "kv", activation: str = "swish"):
        if activation not in GATE_ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(GATE_ACTIVATIONS)}, got {activation!r}")
        self.eps, self.activation = eps, activation
        self.scale = param(jnp.ones((dim,), jnp.float32), axis_name)

    def __call__(self, x: jax.Array, gate: jax.Array) -> jax.Array:
        y = rms_normalize(x, self.eps) * self.scale[...]
        return (y * GATE_ACTIVATIONS[self.activation](gate.astype(jnp.float32))).astype(x.dtype)


class SwiGLU(nnx.Module):
    """``down(silu(gate(x)) * up(x))``."""

    def __init__(self, d_model: int, hidden: int, rngs: nnx.Rngs):
        self.gate_proj = dense(d_model, hidden, ("embed", "mlp"), rngs)
        self.up_proj = dense(d_model, hidden, ("embed", "mlp"), rngs)
        self.down_proj = dense(hidden, d_model, ("mlp", "embed"), rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class ShortConv(nnx.Module):
    """Causal depthwise convolution over time (kernel ``size``), optionally followed by SiLU.

    ``y_t = act(sum_{j<size} w_j * u_{t-size+1+j})``.  Taps that reach before a sequence start
    (position 0, a packed-segment boundary, or a padded token) read zeros.  Decoding keeps the
    last ``size - 1`` inputs as the state ``[B, size - 1, C]``.
    """

    def __init__(self, channels: int, size: int, rngs: nnx.Rngs, activation: bool = True):
        self.size, self.activation = size, activation
        bound = size ** -0.5                       # PyTorch Conv1d default (fan_in = size, depthwise)
        w = jax.random.uniform(rngs.params(), (size, channels), jnp.float32, -bound, bound)
        self.weight = param(w, "conv", "heads")

    def _act(self, y):
        return jax.nn.silu(y) if self.activation else y

    def __call__(self, u: jax.Array, segment_ids: jax.Array | None = None,
                 valid: jax.Array | None = None) -> jax.Array:
        """``u [B, T, C]``; ``segment_ids [B, T]`` int (taps never cross ids); ``valid [B, T]``."""
        if valid is not None:
            u = jnp.where(valid[..., None], u, jnp.zeros((), u.dtype))
        w = self.weight[...].astype(u.dtype)
        T = u.shape[1]
        y = u * w[-1]
        for s in range(1, min(self.size, T)):
            shifted = jnp.pad(u[:, :T - s], ((0, 0), (s, 0), (0, 0)))
            if segment_ids is not None:
                same = jnp.pad(segment_ids[:, s:] == segment_ids[:, :T - s], ((0, 0), (s, 0)))
                shifted = jnp.where(same[..., None], shifted, jnp.zeros((), u.dtype))
            y = y + shifted * w[-1 - s]
        return self._act(y)

    def final_state(self, u: jax.Array, valid: jax.Array | None = None) -> jax.Array:
        """The decoding state after the whole of ``u [B, T, C]`` (its last ``size - 1`` inputs)."""
        if valid is not None:
            u = jnp.where(valid[..., None], u, jnp.zeros((), u.dtype))
        n = self.size - 1
        u = jnp.pad(u, ((0, 0), (max(n - u.shape[1], 0), 0), (0, 0)))
        return u[:, u.shape[1] - n:]

    def init_state(self, batch: int, channels: int, dtype=jnp.float32) -> jax.Array:
        return jnp.zeros((batch, self.size - 1, channels), dtype)

    def step(self, u: jax.Array, state: jax.Array) -> tuple[jax.Array, jax.Array]:
        """One token ``u [B, 1, C]`` with ``state [B, size - 1, C]`` -> ``(y [B, 1, C], state)``."""
        window = jnp.concatenate([state.astype(u.dtype), u], axis=1)          # [B, size, C]
        y = jnp.einsum("bsc,sc->bc", window, self.weight[...].astype(u.dtype))[:, None]
        return self._act(y), window[:, 1:].astype(state.dtype)


def rotary(x: jax.Array, positions: jax.Array, theta: float = 10_000.0, inv_freq=None) -> jax.Array:
    """Rotary position embedding on ``x [B, T, H, D]`` (D even) at integer ``positions [B, T]``.

    The first and second halves of the head dimension form the rotated pairs.  ``inv_freq
    [D / 2]`` overrides the frequencies ``theta ** (-2i / D)`` (scaled rotary, see
    :meth:`lolax.models.ModelConfig.rope_inv_freq`).
    """
    d = x.shape[-1]
    if d % 2:
        raise ValueError(f"rotary embeddings need an even head size, got {d}")
    if inv_freq is None:
        freq = theta ** (-jnp.arange(0, d // 2, dtype=jnp.float32) * 2.0 / d)
    else:
        freq = jnp.asarray(inv_freq, jnp.float32)
    angle = positions[..., None].astype(jnp.float32) * freq                 # [B, T, D/2]
    cos, sin = jnp.cos(angle)[:, :, None, :], jnp.sin(angle)[:, :, None, :]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


def l2norm(x: jax.Array, eps: float = 1e-6) -> jax.Array:
    """``x / sqrt(sum x^2 + eps)`` over the last axis in float32 (FLA's ``l2_norm``); 0 stays 0."""
    x32 = x.astype(jnp.float32)
    return (x32 * jax.lax.rsqrt(jnp.sum(x32 * x32, axis=-1, keepdims=True) + eps)).astype(x.dtype)
