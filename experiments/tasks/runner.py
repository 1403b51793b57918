"""Train a language model from the model zoo on a synthetic task and measure its accuracy.

The tasks share one loss: cross-entropy on the positions whose label is not ``IGNORE``, and one
metric: accuracy over those positions. ``train_on_task`` is what the task scripts sweep over.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from experiments.configs.presets import apply_preset
from experiments.optimizers import make_optimizer
from experiments.tasks.common import IGNORE
from experiments.train_state import init_state, make_train_step
from lolax.models import LanguageModel, ModelConfig

Batch = dict[str, np.ndarray]


def masked_loss_and_accuracy(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Returns ``(mean loss, correct count, counted positions)`` over labels != IGNORE."""
    mask = labels != IGNORE
    safe = jnp.where(mask, labels, 0)
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, safe[..., None], axis=-1)[..., 0]
    count = jnp.maximum(mask.sum(), 1)
    loss = jnp.sum(jnp.where(mask, nll, 0.0)) / count
    correct = jnp.sum(mask & (jnp.argmax(logits, axis=-1) == safe))
    return loss, correct, mask.sum()


@dataclasses.dataclass
class TaskResult:
    train_loss: float
    steps: int
    seconds: float
    accuracy: dict[str, float]
    num_params: int


def train_on_task(model_cfg: ModelConfig, sample_batch: Callable[[int], Batch], eval_sets: dict[str, Batch], *,
                  steps: int, learning_rate: float = 1e-3, weight_decay: float = 0.1, warmup: int = 50,
                  seed: int = 0, eval_batch_size: int = 64, stop_accuracy: float | None = None,
                  eval_every: int = 0, log: Callable[[str], None] | None = None) -> TaskResult:
    """Trains on ``sample_batch(step)`` for ``steps`` steps; returns accuracy on every eval set.

    ``stop_accuracy`` stops early once the first eval set reaches it (checked every
    ``eval_every`` steps), as Zoology does at 0.99.
    """
    # the training step and optimizer of the language-model trainer, with the masked objective:
    # AdamW, gradient clipping at 1, linear warm-up then cosine decay to 0
    optim_cfg = ml_collections.ConfigDict(dict(
        name="adamw", learning_rate=learning_rate, warmup_steps=min(warmup, steps // 2), min_lr_ratio=0.0,
        weight_decay=weight_decay, b1=0.9, b2=0.999, grad_clip=1.0, rank=-1, update_proj_gap=-1, scale=-1.0))
    tx = make_optimizer(optim_cfg, steps)
    graphdef, state = init_state(model_cfg, tx, seed)
    num_params = sum(int(x.size) for x in jax.tree.leaves(state.params))
    step = make_train_step(graphdef, tx, objective=lambda logits, batch: masked_loss_and_accuracy(
        logits, batch["labels"])[0])

    def loss_fn(p, batch):
        logits, aux = nnx.merge(graphdef, p)(batch["inputs"], return_aux=True)
        loss, correct, count = masked_loss_and_accuracy(logits, batch["labels"])
        return loss + aux, (loss, correct, count)

    @jax.jit
    def eval_step(p, batch):
        return loss_fn(p, batch)[1][1:]

    def accuracy(p, data: Batch) -> float:
        correct = total = 0
        for i in range(0, len(data["inputs"]), eval_batch_size):
            chunk = {k: jnp.asarray(data[k][i:i + eval_batch_size]) for k in ("inputs", "labels")}
            c, n = eval_step(p, chunk)
            correct, total = correct + int(c), total + int(n)
        return correct / max(total, 1)

    start, loss, done = time.perf_counter(), float("nan"), 0
    first_eval = next(iter(eval_sets))
    for i in range(steps):
        batch = sample_batch(i)
        state, metrics = step(state, {k: jnp.asarray(batch[k]) for k in ("inputs", "labels")})
        done = i + 1
        if eval_every and done % eval_every == 0:
            loss = float(metrics["loss"])
            acc = accuracy(state.params, eval_sets[first_eval])
            if log:
                log(f"  step {done}: loss {loss:.4f}, {first_eval} accuracy {acc:.3f}")
            if stop_accuracy is not None and acc >= stop_accuracy:
                break
    loss = float(metrics["loss"])
    results = {name: accuracy(state.params, data) for name, data in eval_sets.items()}
    return TaskResult(train_loss=loss, steps=done, seconds=time.perf_counter() - start, accuracy=results,
                      num_params=num_params)


def task_model_config(preset: str, vocab_size: int, d_model: int, num_layers: int = 2, num_heads: int = 2,
                      conv_hybrid: bool = False, **overrides) -> ModelConfig:
    """A small model of the given preset family sized for a task.

    ``conv_hybrid`` puts a BaseConv layer (pattern letter ``C``, ``conv_size`` taps) before every
    mixer layer, as Zoology's MQAR sweep does for every architecture; ``num_layers`` counts the
    mixer layers only.
    """
    values = {"vocab_size": vocab_size, "d_model": d_model, "num_layers": num_layers, "num_heads": num_heads,
              "preset": preset}
    values = apply_preset(values)                # the preset's pattern and options win here
    values.update(overrides)
    cfg = ModelConfig.from_dict(values)
    if conv_hybrid:
        cfg = dataclasses.replace(cfg, pattern=",".join(f"conv,{kind}" for kind in cfg.layer_kinds),
                                  num_layers=2 * cfg.num_layers)
    return cfg


def decode_state_size(cfg: ModelConfig, seq_len: int) -> int:
    """Floats a model keeps per sequence to decode at ``seq_len``: recurrent states, KV caches.

    This is the "state size" of Zoology's MQAR plots: ``H*K*V`` per linear layer, the ``2*T*d`` KV
    cache per softmax layer, the window's cache for sliding windows. Counted with
    ``jax.eval_shape``, so nothing is allocated.
    """
    def caches():
        model = LanguageModel(cfg, nnx.Rngs(0))
        return model.prefill(jnp.zeros((1, seq_len), jnp.int32), max_len=seq_len)[1]

    shapes = jax.eval_shape(caches)
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(shapes)
                   if jnp.issubdtype(x.dtype, jnp.floating)))
