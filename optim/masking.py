"""Which parameters are projected (low-rank) and which get plain Adam (the ``'adam'`` branch).

Default rule (:func:`default_projection_mask`): a leaf is projected iff

1. ``ndim >= 2``, and
2. some component of its key path *names a block* — equals (case-insensitive)
   one of ``attn, attention, mixer, mlp, ffn``, or has one of those as an
   ``_``-separated token (``self_attn``, ``block_sparse_moe_mlp``), and
3. no component marks it as an embedding, norm, short convolution, bias or
   head (a component containing ``embed``, ``norm`` or ``conv``, or with a
   token in ``{bias, head, lm_head, wte, wpe, ln}``).

In the optimizer aliases, ``projection_mask=None`` additionally sends the
matrices too small for the rank (``min(m, n) < rank``, e.g. a GDN
``attn/b_proj`` of shape ``(d, heads)``) to the ``'adam'`` branch; if that
leaves no matrix at all while the rule matched some, it raises ``ValueError``.
An explicit mask is used as given (a too-large rank then raises at ``init``,
naming the leaf).

So ``layers/0/attn/q_proj/kernel`` or ``mlp/down_proj/kernel`` are projected;
``embed/embedding``, ``norm/scale``, ``lm_head/kernel``, ``attn/q_proj/bias``
and 1-D gates are not. Override with ``projection_mask=`` (a pytree of bools
or a function ``params -> pytree of bools``) in any optimizer.

Example:
  >>> import jax.numpy as jnp
  >>> from lolax.optim.masking import default_projection_mask
  >>> p = {'attn': {'q_proj': {'kernel': jnp.ones((4, 4))}},
  ...      'lm_head': {'kernel': jnp.ones((4, 9))}}
  >>> default_projection_mask(p)
  {'attn': {'q_proj': {'kernel': True}}, 'lm_head': {'kernel': False}}
"""

from __future__ import annotations

import re
from typing import Any, Callable, Union

import jax

BLOCK_NAMES = frozenset({"attn", "attention", "mixer", "mlp", "ffn"})
EXCLUDE_SUBSTRINGS = ("embed", "norm", "conv")
EXCLUDE_TOKENS = frozenset({"bias", "head", "lm_head", "wte", "wpe", "ln"})

MaskOrFn = Union[None, Any, Callable[[Any], Any]]

LOWRANK = "lowrank"
ADAM = "adam"


def _key_name(k) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def path_names(path) -> list[str]:
    """Lower-case string names of the components of a ``jax.tree_util`` key path."""
    return [_key_name(k).lower() for k in path]


def _tokens(name: str) -> set[str]:
    return set(t for t in re.split(r"[_.\-]", name) if t)


def is_projected_path(names: list[str], ndim: int) -> bool:
    """The default rule applied to one leaf (``names`` from :func:`path_names`)."""
    if ndim < 2:
        return False
    in_block = any(n in BLOCK_NAMES or (_tokens(n) & BLOCK_NAMES) for n in names)
    excluded = any(
        any(s in n for s in EXCLUDE_SUBSTRINGS) or n in EXCLUDE_TOKENS
        or (_tokens(n) & EXCLUDE_TOKENS) for n in names)
    return in_block and not excluded


def default_projection_mask(params: Any) -> Any:
    """Pytree of bools: ``True`` for attention/MLP projection kernels (see module doc)."""
    return jax.tree_util.tree_map_with_path(
        lambda path, x: is_projected_path(path_names(path), len(getattr(x, "shape", ()))),
        params)


# --------------------------------------------------------------------------- weight decay
NO_DECAY_NAMES = frozenset({"a_log", "dt_bias", "d", "window_factor", "magnitude", "decay", "gate_bias"})
DECAY_VECTORS = frozenset({"sparse_values"})
EMBEDDING_NAMES = frozenset({"wte", "wpe"})


def _is_embedding(names: list[str]) -> bool:
    return any("embed" in n or n in EMBEDDING_NAMES for n in names)


def is_decayed_path(names: list[str], ndim: int, embeddings: bool = True) -> bool:
    """The weight-decay rule applied to one leaf (``names`` from :func:`path_names`, ``ndim``
    without any stacking axis); see :func:`default_weight_decay_mask`."""
    names = [n for n in names if n != "value"]
    if any("norm" in n for n in names) or any("bias" in _tokens(n) for n in names):
        return False
    if names and names[-1] in NO_DECAY_NAMES:
        return False
    if _is_embedding(names):
        return embeddings
    return ndim >= 2 or (bool(names) and names[-1] in DECAY_VECTORS)


def default_weight_decay_mask(params: Any = None, *, embeddings: bool = True, leading_axes: int = 0):
    """Pytree of bools, ``True`` where decoupled weight decay applies: the weight matrices
    (projections, feature maps, short convolutions, routers, SLTrain's sparse values, adapter
    factors) and, unless ``embeddings=False``, the token embeddings (a tied output head is the
    same array).  Never decayed: norm scales (any path component containing ``norm``), biases,
    the decay and gate parameters of the recurrent mixers (``A_log``, ``dt_bias``, ``D``) and
    other per-channel gains (``window_factor``, DoRA's ``magnitude``).  ``leading_axes`` is the
    number of stacking axes in front of every leaf (LISA's slots), which do not count towards
    ``ndim``; leaves under a path component ``stack`` (lolax's scanned layers,
    ``model.scan_layers``) have one more.

    With ``params=None`` it returns the function ``params -> mask`` (optax's ``mask=`` takes
    either).

    >>> import jax.numpy as jnp
    >>> p = {"embed": {"embedding": jnp.ones((9, 4))}, "attn": {"A_log": jnp.ones(2),
    ...      "q_proj": {"kernel": jnp.ones((4, 4)), "bias": jnp.ones(4)}}, "norm": {"scale": jnp.ones(4)}}
    >>> m = default_weight_decay_mask(p, embeddings=False)
    >>> m["attn"]["q_proj"], m["attn"]["A_log"], m["embed"]["embedding"], m["norm"]["scale"]
    ({'bias': False, 'kernel': True}, False, False, False)
    """
    if params is None:
        return lambda tree: default_weight_decay_mask(tree, embeddings=embeddings, leading_axes=leading_axes)
    def rule(path, x):
        names = path_names(path)
        stacked = leading_axes + ("stack" in names)
        return is_decayed_path(names, len(getattr(x, "shape", ())) - stacked, embeddings)
    return jax.tree_util.tree_map_with_path(rule, params)


def resolve_mask(mask: MaskOrFn, params: Any) -> Any:
    """``None`` -> default rule; callable -> called on ``params``; else returned as is."""
    if mask is None:
        return default_projection_mask(params)
    if callable(mask):
        return mask(params)
    return mask


def _min_dim(x, dims) -> int:
    from . import projection
    d = dims if (dims is None or isinstance(dims, projection.MatrixDims)) else None
    v = projection.matrix_view(x.shape, d)
    return min(v.m, v.n)


def labels_fn(mask: MaskOrFn, min_rank: int | None = None, dims=None) -> Callable[[Any], Any]:
    """Label function for ``optax.partition``: ``'lowrank'`` / ``'adam'`` per leaf.

    With ``mask=None`` and ``min_rank``, default-rule matrices whose matrix view
    has ``min(m, n) < min_rank`` are labelled ``'adam'``.
    """

    def fn(params):
        m = resolve_mask(mask, params)
        if mask is None and min_rank is not None:
            matched = sum(bool(b) for b in jax.tree.leaves(m))
            m = jax.tree.map(lambda b, x: bool(b) and _min_dim(x, dims) >= min_rank, m, params)
            if matched and not any(jax.tree.leaves(m)):
                raise ValueError(
                    f"rank={min_rank} is larger than every matrix the default projection rule "
                    f"selected ({matched} leaves); expected rank <= the smallest dimension of "
                    "the attention/MLP kernels (or pass projection_mask=...)")
        return jax.tree.map(lambda b: LOWRANK if b else ADAM, m)

    return fn
