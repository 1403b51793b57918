"""The language-model training loop behind ``python -m experiments.train``.

``train(config, workdir)`` builds the data, model, optimizer and mesh from an ml_collections
config, resumes from the newest checkpoint in ``workdir`` if there is one, trains with a progress
bar, evaluates, checkpoints, logs ``metrics.jsonl``, plots ``loss.png`` and prints a sample.
"""

from __future__ import annotations

import contextlib
import math
import signal
import time

import jax
import ml_collections
import numpy as np
from absl import logging
from flax import nnx
from tqdm import tqdm

from experiments import finetune
from experiments.checkpoint import Checkpointer, abstract_like, check_compatible, write_config
from experiments.configs.presets import apply_preset
from experiments.data import BatchIterator, Tokenizer, eval_windows, load_corpus, load_tokenizer
from experiments.metrics import MetricsWriter, plot_loss
from experiments.optimizers import check_layer_layout, make_optimizer
from experiments.train_state import evaluate, init_state, make_eval_step, make_train_step
from lolax import optim
from lolax.models import ModelConfig, count_params, generate, peft
from lolax.parallelism import mesh as pmesh
from lolax.parallelism import rules as prules


def model_config(section: ml_collections.ConfigDict) -> ModelConfig:
    """The config's model section with its ``preset`` (if any) expanded; flags beat the preset."""
    return ModelConfig.from_dict(apply_preset(section.to_dict(), base=ModelConfig().to_dict()))


def check_vocab(tokenizer: Tokenizer, model_cfg: ModelConfig, init_from: str = "") -> None:
    """Raises ValueError when the tokenizer's ids do not all fit the model's vocabulary."""
    if tokenizer.vocab_size > model_cfg.vocab_size:
        source = f" (the model of init_from = {init_from!r})" if init_from else ""
        raise ValueError(
            f"data.tokenizer = {tokenizer.spec!r} has a vocabulary of {tokenizer.vocab_size:,} tokens, more than "
            f"model.vocab_size = {model_cfg.vocab_size:,}{source}; set --config.model.vocab_size="
            f"{tokenizer.vocab_size} (or more), or use a smaller tokenizer")


def data_mesh(mesh_config, batch_size: int, seq_len: int | None = None) -> jax.sharding.Mesh:
    """The ``(data, fsdp, sequence, tensor)`` mesh of ``config.mesh`` (see ``parallelism.mesh``).

    ``mesh_config`` holds the axis sizes (-1 = fill).
    """
    sizes = {a: mesh_config[a] for a in pmesh.AXES if a in mesh_config}
    mesh = pmesh.make_mesh(sizes)
    prules.check_batch_divisible(mesh, batch_size, seq_len)
    return mesh


class _StopRequest:
    """Turns SIGINT/SIGTERM into a flag so the loop can checkpoint before exiting."""

    def __init__(self):
        self.requested = False

    def __call__(self, signum, frame):
        if self.requested:  # second signal: stop at once
            raise KeyboardInterrupt
        self.requested = True

    @contextlib.contextmanager
    def installed(self):
        previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            for s in previous:
                signal.signal(s, self)
        except ValueError:  # not in the main thread: leave handlers alone
            previous = {}
        try:
            yield self
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)


def train(config: ml_collections.ConfigDict, workdir: str, show_progress: bool = True) -> dict:
    """Trains (or resumes) the run in ``workdir``; returns a summary of the final metrics.

    With ``config.init_from`` the model (its config and parameters) comes from that run folder;
    with ``config.peft.method`` set only adapters train (see ``experiments/finetune.py``).
    """
    config_dict = config.to_dict()
    tokenizer = load_tokenizer(config.data.get("tokenizer", "byte"))
    model_cfg = model_config(config.model)
    peft_cfg = finetune.peft_config(config.get("peft"))
    init_from = config.get("init_from", "")
    base = None
    if init_from:
        base = finetune.load_base(init_from, model_cfg)
        model_cfg = base.model
        config_dict["model"] = {**model_cfg.to_dict(), "preset": ""}
    check_vocab(tokenizer, model_cfg, init_from)
    check_compatible(workdir, config_dict)
    check_layer_layout(config.optim, model_cfg.scan_layers)
    d, t = config.data, config.train

    corpus = load_corpus(d.path, d.val_fraction, tokenizer)
    logging.info("corpus: %s", corpus.describe())
    batches = BatchIterator(corpus.train, d.batch_size, d.seq_len, config.seed)
    val_batches = eval_windows(corpus.val, d.batch_size, d.seq_len, t.eval_batches, corpus.val_bytes)

    tx = make_optimizer(config.optim, t.steps)
    mesh = data_mesh(config.mesh, d.batch_size, d.seq_len)
    trainable = finetune.trainable_filter(peft_cfg)
    meta = None
    if base is None and peft_cfg is None:
        # parameters and optimizer state are created already sharded by the logical-axis rules
        graphdef, state, state_shardings = prules.create_sharded(
            lambda: init_state(model_cfg, tx, config.seed), mesh)
    else:
        # the adapted model is built on the host (data-driven adapters read a few batches), then placed
        init_data = BatchIterator(corpus.train, d.batch_size, d.seq_len, config.seed + 3)
        model, fingerprint = finetune.build_model(model_cfg, config.seed, base, peft_cfg, init_data)
        graphdef, state, state_shardings = finetune.create_state(model, tx, config.seed, trainable, mesh)
        if peft_cfg is not None:
            meta = {"base_fingerprint": fingerprint, "init_from": init_from}
    batch_sharding = prules.batch_sharding(mesh)

    checkpointer = Checkpointer(workdir, t.keep_checkpoints)
    start = checkpointer.latest_step()
    if start is not None:
        if meta is not None:
            finetune.check_base(checkpointer.meta(start), meta["base_fingerprint"], init_from)
        saved, position = checkpointer.restore(start, abstract_like(finetune.checkpoint_view(state, peft_cfg)))
        state = finetune.restore_view(state, saved, peft_cfg)
        batches.restore(position)
        print(f"resumed from step {start} in {workdir}")
    elif base is not None:
        print(f"starting from {init_from} (step {base.step})")
    write_config(workdir, config_dict)
    model = nnx.merge(graphdef, state.params)
    print(f"model: {count_params(model):,} parameters, layers "
          f"{','.join(model_cfg.layer_kinds)}; "
          f"{jax.device_count()} device(s), mesh {dict(mesh.shape)}; corpus {corpus.describe()}")
    if peft_cfg is not None:
        counts = peft.count(model)
        print(f"adapters: {peft_cfg.method} rank {peft_cfg.rank} on {len(peft.adapted_layers(model))} layers, "
              f"{counts['trainable']:,} trainable values ({counts['trainable'] / counts['base']:.3%} of the "
              f"{counts['base']:,} base parameters), {counts['buffers']:,} frozen adapter values")
    train_params = nnx.split_state(state.params, trainable, ...)[0]
    trainable_values = sum(int(x.size) for x in jax.tree.leaves(train_params))
    print(f"optimizer {config.optim.name} state:\n{optim.format_state_bytes(optim.state_bytes(tx, train_params))}")

    # Steps are traced under jax.set_mesh(mesh) below: with a sequence axis > 1 the mixers run
    # LASP-2 and ring / Ulysses / all-gather attention (model.sequence_attention).
    train_step = prules.shard_step(make_train_step(graphdef, tx, donate=False, trainable=trainable), mesh,
                                   state_shardings, batch_sharding)
    eval_step = make_eval_step(graphdef)
    writer = MetricsWriter(workdir)
    tokens_per_step = d.batch_size * d.seq_len
    step = int(state.step)
    last = {"val_loss": math.nan, "val_bpb": math.nan, "train_loss": math.nan, "tokens_per_s": math.nan}
    stop = _StopRequest()
    bar = tqdm(total=t.steps, initial=step, disable=not show_progress, dynamic_ncols=True, unit="step")
    try:
        with stop.installed(), jax.set_mesh(mesh):
            window_start, window_steps = time.perf_counter(), 0
            while step < t.steps and not stop.requested:
                batch = jax.device_put(next(batches), batch_sharding)
                state, metrics = train_step(state, batch)
                step += 1
                window_steps += 1
                bar.update(1)
                if step % t.log_every == 0 or step == t.steps:
                    loss = float(metrics["loss"])  # waits for the step: timing below is honest
                    elapsed = time.perf_counter() - window_start
                    last["train_loss"] = loss
                    last["tokens_per_s"] = window_steps * tokens_per_step / elapsed
                    bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{last['tokens_per_s']:,.0f}")
                    writer.write({"step": step, "split": "train", "loss": loss,
                                  "grad_norm": float(metrics["grad_norm"]),
                                  "tokens_per_s": last["tokens_per_s"], "time": time.time()})
                    window_start, window_steps = time.perf_counter(), 0
                if step % t.eval_every == 0 or step == t.steps:
                    result = evaluate(eval_step, state.params, val_batches)
                    last["val_loss"], last["val_bpb"] = result["loss"], result["bpb"]
                    writer.write({"step": step, "split": "val", **result, "time": time.time()})
                    bar.write(f"step {step}: validation loss {result['loss']:.4f}, "
                              f"bits per byte {result['bpb']:.4f}")
                    window_start = time.perf_counter()
                if step % t.checkpoint_every == 0 or step == t.steps or stop.requested:
                    checkpointer.save(step, finetune.checkpoint_view(state, peft_cfg), batches.position(), meta)
            if stop.requested:
                bar.write(f"stopped at step {step}; checkpoint saved, rerun with the same workdir to resume")
    finally:
        bar.close()
        checkpointer.close()

    plot_loss(writer.path, f"{workdir}/loss.png")
    summary = {"step": step, "trainable_params": trainable_values, **last}
    if step >= t.steps and t.sample_tokens > 0:
        summary["sample"] = sample_text(graphdef, state.params, t, config.seed, tokenizer)
        print(f"--- sample ({t.sample_tokens} tokens, temperature {t.sample_temperature}) ---")
        print(t.sample_prompt + summary["sample"])
        print("---")
    return summary


def sample_text(graphdef, params, t: ml_collections.ConfigDict, seed: int,
                tokenizer: Tokenizer | None = None) -> str:
    """``t.sample_tokens`` tokens after ``t.sample_prompt``, encoded and decoded by the run's
    tokenizer (default bytes); ids past the tokenizer's vocabulary are left out."""
    tokenizer = load_tokenizer(tokenizer)
    prompt = tokenizer.encode(t.sample_prompt)[None].astype(np.int32)
    model = nnx.merge(graphdef, jax.device_get(params))
    tokens = np.asarray(generate(model, prompt, t.sample_tokens, temperature=t.sample_temperature,
                                 rng=jax.random.key(seed))[0])
    return tokenizer.decode(tokens[tokens < tokenizer.vocab_size])
