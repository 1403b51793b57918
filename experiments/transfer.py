"""Linearisation's first half: a student built from a softmax teacher, and attention transfer.

- :func:`student_config` turns the teacher's config into the student's: every softmax or
  sliding-window layer becomes ``lolcats`` (sliding-window softmax plus Hedgehog linear
  attention), ``liger`` (sliding-window softmax plus gated linear attention whose gates come from
  the keys) or any linear mixer of the zoo (``transfer``); every other setting is kept.
- :func:`build_student` builds it and copies every teacher parameter whose path and shape it
  shares: embeddings, norms, MLPs, the head, and the attention projections (a grouped-query
  teacher's key/value projections are repeated over the query heads when the new mixer has one
  key/value head per query head).  What is left at its initialisation is *new*; a new short
  convolution starts as the identity, so the copied projections keep their meaning.
- :func:`transfer_step` trains the new parameters only, so that each replaced layer's output
  matches the teacher's attention output on the teacher's own hidden states (mean squared error,
  averaged over the replaced layers; the teacher is frozen).
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from lolax.models import LanguageModel, ModelConfig
from lolax.models.config import MIXER_NAMES, parse_pattern

SOFTMAX_KINDS = ("softmax", "swa")
METHODS = ("lolcats", "liger", "transfer")
# Families whose projections have the teacher's shapes, so q/k/v/o can be copied.
TRANSFER_TARGETS = ("linear_attn", "hedgehog", "retnet", "gla", "deltanet", "gated_deltanet")


def student_kind(method: str, target: str) -> str:
    """The mixer that replaces each softmax layer (ValueError naming the bad setting)."""
    if method not in METHODS:
        raise ValueError(f"method = {method!r} is unknown; expected one of {METHODS}")
    if method != "transfer":
        return method
    name = parse_pattern(target)
    if len(name) != 1 or name[0] not in TRANSFER_TARGETS:
        raise ValueError(f"target = {target!r}: attention transfer copies the teacher's q/k/v/o projections, so "
                         f"the target must be one mixer among {TRANSFER_TARGETS} (of {MIXER_NAMES})")
    return name[0]


def student_config(teacher: ModelConfig, method: str, target: str = "gated_deltanet", window: int = 64,
                   hedgehog_dim: int | None = None) -> ModelConfig:
    """The teacher's config with its softmax layers replaced (see the module docstring).

    ``window`` is the sliding window of the lolcats / liger layers; ``hedgehog_dim`` the
    feature size per half of LoLCATs' maps (None: the head size).  A transfer target runs with
    one key/value head per query head and, for GLA, keys as wide as the heads.
    """
    kind = student_kind(method, target)
    kinds = teacher.layer_kinds
    if not any(k in SOFTMAX_KINDS for k in kinds):
        raise ValueError(f"the teacher has no softmax layers to replace (layers {','.join(kinds)})")
    pattern = ",".join(kind if k in SOFTMAX_KINDS else k for k in kinds)
    changes: dict[str, Any] = {"pattern": pattern, "num_layers": len(kinds), "scan_layers": False}
    if method in ("lolcats", "liger"):
        changes["window"] = window
    if method == "lolcats":
        changes.update(hedgehog_dim=hedgehog_dim, hedgehog_form="lolcats")
    if kind == "gla":
        changes["gla_expand_k"] = 1.0
    if kind in ("gated_deltanet", "deltanet"):
        changes.update(gdn_expand_v=1, gdn_num_v_heads=None)
    return dataclasses.replace(teacher, **changes)


def _flat(state: nnx.State) -> dict[tuple, Any]:
    return {tuple(path): var for path, var in nnx.to_flat_state(state)}


def _widen_heads(value: np.ndarray, heads: int, head_dim: int) -> np.ndarray | None:
    """A ``[D, Hkv * d]`` key/value kernel (or ``[Hkv * d]`` bias) repeated to ``heads`` heads."""
    width = value.shape[-1]
    if width % head_dim or heads % (width // head_dim):
        return None
    kv = width // head_dim
    grouped = value.reshape(value.shape[:-1] + (kv, head_dim))
    return np.repeat(grouped, heads // kv, axis=-2).reshape(value.shape[:-1] + (heads * head_dim,))


class Student(NamedTuple):
    model: LanguageModel
    config: ModelConfig
    copied: tuple[str, ...]      # parameter paths taken from the teacher
    new: tuple[str, ...]         # parameter paths left at their initialisation (what transfer trains)
    replaced: tuple[int, ...]    # layer indices whose mixer was replaced


def build_student(teacher: LanguageModel, cfg: ModelConfig, seed: int = 0) -> Student:
    """The student of config ``cfg`` (from :func:`student_config`) with the teacher's weights."""
    if teacher.config.scan_layers:
        raise ValueError("the teacher must be built with model.scan_layers = False")
    student = LanguageModel(cfg, nnx.Rngs(seed))
    source = {path: np.asarray(var[...]) for path, var in _flat(nnx.state(teacher, nnx.Param)).items()}
    copied, new = [], []
    for path, var in _flat(nnx.state(student, nnx.Param)).items():
        name = "/".join(map(str, path))
        value = source.get(path)
        if value is not None and value.shape != var.shape and path[-2] in ("k_proj", "v_proj"):
            value = _widen_heads(value, cfg.num_heads, cfg.head_size)
        if value is not None and value.shape == var.shape:
            var[...] = jnp.asarray(value, var[...].dtype)
            copied.append(name)
        else:
            if path[-2].endswith("_conv") and path[-1] == "weight":
                # a short convolution starts as the identity, so the copied projections keep
                # their meaning (its activation still applies)
                var[...] = jnp.zeros(var.shape, var[...].dtype).at[-1].set(1)
            new.append(name)
    replaced = tuple(i for i, (a, b) in enumerate(zip(teacher.config.layer_kinds, cfg.layer_kinds)) if a != b)
    return Student(student, cfg, tuple(copied), tuple(new), replaced)


def new_filter(new: tuple[str, ...]):
    """An nnx filter selecting the parameters named in ``new`` (``/``-joined paths)."""
    wanted = frozenset(new)

    def select(path, value) -> bool:
        return isinstance(value, nnx.Param) and "/".join(map(str, path)) in wanted

    return select


def layer_outputs_loss(student: LanguageModel, teacher: LanguageModel, tokens: jax.Array,
                       replaced: tuple[int, ...]) -> jax.Array:
    """Mean over the replaced layers of the squared error between each student mixer's output
    and the teacher attention's output on the teacher's hidden states (teacher frozen)."""
    x = jax.lax.stop_gradient(teacher.embed(tokens))
    errors = []
    for i, (s_block, t_block) in enumerate(zip(student.blocks(), teacher.blocks())):
        h = jax.lax.stop_gradient(t_block.attn_norm(x))
        target = jax.lax.stop_gradient(t_block.attn(h))
        if i in replaced:
            y = s_block.attn(h)
            errors.append(jnp.mean(jnp.square(y.astype(jnp.float32) - target.astype(jnp.float32))))
        x = x + target
        x = jax.lax.stop_gradient(x + t_block.mlp(t_block.mlp_norm(x)))
    return jnp.mean(jnp.stack(errors))


class TransferState(NamedTuple):
    params: nnx.State        # the student's whole parameter state
    opt_state: Any           # over the new parameters only
    step: jax.Array


def init_transfer(student: Student, tx: optax.GradientTransformation) -> tuple[nnx.GraphDef, TransferState]:
    graphdef, params = nnx.split(student.model, nnx.Param)
    train = nnx.filter_state(params, new_filter(student.new))
    return graphdef, TransferState(params, tx.init(train), jnp.zeros((), jnp.int32))


def transfer_step(graphdef: nnx.GraphDef, teacher: LanguageModel, tx: optax.GradientTransformation,
                  new: tuple[str, ...], replaced: tuple[int, ...]):
    """The jitted ``step(state, tokens [B, T]) -> (state, mse)`` of attention transfer."""
    teacher_def, teacher_state = nnx.split(teacher)
    select = new_filter(new)

    def loss_fn(train, frozen, teacher_state, tokens):
        model = nnx.merge(graphdef, train, frozen)
        return layer_outputs_loss(model, nnx.merge(teacher_def, teacher_state), tokens, replaced)

    @jax.jit
    def step(state: TransferState, tokens: jax.Array, teacher_state):
        train, frozen = nnx.split_state(state.params, select, ...)
        loss, grads = jax.value_and_grad(loss_fn)(train, frozen, teacher_state, tokens)
        updates, opt_state = tx.update(grads, state.opt_state, train)
        params = nnx.merge_state(optax.apply_updates(train, updates), frozen)
        return TransferState(params, opt_state, state.step + 1), loss

    return lambda state, tokens: step(state, tokens, teacher_state)


def transfer_eval(graphdef: nnx.GraphDef, teacher: LanguageModel, replaced: tuple[int, ...]):
    """The jitted ``mse(params, tokens)`` of :func:`layer_outputs_loss` (no update)."""
    teacher_def, teacher_state = nnx.split(teacher)

    @jax.jit
    def mse(params, tokens, teacher_state):
        return layer_outputs_loss(nnx.merge(graphdef, params), nnx.merge(teacher_def, teacher_state), tokens,
                                  replaced)

    return lambda params, tokens: mse(params, tokens, teacher_state)
