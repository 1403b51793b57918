"""LISA: layerwise importance sampling, as an optax wrapper around any optimizer.

Every ``interval`` steps LISA samples ``num_active`` of the model's repeated layers uniformly
without replacement; until the next sample only they (plus every parameter outside the
repeated layers: embeddings, final norm, output head) are updated, and the other layers do not
move.  The wrapped optimizer holds state for what can be active at once and nothing else:

* the parameters outside the layers (``outer``) are one tree, with the inner optimizer's
  ordinary state;
* the layers' parameters are gathered into ``num_active`` *slots*: for every parameter path
  within a layer, the active layers' arrays stacked ``[num_active, ...]``.  The inner
  optimizer's state for the slots has that shape, so its memory is ``num_active / num_layers``
  of a full-model state.  At each resample the slot state starts afresh (the newly active
  layers have no history), as in LISA's reference recipe.

Layers are recognised by a path component ``layers`` followed by an integer index (the layout of
:class:`lolax.models.LanguageModel` and of NNX models) or named ``layers_<index>`` (Flax linen);
``layer_of`` overrides it.
Layers of one structure (the same parameter paths and shapes) form a group; a hybrid model has
one group per mixer kind, and each group gets ``num_active`` slots of its own.

>>> import jax, jax.numpy as jnp, optax
>>> from lolax import optim
>>> params = {"embed": jnp.ones((10, 4)), "layers": {i: {"w": jnp.ones((4, 4))} for i in range(4)}}
>>> tx = optim.lisa(optax.adam(1e-2), num_active=1, interval=5)
>>> state = tx.init(params)
>>> updates, state = tx.update(jax.tree.map(jnp.ones_like, params), state, params)
>>> sum(bool(jnp.any(updates["layers"][i]["w"] != 0)) for i in range(4))   # one layer moves
1
"""

from __future__ import annotations

import re
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from . import _core

LayerOf = Callable[[tuple], "tuple[int, tuple] | None"]


def default_layer_of(path: tuple) -> tuple[int, tuple] | None:
    """``(layer index, path within the layer)`` for a leaf under ``layers/<int>`` (NNX, Flax
    lists) or ``layers_<int>`` (Flax linen names), else None."""
    names = [_core_name(k) for k in path]
    for i, name in enumerate(names[:-1]):
        if name == "layers" and re.fullmatch(r"\d+", names[i + 1]):
            return int(names[i + 1]), tuple(names[i + 2:])
        numbered = re.fullmatch(r"layers_(\d+)", name)
        if numbered:
            return int(numbered.group(1)), tuple(names[i + 1:])
    return None


def _core_name(key) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


class LisaState(NamedTuple):
    count: jax.Array       # int32 steps taken
    key: jax.Array         # uint32 PRNG key data of the layer sampling
    active: Any            # per layer group, int32 [slots]: the layers updated until the next sample
    outer: Any             # inner optimizer state over the parameters outside the layers
    slots: Any             # inner optimizer state over the active layers' stacked parameters


class _Group(NamedTuple):
    layers: tuple[int, ...]                  # the layer indices of this structure
    leaf_ids: dict[str, tuple[int, ...]]     # path within a layer -> flat leaf index per layer


class _Layout(NamedTuple):
    treedef: Any
    outer_ids: tuple[int, ...]               # flat leaf indices outside the layers
    groups: tuple[_Group, ...]               # layers of one structure each (one group for uniform models)


def _layout(tree, layer_of: LayerOf) -> _Layout:
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
    outer, by_layer = [], {}
    for i, (path, leaf) in enumerate(flat):
        where = layer_of(path)
        if where is None:
            outer.append(i)
        else:
            by_layer.setdefault(where[0], {})["/".join(where[1])] = (i, tuple(getattr(leaf, "shape", ())))
    if not by_layer:
        raise ValueError("lisa found no repeated layers in the parameters (no path component 'layers' "
                         "followed by an integer index); pass layer_of= to say where the layers are")
    structures: dict[tuple, list[int]] = {}
    for layer in sorted(by_layer):
        signature = tuple(sorted((sub, shape) for sub, (_, shape) in by_layer[layer].items()))
        structures.setdefault(signature, []).append(layer)
    groups = tuple(_Group(tuple(layers), {sub: tuple(by_layer[j][sub][0] for j in layers) for sub, _ in signature})
                   for signature, layers in structures.items())
    return _Layout(treedef, tuple(outer), groups)


def _pick(arrays: list[jax.Array], index: jax.Array) -> jax.Array:
    """``arrays[index]`` for a traced ``index``, copying only the chosen array (no stack of all)."""
    return jax.lax.switch(index, [lambda a=a: a for a in arrays])


def _split(tree, layout: _Layout, active) -> tuple[list, list]:
    """``tree`` -> (leaves outside the layers, per group {path: the active layers' leaves stacked})."""
    leaves = layout.treedef.flatten_up_to(tree)
    outer = [leaves[i] for i in layout.outer_ids]
    slots = [{sub: jnp.stack([_pick([leaves[i] for i in ids], k) for k in idx]) for sub, ids in group.leaf_ids.items()}
             for group, idx in zip(layout.groups, active)]
    return outer, slots


def lisa(inner: optax.GradientTransformation, num_active: int = 2, interval: int = 50, seed: int = 0,
         layer_of: LayerOf = default_layer_of) -> optax.GradientTransformation:
    """Wraps ``inner`` so that only ``num_active`` sampled layers (resampled every ``interval``
    steps) and the parameters outside the layers are updated (see the module docstring).

    A model whose layers differ in structure (a hybrid of mixer kinds) has one group per
    structure, and ``num_active`` layers are sampled in each group (all of a smaller group).
    ``inner`` sees a compact tree, ``{"outer": leaves outside the layers, "slots": per group
    {path within a layer: [slots, ...]}}``, so any optax transformation works, weight decay
    included (it gets the matching parameters).
    """
    _core.check_int("num_active", num_active)
    _core.check_int("interval", interval)

    def compact(outer, slots):
        return {"outer": outer, "slots": slots}

    def slot_counts(layout):
        return [min(num_active, len(g.layers)) for g in layout.groups]

    def init_fn(params):
        layout = _layout(params, layer_of)
        total = sum(len(g.layers) for g in layout.groups)
        if num_active > max(len(g.layers) for g in layout.groups):
            raise ValueError(f"num_active = {num_active} exceeds the model's {total} layers"
                             + (f" (in groups of {[len(g.layers) for g in layout.groups]})"
                                if len(layout.groups) > 1 else ""))
        active = [jnp.arange(n, dtype=jnp.int32) for n in slot_counts(layout)]
        outer, slots = _split(params, layout, active)
        return LisaState(jnp.zeros([], jnp.int32), jax.random.key_data(jax.random.key(seed)), active,
                         inner.init(compact(outer, [])), inner.init(compact([], slots)))

    def update_fn(updates, state, params=None):
        layout = _layout(updates, layer_of)
        resample = state.count % interval == 0
        key = jax.random.fold_in(jax.random.wrap_key_data(state.key), state.count // interval)
        active = []
        for g, (group, n, old) in enumerate(zip(layout.groups, slot_counts(layout), state.active)):
            drawn = jax.random.choice(jax.random.fold_in(key, g), len(group.layers), (n,), replace=False)
            active.append(jnp.where(resample, jnp.sort(drawn).astype(jnp.int32), old))

        g_outer, g_slots = _split(updates, layout, active)
        p_outer, p_slots = (None, None) if params is None else _split(params, layout, active)
        fresh = inner.init(compact([], g_slots))
        slot_state = jax.tree.map(lambda new, old: jnp.where(resample, new, old), fresh, state.slots)
        u_outer, outer_state = inner.update(compact(g_outer, []), state.outer,
                                            None if params is None else compact(p_outer, []))
        u_slots, slot_state = inner.update(compact([], g_slots), slot_state,
                                           None if params is None else compact([], p_slots))

        leaves = [jnp.zeros_like(x) for x in layout.treedef.flatten_up_to(updates)]
        for i, u in zip(layout.outer_ids, u_outer["outer"]):
            leaves[i] = u
        for group, idx, u_group in zip(layout.groups, active, u_slots["slots"]):
            for j in range(len(group.layers)):
                hit = idx == j                     # is layer j in a slot, and in which
                slot = jnp.argmax(hit)
                for sub, ids in group.leaf_ids.items():
                    u = jax.lax.dynamic_index_in_dim(u_group[sub], slot, keepdims=False)
                    leaves[ids[j]] = jnp.where(jnp.any(hit), u, 0).astype(leaves[ids[j]].dtype)
        new_state = LisaState(optax.safe_int32_increment(state.count), state.key, active, outer_state, slot_state)
        return layout.treedef.unflatten(leaves), new_state

    return optax.GradientTransformation(init_fn, update_fn)


def lisa_adamw(learning_rate: optax.ScalarOrSchedule, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
               weight_decay: float = 1e-4, *, num_active: int = 2, interval: int = 50,
               seed: int = 0) -> optax.GradientTransformation:
    """:func:`lisa` around ``optax.adamw`` (``--config.optim.name=lisa_adamw``)."""
    return lisa(optax.adamw(learning_rate, b1, b2, eps, weight_decay=weight_decay), num_active, interval, seed)
