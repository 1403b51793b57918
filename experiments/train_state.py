"""The pure training step: ``step(state, batch) -> (state, metrics)`` on NNX-split parameters.

The model's graph definition stays outside the state; the step merges it with the parameters
inside ``jax.jit``, so the state is a plain pytree that jit can donate and orbax can save.
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
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


def next_token_loss(logits: jax.Array, batch: dict[str, jax.Array]) -> jax.Array:
    """The language-model objective: cross-entropy against ``batch["targets"]``."""
    return cross_entropy(logits, batch["targets"])


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
        with peft.training(key):
            logits, aux = model(batch["inputs"], return_aux=True)
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
    """Returns a jitted ``eval_step(params, batch) -> summed loss (nats)`` over all tokens."""

    @jax.jit
    def eval_step(params, batch):
        model = nnx.merge(graphdef, params)
        return cross_entropy(model(batch["inputs"]), batch["targets"]) * batch["targets"].size

    return eval_step


def evaluate(eval_step, params, batches) -> dict[str, float]:
    """Validation loss (nats per token) and bits per byte over fixed batches.

    Bits per byte is the summed loss of every predicted (target) token, in bits, divided by the
    UTF-8 bytes of the text those tokens cover: ``batch["target_bytes"]`` where the batches
    carry it (``data.eval_windows`` with a tokenizer's byte counts), else one byte per token.
    So runs with different tokenizers are compared on the same footing; with the byte tokenizer
    it is the loss divided by ln 2.
    """
    total, count, covered = 0.0, 0, 0
    for batch in batches:
        total += float(eval_step(params, {"inputs": batch["inputs"], "targets": batch["targets"]}))
        count += batch["targets"].size
        covered += int(batch["target_bytes"].sum()) if "target_bytes" in batch else batch["targets"].size
    loss = total / count
    return {"loss": loss, "bpb": (total / covered if covered else math.nan) / math.log(2)}
