"""LISA: layerwise importance sampling, as an optax wrapper around any optimizer.

Every ``interval`` steps LISA samples ``num_active`` of the model's repeated layers without
replacement (uniformly by default, or with given per-layer probabilities); until the next sample
only they (plus every parameter outside the repeated layers: embeddings, final norm, output head)
are updated, and the other layers do not move.  The wrapped optimizer holds state for what can be
active at once and nothing else:

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

Two options turn the wrapper into the base of other layer-sampling methods (OwLore,
:mod:`optim.owlore`): ``probabilities`` (a function of the parameters giving each layer's
sampling weight) and ``per_slot=True`` (the inner optimizer runs on every slot separately, so a
matrix-shaped transformation such as GaLore sees one layer's ``[m, n]`` matrices).

>>> import jax, jax.numpy as jnp, optax
>>> from lolax import optim
>>> params = {"embed": jnp.ones((10, 4)), "layers": {i: {"w": jnp.ones((4, 4))} for i in range(4)}}
>>> tx = optim.lisa(optax.adam(1e-2), num_active=1, interval=5)
>>> state = tx.init(params)
>>> updates, state = tx.update(jax.tree.map(jnp.ones_like, params), state, params)
>>> sum(bool(jnp.any(updates["layers"][i]["w"] != 0)) for i in range(4))   # one layer moves
1
>>> weighted = optim.lisa(optax.adam(1e-2), num_active=1, probabilities=lambda p: [0.0, 1.0, 3.0, 0.0])
>>> weighted.init(params).probabilities[0]                  # per group, normalised; layers 0, 3 never drawn
Array([0.  , 0.25, 0.75, 0.  ], dtype=float32)
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from . import _core

LayerOf = Callable[[tuple], "tuple[int, tuple] | None"]
Probabilities = Callable[[Any], Any]


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
                           # (per_slot=True: a list with one state per group, every leaf [slots, ...])
    probabilities: Any     # per layer group, float32 [layers in group]: the sampling probabilities


class _Group(NamedTuple):
    layers: tuple[int, ...]                  # the layer indices of this structure
    leaf_ids: tuple[tuple[int, ...], ...]    # per path within a layer (treedef order): flat leaf index per layer
    treedef: Any                             # one layer's parameters as nested dicts keyed by path component


class _Layout(NamedTuple):
    treedef: Any
    outer_ids: tuple[int, ...]               # flat leaf indices outside the layers (outer_treedef order)
    outer_treedef: Any                       # those leaves as nested dicts keyed by path component
    groups: tuple[_Group, ...]               # layers of one structure each (one group for uniform models)


def _nested_treedef(paths: list[tuple]) -> tuple[Any, list[int]]:
    """The treedef of nested dicts holding one leaf at each path, and the order of ``paths`` in
    its leaves."""
    if paths == [()]:                        # the layer is a single array
        return jax.tree_util.tree_structure(0), [0]
    tree: dict = {}
    for i, path in enumerate(paths):
        node = tree
        for name in path[:-1]:
            node = node.setdefault(name, {})
        node[path[-1]] = i
    order, treedef = jax.tree_util.tree_flatten(tree)
    return treedef, order


def _layout(tree, layer_of: LayerOf) -> _Layout:
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
    outer, outer_paths, by_layer = [], [], {}
    for i, (path, leaf) in enumerate(flat):
        where = layer_of(path)
        if where is None:
            outer.append(i)
            outer_paths.append(tuple(_core_name(k) for k in path))
        else:
            by_layer.setdefault(where[0], {})[tuple(where[1])] = (i, tuple(getattr(leaf, "shape", ())))
    if not by_layer:
        raise ValueError("lisa found no repeated layers in the parameters (no path component 'layers' "
                         "followed by an integer index); pass layer_of= to say where the layers are")
    structures: dict[tuple, list[int]] = {}
    for layer in sorted(by_layer):
        signature = tuple(sorted((sub, shape) for sub, (_, shape) in by_layer[layer].items()))
        structures.setdefault(signature, []).append(layer)
    groups = []
    for signature, layers in structures.items():
        paths = [sub for sub, _ in signature]
        group_def, order = _nested_treedef(paths)
        ids = tuple(tuple(by_layer[j][paths[k]][0] for j in layers) for k in order)
        groups.append(_Group(tuple(layers), ids, group_def))
    outer_def, order = _nested_treedef(outer_paths) if outer_paths else (jax.tree_util.tree_structure({}), [])
    return _Layout(treedef, tuple(outer[k] for k in order), outer_def, tuple(groups))


def _pick(arrays: list[jax.Array], index: jax.Array) -> jax.Array:
    """``arrays[index]`` for a traced ``index``, copying only the chosen array (no stack of all)."""
    return jax.lax.switch(index, [lambda a=a: a for a in arrays])


def _split(tree, layout: _Layout, active) -> tuple[list, list]:
    """``tree`` -> (leaves outside the layers, per group one layer's tree of the active layers'
    leaves stacked ``[slots, ...]``)."""
    leaves = layout.treedef.flatten_up_to(tree)
    outer = layout.outer_treedef.unflatten([leaves[i] for i in layout.outer_ids])
    slots = [group.treedef.unflatten([jnp.stack([_pick([leaves[i] for i in ids], k) for k in idx])
                                      for ids in group.leaf_ids])
             for group, idx in zip(layout.groups, active)]
    return outer, slots


def _concrete(x) -> np.ndarray | None:
    """``x`` as a NumPy array, or None while it is traced (``jax.jit``, ``jax.eval_shape``)."""
    try:
        return np.asarray(x, dtype=np.float64)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return None


def _group_probabilities(probabilities: Probabilities | None, params, layout: _Layout,
                         counts: list[int]) -> list[jax.Array]:
    """Per group, float32 ``[layers in group]``: the normalised sampling probabilities."""
    if probabilities is None:
        return [jnp.full((len(g.layers),), 1.0 / len(g.layers), jnp.float32) for g in layout.groups]
    weights = probabilities(params)
    layers = sorted(j for g in layout.groups for j in g.layers)
    if isinstance(weights, Mapping):
        missing = [j for j in layers if j not in weights]
        if missing:
            raise ValueError(f"probabilities(params) gave weights for the layers {sorted(weights)}; expected one "
                             f"for every layer {layers} (missing {missing})")
        per_layer = lambda j: weights[j]
    else:
        weights = jnp.asarray(weights, jnp.float32)
        if weights.ndim != 1 or weights.shape[0] <= layers[-1]:
            raise ValueError(f"probabilities(params) gave weights of shape {tuple(weights.shape)}; expected a "
                             f"1-D array with an entry per layer index, shape ({layers[-1] + 1},)")
        per_layer = lambda j: weights[j]
    out = []
    for group, n in zip(layout.groups, counts):
        w = jnp.stack([jnp.asarray(per_layer(j), jnp.float32).reshape(()) for j in group.layers])
        known = _concrete(w)
        if known is not None and (not np.all(np.isfinite(known)) or np.any(known < 0)
                                  or np.count_nonzero(known > 0) < n):
            raise ValueError(f"probabilities(params) gave the weights {known.tolist()} to the layers "
                             f"{list(group.layers)}; expected finite weights >= 0, at least {n} of them "
                             f"positive (num_active layers are drawn without replacement)")
        out.append(w / jnp.sum(w))
    return out


def _update_per_slot(inner: optax.GradientTransformation, grads, state, params):
    """``inner.update`` on every slot of one group separately (``jax.vmap`` over the slot axis).

    Integer scalars of the slots' state (step counters) are equal across the slots, which start
    and step together; they go in unbatched so that a ``lax.cond`` on them (GaLore's projector
    refresh) stays a branch instead of running both sides on every step.  An inner optimizer
    whose integer scalars depend on a slot's values is run fully batched instead.
    """
    wrap = lambda tree: None if tree is None else {"outer": {}, "slots": [tree]}
    one = lambda g, s, p: inner.update(wrap(g), s, wrap(p))
    slots = jax.tree.leaves(grads)[0].shape[0]
    counter = jax.tree.map(lambda x: x.ndim == 1 and jnp.issubdtype(x.dtype, jnp.integer), state)
    axes = jax.tree.map(lambda c: None if c else 0, counter)
    try:
        updates, new = jax.vmap(one, in_axes=(0, axes, 0), out_axes=(0, axes))(
            grads, jax.tree.map(lambda x, c: x[0] if c else x, state, counter), params)
    except ValueError as e:
        if "output was batched" not in str(e):
            raise
        updates, new = jax.vmap(one)(grads, state, params)
    else:
        new = jax.tree.map(lambda x, c: jnp.broadcast_to(x, (slots,) + x.shape) if c else x, new, counter)
    return updates["slots"][0], new


def lisa(inner: optax.GradientTransformation, num_active: int = 2, interval: int = 50, seed: int = 0,
         layer_of: LayerOf = default_layer_of, *, probabilities: Probabilities | None = None,
         per_slot: bool = False) -> optax.GradientTransformation:
    """Wraps ``inner`` so that only ``num_active`` sampled layers (resampled every ``interval``
    steps) and the parameters outside the layers are updated (see the module docstring).

    A model whose layers differ in structure (a hybrid of mixer kinds) has one group per
    structure, and ``num_active`` layers are sampled in each group (all of a smaller group).
    ``inner`` sees a compact tree, ``{"outer": the parameters outside the layers, "slots": [per
    group, one layer's parameter tree with every leaf [slots, ...]]}`` (both as nested dicts
    keyed by the original path components), so any optax transformation works, weight decay
    included (it gets the matching parameters), and path-based masks see the names
    (``embed/embedding``, and ``attn/q_proj/kernel`` inside a layer).

    ``probabilities``: None (uniform sampling) or a function ``params -> weights``, called once
    at ``init``; the weights are a 1-D array with an entry per layer index (entry ``l`` for the
    layer ``layers/l``) or a dict ``{layer index: weight}``.  Within each group they are
    normalised to the probabilities ``p`` kept in the state, and each resample draws
    ``num_active`` layers one after another without replacement, each draw proportional to ``p``
    among the layers not yet drawn (``jax.random.choice(..., replace=False, p=p)``).  So with
    ``num_active = 1`` layer ``l`` is active with probability ``p_l``, and a layer of weight 0 is
    never drawn.  The weights must be finite and >= 0 with at least ``num_active`` positive per
    group (checked when ``init`` runs outside ``jax.jit``; a ``ValueError`` otherwise).

    ``per_slot``: if True, the inner optimizer runs on each slot separately (``jax.vmap`` over
    the slot axis, one call per group, on ``{"outer": {}, "slots": [that group's layer tree]}``),
    so a transformation that treats every leaf as one matrix (GaLore) sees a layer's own
    ``[m, n]`` matrices instead of the stacked ``[slots, m, n]``; the slots' state (every leaf
    with a leading slot axis) still starts afresh at each resample.  For an elementwise inner
    optimizer (Adam) it changes nothing.  The outer parameters always get the plain ``inner``.
    """
    _core.check_int("num_active", num_active)
    _core.check_int("interval", interval)
    if probabilities is not None and not callable(probabilities):
        raise ValueError(f"probabilities={probabilities!r}; expected None (uniform sampling) or a function "
                         "params -> one weight per layer")
    if not isinstance(per_slot, bool):
        raise ValueError(f"per_slot={per_slot!r}; expected True or False")

    def compact(outer, slots):
        return {"outer": outer, "slots": slots}

    def slot_counts(layout):
        return [min(num_active, len(g.layers)) for g in layout.groups]

    def slots_init(slots):
        if not per_slot:
            return inner.init(compact({}, slots))
        return [jax.vmap(lambda t: inner.init(compact({}, [t])))(tree) for tree in slots]

    def slots_update(grads, state, params):
        if not per_slot:
            u, state = inner.update(compact({}, grads), state, None if params is None else compact({}, params))
            return u["slots"], state
        out = [_update_per_slot(inner, g, s, None if params is None else p)
               for g, s, p in zip(grads, state, params or [None] * len(grads))]
        return [u for u, _ in out], [s for _, s in out]

    def init_fn(params):
        layout = _layout(params, layer_of)
        total = sum(len(g.layers) for g in layout.groups)
        if num_active > max(len(g.layers) for g in layout.groups):
            raise ValueError(f"num_active = {num_active} exceeds the model's {total} layers"
                             + (f" (in groups of {[len(g.layers) for g in layout.groups]})"
                                if len(layout.groups) > 1 else ""))
        probs = _group_probabilities(probabilities, params, layout, slot_counts(layout))
        active = [jnp.arange(n, dtype=jnp.int32) for n in slot_counts(layout)]
        outer, slots = _split(params, layout, active)
        return LisaState(jnp.zeros([], jnp.int32), jax.random.key_data(jax.random.key(seed)), active,
                         inner.init(compact(outer, [])), slots_init(slots), probs)

    def update_fn(updates, state, params=None):
        layout = _layout(updates, layer_of)
        resample = state.count % interval == 0
        key = jax.random.fold_in(jax.random.wrap_key_data(state.key), state.count // interval)
        active = []
        for g, (group, n, old) in enumerate(zip(layout.groups, slot_counts(layout), state.active)):
            p = None if probabilities is None else state.probabilities[g]
            drawn = jax.random.choice(jax.random.fold_in(key, g), len(group.layers), (n,), replace=False, p=p)
            active.append(jnp.where(resample, jnp.sort(drawn).astype(jnp.int32), old))

        g_outer, g_slots = _split(updates, layout, active)
        p_outer, p_slots = (None, None) if params is None else _split(params, layout, active)
        fresh = slots_init(g_slots)
        slot_state = jax.tree.map(lambda new, old: jnp.where(resample, new, old), fresh, state.slots)
        u_outer, outer_state = inner.update(compact(g_outer, []), state.outer,
                                            None if params is None else compact(p_outer, []))
        u_slots, slot_state = slots_update(g_slots, slot_state, p_slots)

        leaves = [jnp.zeros_like(x) for x in layout.treedef.flatten_up_to(updates)]
        for i, u in zip(layout.outer_ids, layout.outer_treedef.flatten_up_to(u_outer["outer"])):
            leaves[i] = u
        for group, idx, u_group in zip(layout.groups, active, u_slots):
            u_leaves = group.treedef.flatten_up_to(u_group)
            for j in range(len(group.layers)):
                hit = idx == j                     # is layer j in a slot, and in which
                slot = jnp.argmax(hit)
                for u_path, ids in zip(u_leaves, group.leaf_ids):
                    u = jax.lax.dynamic_index_in_dim(u_path, slot, keepdims=False)
                    leaves[ids[j]] = jnp.where(jnp.any(hit), u, 0).astype(leaves[ids[j]].dtype)
        new_state = LisaState(optax.safe_int32_increment(state.count), state.key, active, outer_state, slot_state,
                              state.probabilities)
        return layout.treedef.unflatten(leaves), new_state

    return optax.GradientTransformation(init_fn, update_fn)


def compact_weight_decay_mask(embeddings: bool = True) -> Callable[[Any], Any]:
    """:func:`optim.masking.default_weight_decay_mask` for the compact tree an inner optimizer of
    :func:`lisa` sees (the slots' leading axis does not count as a dimension)."""
    from .masking import default_weight_decay_mask

    def mask(compact):
        return {"outer": default_weight_decay_mask(compact["outer"], embeddings=embeddings),
                "slots": default_weight_decay_mask(compact["slots"], embeddings=embeddings, leading_axes=1)}
    return mask


def lisa_adamw(learning_rate: optax.ScalarOrSchedule, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
               weight_decay: float = 1e-4, mask: Any = None, *, num_active: int = 2, interval: int = 50,
               seed: int = 0) -> optax.GradientTransformation:
    """:func:`lisa` around ``optax.adamw`` (``--config.optim.name=lisa_adamw``).  ``mask`` is
    AdamW's weight-decay mask over the compact tree (``{"outer": ..., "slots": [...]}``, see
    :func:`lisa`); :func:`compact_weight_decay_mask` gives the default rule for it."""
    _core.check_float("learning_rate", learning_rate, lo=0.0)
    _core.check_float("weight_decay", weight_decay, lo=0.0)
    return lisa(optax.adamw(learning_rate, b1, b2, eps, weight_decay=weight_decay, mask=mask), num_active, interval,
                seed)
