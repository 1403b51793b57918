"""Logical axis rules: the one table from the models' logical axis names to mesh axes.

Parameters carry logical axis names in their ``out_sharding`` metadata (``('embed', 'heads')``,
``('vocab', 'embed')``, ...; see ``models/layers.py``).  :data:`LOGICAL_RULES` maps each name to
mesh axes of :mod:`lolax.parallelism.mesh`; everything else in this module applies that table:

=================== ==================== ==============================================
logical name        mesh axes            meaning
=================== ==================== ==============================================
``batch``           ``('data', 'fsdp')``  activations: the batch is split over both
``sequence``        ``'sequence'``        activations: tokens (LASP-2 / ring attention)
``embed``           ``'fsdp'``            model width: FSDP shards parameters along it
``vocab``           ``'tensor'``          embedding / output-head rows
``heads``           ``'tensor'``          query / key / value heads (fused heads × head_dim)
``kv_heads``        ``'tensor'``          key/value heads under GQA
``mlp``             ``'tensor'``          MLP hidden units
``kv``              None                  per-head feature dims (head_dim): replicated
``norm``            None                  replicated
=================== ==================== ==============================================

A dimension whose size is not divisible by its mesh axes is replicated instead (exact, only less
memory-efficient); unknown logical names are replicated too.

Typical use (what ``experiments/trainer.py`` does)::

    mesh = lolax.parallelism.make_mesh(config.mesh)
    graphdef, state, shardings = create_sharded(lambda: init_state(cfg, tx, seed), mesh)
    step = shard_step(make_train_step(graphdef, tx, donate=False), mesh, shardings)
    with jax.set_mesh(mesh):
        state, metrics = step(state, jax.device_put(batch, batch_sharding(mesh)))
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping, Sequence

import jax
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

LOGICAL_RULES: dict[str, tuple[str, ...] | str | None] = {
    "batch": ("data", "fsdp"),
    "sequence": "sequence",
    "embed": "fsdp",
    "vocab": "tensor",
    "heads": "tensor",
    "kv_heads": "tensor",
    "mlp": "tensor",
    "kv": None,
    "norm": None,
}
"""Logical axis name -> mesh axis (or tuple of axes, or None = replicated)."""

Rules = Mapping[str, "tuple[str, ...] | str | None"]


def _axes(entry) -> tuple[str, ...]:
    if entry is None:
        return ()
    return (entry,) if isinstance(entry, str) else tuple(entry)


def axes_for(mesh, logical: str, size: int, exclude: tuple[str, ...] = ()) -> tuple[str, ...]:
    """The mesh axes (of size > 1, not in ``exclude``) the table gives ``logical``, dropping trailing
    axes until their product divides ``size``: e.g. the batch axes a shard_map may split."""
    axes = tuple(a for a in _axes(LOGICAL_RULES.get(logical)) if mesh.shape.get(a, 1) > 1 and a not in exclude)
    while axes and size % math.prod(mesh.shape[a] for a in axes):
        axes = axes[:-1]
    return axes


def spec_entry(axes: tuple[str, ...]):
    """One PartitionSpec entry for ``axes``: None, an axis name, or a tuple of names."""
    return None if not axes else axes[0] if len(axes) == 1 else axes


def logical_to_mesh_axes(names: Sequence[str | None], rules: Rules | None = None) -> P:
    """``('embed', 'heads')`` -> ``P('fsdp', 'tensor')`` by the table (no shape checks)."""
    rules = LOGICAL_RULES if rules is None else rules
    out = []
    for name in names:
        axes = _axes(rules.get(name)) if name is not None else ()
        out.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return P(*out)


def mesh_spec(mesh: jax.sharding.Mesh, shape: Sequence[int], names: Sequence[str | None] | None,
              rules: Rules | None = None) -> P:
    """The PartitionSpec for an array of ``shape`` with logical ``names`` on ``mesh``.

    Per dimension keeps the table's mesh axes that exist in ``mesh``, are not already used by an
    earlier dimension and whose size product divides the dimension; else that dim is replicated.
    """
    if names is None:
        return P()
    rules = LOGICAL_RULES if rules is None else rules
    if len(names) != len(shape):
        raise ValueError(f"logical axis names {tuple(names)} do not match the array rank {len(shape)} "
                         f"(shape {tuple(shape)})")
    used: set[str] = set()
    out = []
    for dim, name in zip(shape, names):
        axes = tuple(a for a in (_axes(rules.get(name)) if name else ())
                     if mesh.shape.get(a, 1) > 1 and a not in used)
        # drop trailing axes until the product divides the dimension
        while axes and dim % math.prod(mesh.shape[a] for a in axes):
            axes = axes[:-1]
        if not axes:
            out.append(None)
            continue
        used.update(axes)
        out.append(axes[0] if len(axes) == 1 else axes)
    while out and out[-1] is None:
        out.pop()
    return P(*out)


def _is_variable(x) -> bool:
    return isinstance(x, nnx.Variable)


def _logical_names(leaf) -> tuple[str | None, ...] | None:
    if not _is_variable(leaf):
        return None
    meta = leaf.get_metadata()
    names = meta.get("out_sharding", None)
    if names is None:
        names = meta.get("sharding_names", None)
    return None if names is None else tuple(names)


def state_shardings(tree: Any, mesh: jax.sharding.Mesh, rules: Rules | None = None) -> Any:
    """NamedShardings for every array leaf of ``tree`` (same structure as ``tree``).

    ``tree`` may be concrete or abstract (``jax.eval_shape``); leaves inside ``nnx.Variable``s with
    logical names are sharded by the table, every other leaf (step counters, RNG keys, optimizer
    leaves without metadata) is replicated.  Optimizer states that mirror the parameters
    (``tree_map(zeros_like, params)``) keep the Variables and hence the parameters' shardings.
    """
    flat, _ = jax.tree_util.tree_flatten(tree, is_leaf=_is_variable)
    shardings = []
    for leaf in flat:
        names = _logical_names(leaf)
        arrays = jax.tree.leaves(leaf)
        for arr in arrays:
            shape = tuple(getattr(arr, "shape", ()))
            spec = mesh_spec(mesh, shape, names, rules) if names is not None and len(names) == len(shape) else P()
            shardings.append(NamedSharding(mesh, spec))
    return jax.tree.unflatten(jax.tree.structure(tree), shardings)


def logical_specs(tree: Any, mesh: jax.sharding.Mesh, rules: Rules | None = None) -> Any:
    """Like :func:`state_shardings` but PartitionSpecs (handy for printing and tests)."""
    return jax.tree.map(lambda s: s.spec, state_shardings(tree, mesh, rules))


def create_sharded(init_fn: Callable[[], tuple[Any, Any]], mesh: jax.sharding.Mesh,
                   rules: Rules | None = None) -> tuple[Any, Any, Any]:
    """Runs ``init_fn() -> (static, state)`` with ``state`` created already sharded.

    ``static`` is a non-array value returned alongside (e.g. an ``nnx.GraphDef``).  The state is
    first traced abstractly (``jax.eval_shape``: no memory), its shardings come from the table,
    and then ``init_fn`` runs under ``jax.jit(..., out_shardings=...)``: every device creates only
    its own shard, so no full-size copy exists on any device.  With JAX's partitionable threefry
    (the default) the values equal the unsharded init (up to float rounding
    between eager and jitted initializers).

    Returns ``(static, state, shardings)``.
    """
    box = {}

    def state_only():
        static, state = init_fn()
        box["static"] = static
        return state

    abstract = jax.eval_shape(state_only)
    shardings = state_shardings(abstract, mesh, rules)
    state = jax.jit(state_only, out_shardings=shardings)()
    return box["static"], state, shardings


def batch_spec(mesh: jax.sharding.Mesh, ndim: int = 2, rules: Rules | None = None) -> P:
    """``P(('data', 'fsdp'), 'sequence')`` (axes of size 1 dropped) for ``[B, T, ...]`` batches."""
    rules = LOGICAL_RULES if rules is None else rules
    out = []
    for name in ("batch", "sequence")[:ndim]:
        axes = tuple(a for a in _axes(rules.get(name)) if mesh.shape.get(a, 1) > 1)
        out.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    while out and out[-1] is None:
        out.pop()
    return P(*out)


def batch_sharding(mesh: jax.sharding.Mesh, ndim: int = 2, rules: Rules | None = None) -> NamedSharding:
    """NamedSharding of ``[B, T]`` token batches: batch over data+fsdp, tokens over sequence."""
    return NamedSharding(mesh, batch_spec(mesh, ndim, rules))


def check_batch_divisible(mesh: jax.sharding.Mesh, batch_size: int, seq_len: int | None = None) -> None:
    """Raises ValueError unless the batch (and sequence) sizes split evenly over the mesh."""
    n = mesh.shape.get("data", 1) * mesh.shape.get("fsdp", 1)
    if batch_size % n:
        raise ValueError(f"data.batch_size = {batch_size} must be divisible by data x fsdp = {n} "
                         f"devices (mesh {dict(mesh.shape)})")
    s = mesh.shape.get("sequence", 1)
    if seq_len is not None and seq_len % s:
        raise ValueError(f"data.seq_len = {seq_len} must be divisible by the sequence axis size {s}")


def shard_step(step: Callable, mesh: jax.sharding.Mesh, state_shardings_: Any,
               batch_sharding_: NamedSharding | None = None, *, donate: bool = True) -> Callable:
    """Jits ``step(state, batch) -> (state, metrics)`` with pinned in/out shardings.

    ``step`` may itself be jitted (it is inlined).  The state keeps ``state_shardings_`` in and out
    (so it can be donated); the batch takes ``batch_sharding_`` (default :func:`batch_sharding`);
    metrics come back replicated.  Call (and lower) the result under ``jax.set_mesh(mesh)``: the
    models read the mesh while they are traced, and when its ``sequence`` axis is larger than 1
    their mixers run sequence-parallel (LASP-2, ring / Ulysses / all-gather attention).
    """
    batch_sharding_ = batch_sharding(mesh) if batch_sharding_ is None else batch_sharding_
    return jax.jit(step, in_shardings=(state_shardings_, batch_sharding_),
                   out_shardings=(state_shardings_, NamedSharding(mesh, P())),
                   donate_argnums=(0,) if donate else ())
