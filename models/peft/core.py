"""What every adapter shares: its variable types, the training context and the base class.

An adapted layer replaces an ``nnx.Linear`` in place. It keeps the linear layer's own
``kernel`` (and ``bias``) variables, so their paths, values and sharding names do not change,
and adds its adapter variables:

- :class:`Adapter` (a subclass of ``nnx.LoRAParam``, so of ``nnx.Param``): what trains;
- :class:`AdapterBuffer`: frozen arrays an adapter derives at initialisation (singular or LDU
  factors, LoRA-SB's gradient subspace) and must save with its adapters.

``y = x W0 + b + adapter(dropout(x))``, with ``W0 [in, out]`` frozen. Dropout (and DyLoRA's
rank sampling) act only inside :func:`training`; everywhere else an adapted layer is
deterministic.
"""

from __future__ import annotations

import contextlib
import contextvars
import zlib
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

from .config import PeftConfig


class Adapter(nnx.LoRAParam):
    """A trainable adapter parameter (``peft.trainable`` selects these)."""


class AdapterBuffer(nnx.Variable):
    """A frozen array that belongs to an adapter and is saved with it."""


ADAPTER_STATE = (Adapter, AdapterBuffer)
"""NNX filter of everything an adapter-only checkpoint holds."""

_TRAINING_KEY = contextvars.ContextVar("lolax_peft_training_key", default=None)


@contextlib.contextmanager
def training(key: jax.Array):
    """Adapted layers called inside draw their dropout masks (and DyLoRA its rank) from ``key``.

    ``key`` is a typed PRNG key (traced inside ``jit``), one per training step:

    >>> import jax
    >>> with training(jax.random.key(0)):
    ...     training_key("dropout", 3) is not None
    True
    >>> training_key("dropout", 3) is None
    True
    """
    token = _TRAINING_KEY.set(key)
    try:
        yield
    finally:
        _TRAINING_KEY.reset(token)


def training_key(stream: str, layer_id: int) -> jax.Array | None:
    """The key of ``stream`` for adapted layer ``layer_id`` inside :func:`training`, else None."""
    key = _TRAINING_KEY.get()
    if key is None:
        return None
    return jax.random.fold_in(jax.random.fold_in(key, zlib.crc32(stream.encode())), layer_id)


def layer_key(seed: int, layer_id: int, stream: str = "") -> jax.Array:
    """The fixed key of layer ``layer_id``'s frozen random bases (same in every call)."""
    key = jax.random.fold_in(jax.random.key(seed), layer_id)
    return jax.random.fold_in(key, zlib.crc32(stream.encode())) if stream else key


def kaiming_uniform(key: jax.Array, shape: tuple[int, ...], fan_in: int) -> jax.Array:
    """PyTorch's ``kaiming_uniform_(a=sqrt(5))`` default for a linear layer: U(-1/sqrt(fan_in), +)."""
    bound = fan_in ** -0.5
    return jax.random.uniform(key, shape, jnp.float32, -bound, bound)


class AdaptedLinear(nnx.Module):
    """Base class of the adapters: a frozen ``nnx.Linear`` plus a trainable correction.

    Subclasses set ``method`` and implement :meth:`delta` (the merged correction ``dW [in, out]``
    in float32) and, where a cheaper form exists, :meth:`adapter` (the correction applied to
    ``x``; by default ``x @ delta()``). :meth:`merged_kernel` folds the adapter into the
    kernel; a method whose adapter is not linear in ``x`` overrides :meth:`__call__` and
    :meth:`merged_kernel` together (DoRA).
    """

    method: ClassVar[str] = ""
    mergeable: ClassVar[bool] = True
    needs_data: ClassVar[bool] = False

    def __init__(self, base: nnx.Linear, cfg: PeftConfig, rngs: nnx.Rngs, layer_id: int, path: str):
        self.kernel = base.kernel
        self.bias = base.bias
        self.in_features, self.out_features = base.in_features, base.out_features
        self.use_bias = base.use_bias
        self.dtype, self.param_dtype, self.precision = base.dtype, base.param_dtype, base.precision
        self.rank = cfg.rank
        self.dropout_rate = float(cfg.dropout)
        self.layer_id = layer_id
        self.path = path
        names = base.kernel.get_metadata().get("out_sharding") or (None, None)
        self.in_name, self.out_name = names

    # -- helpers for subclasses -------------------------------------------------------------
    def adapter_param(self, value: jax.Array, *names: str | None) -> Adapter:
        """A float32 :class:`Adapter` with logical axis names (``"lora_rank"`` etc. replicate)."""
        return Adapter(jnp.asarray(value, jnp.float32), out_sharding=names, eager_sharding=False)

    def buffer(self, value: jax.Array, *names: str | None) -> AdapterBuffer:
        return AdapterBuffer(jnp.asarray(value, jnp.float32), out_sharding=names, eager_sharding=False)

    def base_kernel(self) -> jax.Array:
        return self.kernel[...].astype(jnp.float32)

    # -- what subclasses implement -------------------------------------------------------------
    def delta(self) -> jax.Array:
        """The correction ``dW [in, out]`` (float32) the adapter adds to the kernel."""
        raise NotImplementedError(f"{type(self).__name__} (peft.method = {self.method!r}) must define delta()")

    def adapter(self, x: jax.Array) -> jax.Array:
        """The adapter branch on ``x [..., in]`` -> ``[..., out]`` (default ``x @ delta()``)."""
        return x @ self.delta().astype(x.dtype)

    def merged_kernel(self) -> jax.Array:
        """``W0 + dW`` in the kernel's dtype."""
        return (self.base_kernel() + self.delta()).astype(self.kernel.dtype)

    # -- the layer -----------------------------------------------------------------------------
    def _dropout(self, x: jax.Array) -> jax.Array:
        if self.dropout_rate == 0.0:
            return x
        key = training_key("dropout", self.layer_id)
        if key is None:
            return x
        keep = jax.random.bernoulli(key, 1.0 - self.dropout_rate, x.shape)
        return jnp.where(keep, x / (1.0 - self.dropout_rate), jnp.zeros((), x.dtype))

    def _base(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array | None]:
        kernel = self.kernel[...]
        bias = self.bias[...] if self.bias is not None else None
        x, kernel, bias = nnx.nn.dtypes.promote_dtype((x, kernel, bias), dtype=self.dtype)
        y = jax.lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())), precision=self.precision)
        return x, y, bias

    def __call__(self, x: jax.Array) -> jax.Array:
        x, y, bias = self._base(x)
        y = y + self.adapter(self._dropout(x)).astype(y.dtype)
        if bias is not None:
            y = y + bias
        return y

    def to_linear(self) -> nnx.Linear:
        """An ordinary ``nnx.Linear`` holding :meth:`merged_kernel` (and the same bias)."""
        if not self.mergeable:
            raise ValueError(f"peft.method = {self.method!r} cannot be merged into a kernel "
                             f"(layer {self.path})")
        linear = nnx.Linear(self.in_features, self.out_features, use_bias=self.use_bias, dtype=self.dtype,
                            param_dtype=self.param_dtype, precision=self.precision, rngs=nnx.Rngs(0))
        linear.kernel = self.kernel.replace(self.merged_kernel())
        if self.bias is not None:
            linear.bias = self.bias.replace(self.bias[...])
        return linear

    @classmethod
    def initialize(cls, model: nnx.Module, layers: list["AdaptedLinear"], cfg: PeftConfig,
                   data: Any, loss_fn) -> None:
        """Data-driven methods (``needs_data``) set their adapters from ``data`` here."""


METHODS: dict[str, type[AdaptedLinear]] = {}


def register(cls: type[AdaptedLinear]) -> type[AdaptedLinear]:
    METHODS[cls.method] = cls
    return cls
