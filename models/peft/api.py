"""``apply``, ``merge``, ``trainable`` and the bookkeeping around them."""

from __future__ import annotations

import hashlib
import re
from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .config import PeftConfig
from .core import ADAPTER_STATE, METHODS, AdaptedLinear, Adapter, AdapterBuffer

LossFn = Callable[[nnx.Module, Any], jax.Array]


def _path_text(path: tuple) -> str:
    return "/".join(str(p) for p in path)


def _matches(targets, path: tuple) -> bool:
    if isinstance(targets, str):
        return re.search(targets, _path_text(path)) is not None
    return any(str(p) in targets for p in path)


def linear_layers(model: nnx.Module) -> list[tuple[tuple, nnx.Linear]]:
    """Every ``nnx.Linear`` of ``model`` (adapted layers are not ones) with its path, in path order."""
    return [(path, m) for path, m in nnx.iter_modules(model) if isinstance(m, nnx.Linear)]


def adapted_layers(model: nnx.Module) -> list[tuple[tuple, AdaptedLinear]]:
    """Every adapted layer of ``model`` with its path, in path order."""
    return [(path, m) for path, m in nnx.iter_modules(model) if isinstance(m, AdaptedLinear)]


def _replace(model: nnx.Module, path: tuple, new: nnx.Module) -> None:
    parent = model
    for key in path[:-1]:
        parent = parent[key] if isinstance(key, int) else getattr(parent, key)
    if isinstance(path[-1], int):
        parent[path[-1]] = new
    else:
        setattr(parent, path[-1], new)


def default_loss(model: nnx.Module, batch: Any) -> jax.Array:
    """Next-token cross-entropy of a language model on ``batch["inputs"]`` / ``batch["targets"]``
    (the data-driven inits' default ``loss_fn``)."""
    logits = model(batch["inputs"]).astype(jnp.float32)
    logp = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, batch["targets"][..., None], axis=-1))


def apply(model: nnx.Module, cfg: PeftConfig, rngs: nnx.Rngs, *, data: Iterable | None = None,
          loss_fn: LossFn = default_loss) -> nnx.Module:
    """Wraps every targeted ``nnx.Linear`` of ``model`` in ``cfg.method``'s adapter, in place.

    Args:
      model: any NNX module; its linear layers are found by path (``layers/0/attn/q_proj``).
      cfg: the method, rank and targets.
      rngs: initialises the trainable factors (``rngs.params()``).
      data: batches for the data-driven methods (``eva``, ``lora_sb``), of which they read at
        most ``cfg.init_batches``; ignored by the others.
      loss_fn: ``loss_fn(model, batch) -> scalar``: ``lora_sb`` differentiates it, ``eva``
        runs it for the layers' inputs. Default: next-token cross-entropy on
        ``batch["inputs"]`` / ``batch["targets"]``.

    Returns ``model`` (now adapted). Every method leaves the model's function unchanged.

    >>> from flax import nnx
    >>> import jax.numpy as jnp
    >>> from lolax.models import LanguageModel, ModelConfig, peft
    >>> model = LanguageModel(ModelConfig(d_model=32, num_layers=2, pattern="LS", num_heads=2), nnx.Rngs(0))
    >>> before = model(jnp.ones((1, 8), jnp.int32))
    >>> _ = peft.apply(model, peft.PeftConfig("lora", rank=4, targets=("q_proj", "v_proj")), nnx.Rngs(1))
    >>> bool(jnp.all(model(jnp.ones((1, 8), jnp.int32)) == before))
    True
    >>> peft.count(model)["trainable"]        # 2 layers x 2 targets x (32 * 4 + 4 * 32)
    1024
    """
    if not isinstance(cfg, PeftConfig):
        raise TypeError(f"cfg must be a PeftConfig, got {type(cfg).__name__}")
    cls = METHODS[cfg.method]
    found = linear_layers(model)
    chosen = [(path, m) for path, m in found if _matches(cfg.targets, path)]
    if not chosen:
        names = sorted({str(p[-1]) for p, _ in found})
        raise ValueError(f"peft.targets = {cfg.targets!r} matches no linear layer of the model; "
                         f"its linear layers are named {names}")
    for path, linear in chosen:
        kernel = linear.kernel
        if kernel.ndim != 2:
            raise ValueError(f"layer {_path_text(path)} has a kernel of shape {kernel.shape}, not [in, out]; "
                             "adapters need unstacked layers (build the model with model.scan_layers = False)")
        limit = min(kernel.shape)
        if cfg.rank > limit:
            raise ValueError(f"peft.rank = {cfg.rank} is larger than layer {_path_text(path)} allows: its "
                             f"kernel is {tuple(kernel.shape)}, so the rank must be <= {limit}")
    first_id = len(adapted_layers(model))
    new_layers = []
    for i, (path, linear) in enumerate(chosen):
        layer = cls(linear, cfg, rngs, first_id + i, _path_text(path))
        _replace(model, path, layer)
        new_layers.append(layer)
    if cls.needs_data:
        if data is None:
            raise ValueError(f"peft.method = {cfg.method!r} initialises from data: pass data= (batches)")
        cls.initialize(model, new_layers, cfg, data, loss_fn)
    return model


def trainable(model: nnx.Module | None = None) -> type:
    """The NNX filter of adapter parameters: ``nnx.state(model, peft.trainable(model))``, or
    ``nnx.Optimizer(model, tx, wrt=peft.trainable(model))``.

    Everything else (the base kernels, frozen adapter buffers) stays fixed.
    """
    return Adapter


def adapter_state(model: nnx.Module) -> nnx.State:
    """What an adapter-only checkpoint holds: trainable adapters and their frozen buffers."""
    return nnx.state(model, ADAPTER_STATE)


def _values(state) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state))


def count(model: nnx.Module) -> dict[str, int]:
    """Values by role: ``trainable`` (adapters), ``buffers`` (frozen adapter arrays), ``base``
    (every other parameter) and ``total``. NOLA's and RandLoRA's random bases are not stored,
    so they count nowhere."""
    _, trained, buffers, base = nnx.split(model, Adapter, AdapterBuffer, nnx.Param, ...)[:4]
    out = {"trainable": _values(trained), "buffers": _values(buffers), "base": _values(base)}
    out["total"] = sum(out.values())
    return out


def merge(model: nnx.Module) -> nnx.Module:
    """A copy of ``model`` with every adapter folded into its kernel: an ordinary model with the
    structure and parameter paths of the unadapted one. Raises ValueError for a layer whose
    method cannot merge."""
    merged = nnx.clone(model)
    for path, layer in adapted_layers(merged):
        _replace(merged, path, layer.to_linear())
    return merged


def set_rank(model: nnx.Module, rank: int) -> nnx.Module:
    """DyLoRA: use only the first ``rank`` ranks of every DyLoRA layer (outside training, and in
    :func:`merge`), in place."""
    layers = [m for _, m in adapted_layers(model) if m.method == "dylora"]
    if not layers:
        raise ValueError("set_rank: the model has no DyLoRA layers (peft.method = 'dylora')")
    for layer in layers:
        if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= layer.rank:
            raise ValueError(f"rank must be an int in [1, {layer.rank}] (the trained peft.rank), got {rank!r}")
        layer.active_rank = rank
    return model


def base_state(model: nnx.Module) -> nnx.State:
    """The base model's parameters: every ``nnx.Param`` that is not an adapter."""
    return nnx.state(model, nnx.All(nnx.Param, nnx.Not(Adapter)))


def fingerprint(params: Any) -> str:
    """SHA-256 of a parameter tree's paths, shapes, dtypes and values (host order, exact)."""
    h = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        arr = np.asarray(jax.device_get(leaf))
        h.update(jax.tree_util.keystr(path).encode())
        h.update(f"{arr.shape}{arr.dtype}".encode())
        h.update(np.ascontiguousarray(arr).tobytes())
    return h.hexdigest()
