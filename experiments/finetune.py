"""Starting from a trained run and fine-tuning it with adapters (``init_from``, ``peft``).

- :func:`load_base` reads the model config and parameters of a lolax run folder (any pattern
  it was trained with);
- :func:`build_model` puts those parameters in a model and wraps it with
  :func:`lolax.models.peft.apply`;
- :func:`create_state` shards the train state, the optimizer state covering only what trains;
- :func:`checkpoint_view` / :func:`restore_view`: an adapter run's checkpoints hold the adapters
  (and their frozen buffers) only, with a fingerprint of the base they were trained on.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Iterable

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx

from experiments.checkpoint import CONFIG_FILE, Checkpointer
from experiments.configs.presets import apply_preset
from experiments.optimizers import make_optimizer
from experiments.train_state import TrainState, init_state
from lolax.models import LanguageModel, ModelConfig, peft
from lolax.parallelism import rules as prules

# Model fields that change how a model runs, not its parameters: a fine-tuning run takes these
# from its own config and everything else from the checkpoint it starts from.
RUNTIME_FIELDS = ("dtype", "implementation", "remat", "sequence_attention")


def peft_config(section: ml_collections.ConfigDict | None) -> peft.PeftConfig | None:
    """The config's ``peft`` section as a PeftConfig; None when ``peft.method`` is empty."""
    if section is None or not section.get("method"):
        return None
    return peft.PeftConfig.from_dict(section.to_dict())


def read_run_config(path: str) -> dict:
    """The ``config.json`` of the run folder ``path`` (ValueError naming what is missing)."""
    file = os.path.join(os.path.expanduser(path), CONFIG_FILE)
    if not os.path.exists(file):
        raise ValueError(f"init_from = {path!r} is not a lolax run folder: {file} does not exist "
                         "(pass the --workdir of a training run, the --out of experiments.merge, or a "
                         "Hugging Face checkpoint folder)")
    with open(file) as f:
        return json.load(f)


def saved_model_config(saved: dict) -> ModelConfig:
    return ModelConfig.from_dict(apply_preset(dict(saved["model"]), base=ModelConfig().to_dict()))


@dataclasses.dataclass
class Base:
    """A trained model to start from: its config, parameters (host arrays) and step."""

    path: str
    model: ModelConfig
    params: nnx.State
    step: int


def load_base(path: str, current: ModelConfig | None = None) -> Base:
    """The newest checkpoint's parameters in run folder ``path`` and its model config, or the
    model of a Hugging Face checkpoint folder (:mod:`lolax.models.hf`; step 0).

    The model config is the checkpoint's, except the fields in ``RUNTIME_FIELDS``, which come
    from ``current`` (the fine-tuning run's own config) when given.
    """
    from lolax.models import hf

    if hf.is_checkpoint(path):
        model, model_cfg = hf.load(os.path.expanduser(path))
        if current is not None:
            model_cfg = dataclasses.replace(model_cfg, **{k: getattr(current, k) for k in RUNTIME_FIELDS})
        return Base(path=path, model=model_cfg, params=jax.device_get(nnx.state(model, nnx.Param)), step=0)
    saved = read_run_config(path)
    if saved.get("peft", {}).get("method"):
        raise ValueError(f"init_from = {path!r} is an adapter run (peft.method = {saved['peft']['method']!r}); "
                         "fold its adapters in first: python -m experiments.merge "
                         f"--workdir={path} --out=MERGED, then --config.init_from=MERGED")
    model_cfg = saved_model_config(saved)
    checkpointer = Checkpointer(os.path.expanduser(path), keep=1_000_000, create=False)
    try:
        step = checkpointer.latest_step()
        if step is None:
            raise ValueError(f"init_from = {path!r} holds no checkpoint (nothing under {checkpointer.directory})")
        saved_cfg = ml_collections.ConfigDict(saved)
        tx = make_optimizer(saved_cfg.optim, saved_cfg.train.steps)
        # the saved run's whole state, described without allocating (its parameters are what we keep)
        abstract = jax.eval_shape(lambda: init_state(model_cfg, tx, saved_cfg.seed)[1])
        restored, _ = checkpointer.restore(step, abstract)
    finally:
        checkpointer.close()
    if current is not None:
        model_cfg = dataclasses.replace(model_cfg, **{k: getattr(current, k) for k in RUNTIME_FIELDS})
    return Base(path=path, model=model_cfg, params=restored.params, step=step)


def model_from_base(base: Base, model_cfg: ModelConfig | None = None) -> LanguageModel:
    """``base``'s parameters in a model of ``model_cfg`` (default ``base.model``; only runtime
    fields may differ), built abstractly first so nothing is initialised twice."""
    cfg = base.model if model_cfg is None else model_cfg
    model = nnx.eval_shape(lambda: LanguageModel(cfg, nnx.Rngs(0)))
    nnx.update(model, jax.tree.map(jnp.asarray, base.params))
    return model


def build_model(model_cfg: ModelConfig, seed: int, base: Base | None, peft_cfg: peft.PeftConfig | None,
                init_data: Iterable | None = None) -> tuple[LanguageModel, str]:
    """The model to train: ``base``'s parameters (else a fresh init from ``seed``), adapted by
    ``peft_cfg`` when given. Returns ``(model, fingerprint of the base parameters)``."""
    if base is None:
        model = LanguageModel(model_cfg, nnx.Rngs(seed))
    else:
        model = model_from_base(base, model_cfg)
    fingerprint = peft.fingerprint(nnx.state(model, nnx.Param))
    if peft_cfg is not None:
        peft.apply(model, peft_cfg, nnx.Rngs(seed + 2), data=init_data)
    return model, fingerprint


def trainable_filter(peft_cfg: peft.PeftConfig | None):
    return peft.trainable() if peft_cfg is not None else nnx.Param


def create_state(model: nnx.Module, tx: optax.GradientTransformation, seed: int, trainable,
                 mesh: jax.sharding.Mesh) -> tuple[nnx.GraphDef, TrainState, Any]:
    """``(graphdef, state, shardings)``: the whole model in ``state.params``, the optimizer state
    for the ``trainable`` part only, everything placed by the logical-axis rules."""
    graphdef, params = nnx.split(model)

    def make(params):
        train = nnx.split_state(params, trainable, ...)[0]
        return TrainState(params=params, opt_state=tx.init(train), step=jnp.zeros((), jnp.int32),
                          rng=jax.random.key_data(jax.random.key(seed + 1)))

    shardings = prules.state_shardings(jax.eval_shape(make, params), mesh)
    return graphdef, jax.jit(make, out_shardings=shardings)(params), shardings


def checkpoint_view(state: TrainState, peft_cfg: peft.PeftConfig | None) -> TrainState:
    """What a checkpoint holds: everything, or for an adapter run the adapters alone."""
    if peft_cfg is None:
        return state
    return state._replace(params=nnx.filter_state(state.params, peft.ADAPTER_STATE))


def restore_view(state: TrainState, restored: TrainState, peft_cfg: peft.PeftConfig | None) -> TrainState:
    """``state`` with a restored :func:`checkpoint_view` put back in."""
    if peft_cfg is None:
        return restored
    base = nnx.split_state(state.params, peft.ADAPTER_STATE, ...)[1]
    return restored._replace(params=nnx.merge_state(restored.params, base))


def check_base(meta: dict | None, fingerprint: str, init_from: str) -> None:
    """Refuses to resume adapters on a base other than the one they were trained on."""
    if meta is None:
        return
    if meta.get("base_fingerprint") != fingerprint:
        raise ValueError(
            f"the adapters in this workdir were trained on a different base model: the checkpoint "
            f"records base fingerprint {meta.get('base_fingerprint')!r} (init_from = {meta.get('init_from')!r}), "
            f"but init_from = {init_from!r} gives {fingerprint!r}. Use the base they were trained on, "
            "or a new --workdir.")


def restore_adapted(workdir: str, step: int | None = None) -> tuple[nnx.Module, dict, int, dict]:
    """The adapted model of adapter run ``workdir`` at checkpoint ``step`` (default the newest):
    its base from ``init_from`` (checked against the recorded fingerprint), its adapters from
    the checkpoint. Returns ``(model, run config, step, data position)``."""
    from experiments.data import load_data, run_tokenizer

    saved = read_run_config(workdir)
    config = ml_collections.ConfigDict(saved)
    peft_cfg = peft_config(config.get("peft"))
    if peft_cfg is None:
        raise ValueError(f"workdir {workdir!r} is not an adapter run (its peft.method is empty): its "
                         "checkpoints are ordinary already")
    init_from = config.get("init_from", "")
    model_cfg = saved_model_config(saved)
    base = load_base(init_from, model_cfg) if init_from else None
    init_data = None
    if peft.METHODS[peft_cfg.method].needs_data:
        init_data = load_data(config, run_tokenizer(config, workdir)).batches(config.seed + 3)   # as the trainer
    model, fingerprint = build_model(model_cfg, config.seed, base, peft_cfg, init_data)
    checkpointer = Checkpointer(workdir, create=False)
    try:
        step = checkpointer.latest_step() if step is None else step
        if step is None:
            raise ValueError(f"workdir {workdir!r} holds no checkpoint")
        check_base(checkpointer.meta(step), fingerprint, init_from)
        tx = make_optimizer(config.optim, config.train.steps)
        view = nnx.state(model, peft.ADAPTER_STATE)
        abstract = jax.eval_shape(lambda p: TrainState(
            params=p, opt_state=tx.init(nnx.filter_state(p, peft.trainable())),
            step=jnp.zeros((), jnp.int32), rng=jax.random.key_data(jax.random.key(0))), view)
        restored, position = checkpointer.restore(step, abstract)
    finally:
        checkpointer.close()
    nnx.update(model, restored.params)
    return model, saved, step, position
