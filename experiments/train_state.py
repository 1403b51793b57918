"""The pure training step: ``step(state, batch) -> (state, metrics)`` on NNX-split parameters.

The model's graph definition stays outside the state; the step merges it with the parameters
inside ``jax.jit``, so the state is a plain pytree that jit can donate and orbax can save.

A packed batch (``experiments.data.packing``) also holds ``cu_seqlens [B, K + 1]`` and
``loss_mask [B, L]``: each row then runs as one ``B == 1`` packed sequence (``jax.vmap`` over the
rows, :func:`model_logits`), so positions and recurrent states restart at every document, and the
loss averages over the targets the mask keeps. Batches without those keys run as before.
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from lolax.models import LanguageModel, ModelConfig, peft


class TrainState(NamedTuple):
    params: nnx.State       # the model's nnx.Param variables
    opt_state: Any          # the optax state of ``tx``
    step: jax.Array         # int32 scalar
    rng: jax.Array          # uint32 key data for anything stochastic in the step


def init_model(cfg: ModelConfig, seed: int) -> tuple[nnx.GraphDef, nnx.State]:
    model = LanguageModel(cfg, nnx.Rngs(seed))
    return nnx.split(model, nnx.Param)


def init_state(cfg: ModelConfig, tx: optax.GradientTransformation, seed: int) -> tuple[nnx.GraphDef, TrainState]:
    graphdef, params = init_model(cfg, seed)
    state = TrainState(params=params, opt_state=tx.init(params), step=jnp.zeros((), jnp.int32),
                       rng=jax.random.key_data(jax.random.key(seed + 1)))
    return graphdef, state


def cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Mean next-token cross-entropy in nats; ``logits [B, T, V]`` float32, ``targets [B, T]``."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, targets[..., None], axis=-1))


def token_nll(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Per-token negative log-likelihood ``[B, T]`` in nats (float32)."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]


def masked_cross_entropy(logits: jax.Array, targets: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean cross-entropy over the targets where ``mask [B, T]`` is True (0 if there are none)."""
    mask = mask.astype(jnp.float32)
    return jnp.sum(token_nll(logits, targets) * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def next_token_loss(logits: jax.Array, batch: dict[str, jax.Array]) -> jax.Array:
    """The language-model objective: cross-entropy against ``batch["targets"]``, over the targets
    ``batch["loss_mask"]`` keeps when the batch is packed (a document's first token is not
    predicted from the previous document)."""
    if "loss_mask" in batch:
        return masked_cross_entropy(logits, batch["targets"], batch["loss_mask"])
    return cross_entropy(logits, batch["targets"])


def model_logits(model: LanguageModel, batch: dict[str, jax.Array], key: jax.Array | None = None,
                 ) -> tuple[jax.Array, jax.Array]:
    """``(logits [B, L, V], aux loss)`` of ``batch["inputs"] [B, L]``, inside ``peft.training(key)``
    when ``key`` is given.

    With ``batch["cu_seqlens"] [B, K + 1]`` every row runs as one packed sequence
    (``model(row[None], cu_seqlens=...)`` under ``jax.vmap``, so attention stays per row and the
    batch axis stays sharded over ``data``); each row's adapters draw from ``key`` folded with the
    row's index, and the aux loss is the rows' mean.
    """
    if "cu_seqlens" not in batch:
        if key is None:
            return model(batch["inputs"], return_aux=True)
        with peft.training(key):
            return model(batch["inputs"], return_aux=True)

    def row(tokens, cu_seqlens, index):
        if key is None:
            logits, aux = model(tokens[None], cu_seqlens=cu_seqlens, return_aux=True)
        else:
            with peft.training(jax.random.fold_in(key, index)):
                logits, aux = model(tokens[None], cu_seqlens=cu_seqlens, return_aux=True)
        return logits[0], aux

    rows = jnp.arange(batch["inputs"].shape[0])
    logits, aux = jax.vmap(row)(batch["inputs"], batch["cu_seqlens"], rows)
    return logits, jnp.mean(aux)


Objective = Callable[[jax.Array, dict[str, jax.Array]], jax.Array]


def make_train_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation, donate: bool = True,
                    objective: Objective = next_token_loss, trainable: nnx.filterlib.Filter = nnx.Param):
    """Returns the jitted ``step(state, batch) -> (state, metrics)`` with the state donated.

    ``objective(logits, batch) -> scalar`` is the loss of the model's logits on
    ``batch["inputs"]`` (default: next-token cross-entropy; the synthetic tasks pass a masked
    one); the model's auxiliary loss is added to it for the gradient.  Only the variables of
    ``state.params`` that ``trainable`` selects are differentiated and updated (``tx``'s state
    covers those alone); the rest, such as the frozen base of an adapted model, is carried
    unchanged.  The forward pass runs inside ``peft.training(key)`` with a fresh key per step,
    so adapters' dropout and DyLoRA's rank sampling are active in training only.
    """

    def loss_fn(train_params, frozen, batch, key):
        model = nnx.merge(graphdef, train_params, frozen)
        logits, aux = model_logits(model, batch, key)
        loss = objective(logits, batch)
        return loss + aux, (loss, aux)

    def step(state: TrainState, batch: dict[str, jax.Array]) -> tuple[TrainState, dict[str, jax.Array]]:
        train_params, frozen = nnx.split_state(state.params, trainable, ...)
        new_rng, key = jax.random.split(jax.random.wrap_key_data(state.rng))
        (_, (loss, aux)), grads = jax.value_and_grad(loss_fn, has_aux=True)(train_params, frozen, batch, key)
        updates, opt_state = tx.update(grads, state.opt_state, train_params)
        params = nnx.merge_state(optax.apply_updates(train_params, updates), frozen)
        new_rng = jax.random.key_data(new_rng)
        # "loss" is the objective; "aux_loss" (MoM load balancing, else 0) is added to it for the
        # gradient.
        metrics = {"loss": loss, "aux_loss": aux, "grad_norm": optax.tree.norm(grads)}
        return TrainState(params, opt_state, state.step + 1, new_rng), metrics

    return jax.jit(step, donate_argnums=(0,) if donate else ())


def make_eval_step(graphdef: nnx.GraphDef):
    """Returns a jitted ``eval_step(params, batch) -> summed loss (nats)`` over all tokens (over
    the targets ``batch["loss_mask"]`` keeps, for a packed batch)."""

    @jax.jit
    def eval_step(params, batch):
        model = nnx.merge(graphdef, params)
        if "cu_seqlens" not in batch:
            return cross_entropy(model(batch["inputs"]), batch["targets"]) * batch["targets"].size
        logits, _ = model_logits(model, batch)
        return jnp.sum(token_nll(logits, batch["targets"]) * batch["loss_mask"].astype(jnp.float32))

    return eval_step


def evaluate(eval_step, params, batches) -> dict[str, float]:
    """Validation loss (nats per token) and bits per byte over fixed batches.

    Bits per byte is the summed loss of every predicted (target) token, in bits, divided by the
    UTF-8 bytes of the text those tokens cover: ``batch["target_bytes"]`` where the batches
    carry it (``data.eval_windows`` with a tokenizer's byte counts), else one byte per token.
    So runs with different tokenizers are compared on the same footing; with the byte tokenizer
    it is the loss divided by ln 2. Packed batches count only the targets their ``loss_mask``
    keeps (a document's first token is never predicted), and the bytes those cover.
    """
    total, count, covered = 0.0, 0, 0
    for batch in batches:
        if "loss_mask" not in batch:
            total += float(eval_step(params, {"inputs": batch["inputs"], "targets": batch["targets"]}))
            count += batch["targets"].size
            covered += int(batch["target_bytes"].sum()) if "target_bytes" in batch else batch["targets"].size
            continue
        mask = np.asarray(batch["loss_mask"], bool)
        total += float(eval_step(params, {k: v for k, v in batch.items() if k != "target_bytes"}))
        count += int(mask.sum())
        covered += int(batch["target_bytes"][mask].sum()) if "target_bytes" in batch else int(mask.sum())
    loss = total / count if count else math.nan
    return {"loss": loss, "bpb": (total / covered if covered else math.nan) / math.log(2)}
