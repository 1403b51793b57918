"""OwLore: outlier-weighted layerwise sampling with low-rank (GaLore) training of the sampled
layers (Li, Yin, Gao and Liu, 2024), as an optax transformation.

Like :func:`optim.lisa`, every ``interval`` steps OwLore picks ``num_active`` of the model's
repeated layers to train until the next pick, while every parameter outside the layers
(embeddings, final norm, output head) trains on every step.  Two things differ:

* **Which layers.**  Layer ``l`` is drawn with probability ``p_l = D_l / Σ_k D_k``, where
  ``D_l`` is the layer's *outlier ratio* (:func:`outlier_ratios`): give every entry of the
  layer's 2-D weight matrices a score, ``|W_ij|`` (weights only) or ``|W_ij| · ‖X_j‖`` (the
  Wanda score, with ``‖X_j‖`` the norm of input feature ``j`` over some calibration tokens);
  ``D_l`` is the fraction of the layer's entries whose score exceeds ``tau`` times the mean
  score over all of the layer's entries.  Layers full of outliers are taken to hold more of the
  pre-trained knowledge and are fine-tuned more often.  The ratios are computed once, at
  ``init``, from the parameters it is given (the pre-trained weights).
* **How they train.**  The active layers get GaLore (:func:`optim.galore`: Adam on a rank-``r``
  projection of each attention/MLP matrix's gradient) instead of full Adam, each layer on its
  own ``[m, n]`` matrices (``lisa(..., per_slot=True)``); their 1-D parameters and the
  parameters outside the layers get GaLore's plain-Adam branch.

With ``num_active > 1`` the layers of one pick are drawn one after another without replacement,
each draw proportional to ``p`` among the layers not drawn yet (as ``numpy.random.choice`` and
the authors' code do), so a layer's chance to be in a pick is not exactly ``num_active · p_l``.

Defaults, and where they come from: ``num_active = 5``, ``interval = 50``, GaLore rank ``256``,
``update_proj_gap = 100`` and ``scale = 1.0`` are the values of the authors' released
fine-tuning scripts.  ``tau = 13`` is our reading of that code (it loads precomputed LLaMA-2
layer ratios labelled 13); treat it as our choice.  ``weight_decay = 0.0`` (the Hugging Face
trainer's default that code runs with) and ``eps = 1e-6`` (GaLore's) are ours too.  The slots'
state starts afresh at every resample, as in :func:`optim.lisa` (the authors' PyTorch
optimizer keeps a layer's state between its active periods, at the memory cost of a state for
every layer that was ever active).

Memory: GaLore's low-rank moments and projectors for ``num_active`` layers, plus Adam for the
parameters outside the layers, so about ``num_active / num_layers`` of GaLore's layer state.

Example (``tau`` lowered for a toy model whose planted outliers are the only ones):
  >>> import jax, jax.numpy as jnp, optax
  >>> from lolax import optim
  >>> w = jax.random.normal(jax.random.key(0), (4, 16, 16))
  >>> w = w.at[1, 0, :4].set(40.0).at[2, :3, :4].set(40.0)      # 4 and 12 outliers
  >>> params = {"embed": jnp.ones((32, 16)),
  ...           "layers": {i: {"mlp": {"up_proj": {"kernel": w[i]}}} for i in range(4)}}
  >>> optim.outlier_ratios(params, tau=6.0) * 256               # outliers per layer
  Array([ 0.,  4., 12.,  0.], dtype=float32)
  >>> tx = optim.owlore(1e-2, num_active=1, rank=4, tau=6.0)
  >>> state = tx.init(params)
  >>> state.probabilities[0]                                    # layers 1 and 2 only, 1 : 3
  Array([0.  , 0.25, 0.75, 0.  ], dtype=float32)
  >>> lowrank = state.slots[0][0].inner_states["lowrank"].inner_state
  >>> lowrank.mu["slots"][0]["mlp"]["up_proj"]["kernel"].shape  # [slots, 16, rank]
  (1, 16, 4)
  >>> updates, state = tx.update(jax.tree.map(jnp.ones_like, params), state, params)
  >>> [i for i in range(4) if jnp.any(updates["layers"][i]["mlp"]["up_proj"]["kernel"] != 0)] in ([1], [2])
  True
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from . import _core
from .galore import galore
from .lisa import LayerOf, _concrete, _core_name, default_layer_of, lisa


def _names(path) -> tuple[str, ...]:
    names = tuple(_core_name(k) for k in path)
    return names[:-1] if names and names[-1] == "value" else names    # nnx.State's leaves end in .value


def _check_tau_axis(tau, input_axis) -> None:
    _core.check_float("tau", tau, lo=0.0, lo_open=True)
    if not isinstance(input_axis, int) or isinstance(input_axis, bool) or input_axis not in (0, 1):
        raise ValueError(f"input_axis={input_axis!r}; expected the Python int 0 (kernels [in, out], as Flax and "
                         "lolax store them) or 1 (weights [out, in], as PyTorch stores them); under "
                         "optax.inject_hyperparams pass it in static_args")


def outlier_ratios(params: Any, tau: float = 13.0, activation_norms: Any = None,
                   layer_of: LayerOf = default_layer_of, input_axis: int = 0) -> jax.Array:
    """Per layer, the fraction of its weight entries whose score exceeds ``tau`` times the
    layer's mean score: float32 ``[L]``, entry ``l`` for the layer ``layers/l`` (``L`` = the
    largest layer index + 1; an index that names no layer gets 0).

    Only the 2-D leaves inside the layers count (the attention/MLP matrices; not norms, biases,
    or the embeddings and head outside the layers), all of a layer's matrices pooled into one
    mean.  The score of entry ``W_ij`` is ``|W_ij|``, or with ``activation_norms``
    ``|W_ij| · n_j``, where ``n_j`` is the norm of the matrix's input feature ``j`` (the Wanda
    score).  ``activation_norms`` is a pytree with, at the path of each counted matrix (the same
    keys as in ``params``; a trailing ``.value`` of an ``nnx.State`` may be left out), a 1-D array
    ``[d_in]`` such as ``sqrt(Σ_tokens x_j²)`` over calibration inputs; ``input_axis`` says which
    axis of the matrix is ``d_in``: 0 for ``[in, out]`` kernels (Flax, lolax), 1 for ``[out, in]``
    weights (PyTorch).  Scores are computed one matrix at a time (two passes: the mean, then the
    count), so the memory is that of the largest matrix.

    >>> import jax.numpy as jnp
    >>> from lolax import optim
    >>> w = jnp.ones((4, 4)).at[0, 0].set(9.0)          # mean |w| = 1.5; one entry above 4 × 1.5
    >>> params = {"layers": {0: {"attn": {"q": w}}, 1: {"attn": {"q": jnp.ones((4, 4))}}}}
    >>> optim.outlier_ratios(params, tau=4.0)
    Array([0.0625, 0.    ], dtype=float32)
    >>> norms = {"layers": {i: {"attn": {"q": jnp.array([0.1, 1.0, 1.0, 1.0])}} for i in (0, 1)}}
    >>> optim.outlier_ratios(params, tau=4.0, activation_norms=norms)   # row 0 now weighs 0.1
    Array([0., 0.], dtype=float32)
    """
    _check_tau_axis(tau, input_axis)
    norms = None
    if activation_norms is not None:
        norms = {_names(p): x for p, x in jax.tree_util.tree_flatten_with_path(activation_norms)[0]}
    layers: dict[int, list] = {}
    for path, w in jax.tree_util.tree_flatten_with_path(params)[0]:
        where = layer_of(path)
        if where is None:
            continue
        matrices = layers.setdefault(where[0], [])
        if np.ndim(w) != 2:
            continue
        scale = None
        if norms is not None:
            name = _names(path)
            if name not in norms:
                raise ValueError(f"activation_norms has no entry for the weight {'/'.join(name)}; expected a 1-D "
                                 f"array [{w.shape[input_axis]}] at that path for every 2-D weight in the layers")
            n = jnp.asarray(norms[name], jnp.float32)
            if n.shape != (w.shape[input_axis],):
                raise ValueError(f"activation_norms[{'/'.join(name)}] has shape {tuple(n.shape)}; expected "
                                 f"({w.shape[input_axis]},), the length of axis input_axis={input_axis} of the "
                                 f"weight {tuple(w.shape)}")
            scale = n[:, None] if input_axis == 0 else n[None, :]
        matrices.append((w, scale))
    if not layers:
        raise ValueError("outlier_ratios found no repeated layers in the parameters (no path component 'layers' "
                         "followed by an integer index); pass layer_of= to say where the layers are")
    empty = sorted(j for j, m in layers.items() if not m)
    if empty:
        raise ValueError(f"outlier_ratios found no 2-D weight matrix in the layers {empty}, so they have no "
                         "outlier ratio; expected attention/MLP matrices in every layer")

    def score(w, scale):
        s = jnp.abs(jnp.asarray(w, jnp.float32))
        return s if scale is None else s * scale

    ratios = jnp.zeros((max(layers) + 1,), jnp.float32)
    for j, matrices in layers.items():
        size = sum(int(np.size(w)) for w, _ in matrices)
        mean = sum(jnp.sum(score(w, s)) for w, s in matrices) / size
        above = sum(jnp.sum(score(w, s) > tau * mean, dtype=jnp.int32) for w, s in matrices)
        ratios = ratios.at[j].set(above / size)
    return ratios


def owlore(learning_rate: optax.ScalarOrSchedule, *, num_active: int = 5, interval: int = 50, rank: int = 256,
           update_proj_gap: int = 100, scale: float = 1.0, tau: float = 13.0, activation_norms: Any = None,
           input_axis: int = 0, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-6,
           weight_decay: float = 0.0, seed: int = 0, layer_of: LayerOf = default_layer_of,
           proj_side: str = "std", svd_method: str = "subspace", moment_policy: str = "keep", eps_mode: str = "hf",
           moments_8bit: bool = False, projection_mask: Any = None,
           weight_decay_mask: Any = None) -> optax.GradientTransformation:
    """OwLore (see the module docstring; ``--config.optim.name=owlore``).

    ``lisa(galore(learning_rate, rank, update_proj_gap, scale, b1, b2, eps, weight_decay, ...),
    num_active, interval, seed, layer_of, probabilities=<the outlier ratios of the params given
    to init>, per_slot=True)``.  ``tau``, ``activation_norms`` and ``input_axis`` go to
    :func:`outlier_ratios`; ``proj_side``, ``svd_method``, ``moment_policy``, ``eps_mode``,
    ``moments_8bit``, ``projection_mask`` and ``weight_decay_mask`` go to :func:`optim.galore`.
    The state is :class:`optim.LisaState`; its ``probabilities`` are the normalised outlier ratios.
    ``init`` raises ``ValueError`` when fewer than ``num_active`` layers have an outlier (a
    randomly initialised model has none at the default ``tau``: OwLore is meant for fine-tuning
    pre-trained weights).
    """
    _check_tau_axis(tau, input_axis)
    _core.check_int("num_active", num_active)

    def weights(params):
        ratios = outlier_ratios(params, tau, activation_norms, layer_of, input_axis)
        known = _concrete(ratios)
        if known is not None and np.count_nonzero(known > 0) < num_active:
            raise ValueError(f"tau={tau}: only {np.count_nonzero(known > 0)} layers have entries scoring above "
                             f"tau times their layer's mean (outlier ratios {np.round(known, 6).tolist()}), but "
                             f"num_active={num_active} layers are sampled in proportion to these ratios; expected "
                             "pre-trained weights with outliers, or a lower tau")
        return ratios

    inner = galore(learning_rate, rank, update_proj_gap, scale, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay,
                   projection_mask=projection_mask, weight_decay_mask=weight_decay_mask, proj_side=proj_side,
                   eps_mode=eps_mode, moment_policy=moment_policy, svd_method=svd_method, seed=seed,
                   moments_8bit=moments_8bit)
    return lisa(inner, num_active, interval, seed, layer_of, probabilities=weights, per_slot=True)
