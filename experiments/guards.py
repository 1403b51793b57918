"""Checks that stop a training run early, with a message that says what to change.

``check_train_config`` refuses out-of-range ``train``, ``data`` and ``optim`` values before any data
is read or any model is built. ``TrainingDiverged`` is what the trainer raises when the loss, the
gradient norm or the state it is about to checkpoint holds a NaN or an infinity.
"""

from __future__ import annotations

import math
import numbers
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections


class TrainingDiverged(RuntimeError):
    """A non-finite loss, gradient norm or state: the run stops without saving it."""


# (config key, test, the valid range in words); the key is looked up as section.field.
_Rule = tuple[str, Callable[[Any], bool], str]


def _integer(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


RULES: tuple[_Rule, ...] = (
    ("train.steps", lambda v: _integer(v) and v >= 1, "an integer >= 1"),
    ("train.log_every", lambda v: _integer(v) and v >= 1, "an integer >= 1 (log every N steps)"),
    ("train.eval_every", lambda v: _integer(v) and v >= 1, "an integer >= 1 (evaluate every N steps)"),
    ("train.eval_batches", lambda v: _integer(v) and v >= 1, "an integer >= 1"),
    ("train.checkpoint_every", lambda v: _integer(v) and v >= 1, "an integer >= 1 (save every N steps)"),
    ("train.keep_checkpoints", lambda v: _integer(v) and v >= 1, "an integer >= 1 (checkpoints kept on disk)"),
    ("train.sample_tokens", lambda v: _integer(v) and v >= 0, "an integer >= 0 (0: no sample)"),
    ("data.batch_size", lambda v: _integer(v) and v >= 1, "an integer >= 1"),
    ("data.seq_len", lambda v: _integer(v) and v >= 1, "an integer >= 1 (tokens per window)"),
    ("data.val_fraction", lambda v: _real(v) and 0.0 < v < 1.0,
     "a number strictly between 0 and 1 (the held-out tail of every document)"),
    ("optim.learning_rate", lambda v: _real(v) and v > 0.0, "a finite number > 0"),
    ("optim.warmup_steps", lambda v: _integer(v) and v >= 0, "an integer >= 0"),
    ("optim.min_lr_ratio", lambda v: _real(v) and v >= 0.0, "a finite number >= 0"),
)


def check_train_config(config: ml_collections.ConfigDict) -> None:
    """Raises one ValueError listing every out-of-range value, each as
    ``section.field = VALUE is out of range: expected RANGE (set --config.section.field=...)``.

    Keys a config does not have are skipped (the linearisation configs, for example, have no
    ``train`` section of their own).
    """
    problems = []
    for key, valid, expected in RULES:
        section, field = key.split(".")
        if section not in config or field not in config[section]:
            continue
        value = config[section][field]
        if not valid(value):
            problems.append(f"{key} = {value!r} is out of range: expected {expected} (set --config.{key}=...)")
    if len(problems) == 1:
        raise ValueError(problems[0])
    if problems:
        raise ValueError(f"{len(problems)} config values are out of range:\n  " + "\n  ".join(problems))


def _float_leaves(tree) -> list[jax.Array]:
    return [x for x in jax.tree.leaves(tree) if jnp.issubdtype(jnp.result_type(x), jnp.inexact)]


@jax.jit
def _all_finite(leaves: list[jax.Array]) -> jax.Array:
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves])) if leaves else jnp.bool_(True)


def all_finite(tree) -> bool:
    """Whether every floating-point value in ``tree`` is finite: one fused reduction, one host sync."""
    return bool(_all_finite(_float_leaves(tree)))


def last_good(last_saved: int | None, checkpoints: str) -> str:
    """The sentence of a divergence message that says where to resume from."""
    if last_saved is None:
        return "no checkpoint has been saved yet"
    return (f"the last good checkpoint is step {last_saved} in {checkpoints}; rerun with the same --workdir to "
            "resume from it (with a lower --config.optim.learning_rate or --config.optim.grad_clip, say)")


def diverged(what: str, step: int, last_saved: int | None, workdir: str) -> TrainingDiverged:
    """The error for a non-finite ``what`` at ``step``; nothing after ``last_saved`` was saved."""
    checkpoints = os.path.join(os.path.abspath(workdir), "checkpoints")
    return TrainingDiverged(f"training diverged at step {step}: {what}. Stopped without saving this state; "
                            + last_good(last_saved, checkpoints))
