"""The language-model training loop behind ``python -m experiments.train``.

``train(config, workdir)`` builds the data, model, optimizer and mesh from an ml_collections
config, resumes from the newest checkpoint in ``workdir`` that reads, trains with a progress
bar, evaluates, checkpoints, logs ``metrics.jsonl`` and TensorBoard event files, plots ``loss.png``
and prints a sample. A NaN or infinite loss stops it (``guards.TrainingDiverged``) without saving.
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

from experiments import finetune, guards
from experiments.checkpoint import Checkpointer, abstract_like, check_compatible, write_config
from experiments.configs.presets import apply_preset
from experiments.data import Tokenizer, load_data, load_tokenizer, run_tokenizer, to_device, with_model_vocab
from experiments.data.tokenizer import BYTE
from experiments.metrics import MetricsWriter, last_records, plot_loss
from experiments.optimizers import check_layer_layout, learning_rate_schedule, make_optimizer
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

    The loss and gradient norm are checked at every logged step (``train.log_every``, and the
    step a stop request arrives at), the validation loss at every evaluation, and the whole state
    about to be saved before every checkpoint; a NaN or infinity raises ``guards.TrainingDiverged``
    naming the step and the last good checkpoint, and nothing non-finite is saved.
    """
    guards.check_train_config(config)
    tokenizer = run_tokenizer(config, workdir)         # bpe:N is trained into (or loaded from) the workdir
    config = with_model_vocab(config, tokenizer)       # model.vocab_size = 0: the tokenizer's vocabulary
    config_dict = config.to_dict()
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

    corpus = load_data(config, tokenizer)              # text, or a prepared folder of token shards
    logging.info("corpus: %s", corpus.describe())
    batches = corpus.batches(config.seed)
    val_batches = corpus.val_batches(t.eval_batches)

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
        init_data = corpus.batches(config.seed + 3)
        model, fingerprint = finetune.build_model(model_cfg, config.seed, base, peft_cfg, init_data)
        graphdef, state, state_shardings = finetune.create_state(model, tx, config.seed, trainable, mesh)
        if peft_cfg is not None:
            meta = {"base_fingerprint": fingerprint, "init_from": init_from}
    batch_sharding = prules.batch_sharding(mesh)

    checkpointer = Checkpointer(workdir, t.keep_checkpoints)
    check_meta = None if meta is None else (
        lambda saved_meta: finetune.check_base(saved_meta, meta["base_fingerprint"], init_from))
    # the newest checkpoint that reads; unreadable newer ones are moved aside with a warning
    resumed = checkpointer.restore_latest(abstract_like(finetune.checkpoint_view(state, peft_cfg)), check_meta)
    start = None
    if resumed is not None:
        start, saved, position, _ = resumed
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
    opt_bytes = optim.state_bytes(tx, train_params)
    opt_table = optim.format_state_bytes(opt_bytes)
    print(f"optimizer {config.optim.name} state:\n{opt_table}")

    # Steps are traced under jax.set_mesh(mesh) below: with a sequence axis > 1 the mixers run
    # LASP-2 and ring / Ulysses / all-gather attention (model.sequence_attention).
    train_step = prules.shard_step(make_train_step(graphdef, tx, donate=False, trainable=trainable), mesh,
                                   state_shardings, batch_sharding)
    eval_step = make_eval_step(graphdef)
    step = int(state.step)
    writer = MetricsWriter(workdir, tensorboard=t.get("tensorboard", True),
                           purge_step=None if start is None else step + 1)
    writer.scalar("optimizer/state_bytes", opt_bytes["total"]["bytes"], step)
    writer.text("optimizer/state", f"optimizer {config.optim.name}\n\n    " + opt_table.replace("\n", "\n    "), step)
    schedule = learning_rate_schedule(config.optim, t.steps)
    byte_tokens = tokenizer.spec == BYTE           # train bits per byte is then the loss / ln 2
    tokens_per_step = d.batch_size * d.seq_len
    last = resumed_metrics(writer.path, step)
    last_saved = start                             # the newest checkpoint on disk, all finite
    stop = _StopRequest()
    bar = tqdm(total=t.steps, initial=step, disable=not show_progress, dynamic_ncols=True, unit="step")
    try:
        with stop.installed(), jax.set_mesh(mesh):
            window_start, window_steps = time.perf_counter(), 0
            while step < t.steps and not stop.requested:
                batch = to_device(next(batches), batch_sharding)
                state, metrics = train_step(state, batch)
                step += 1
                window_steps += 1
                bar.update(1)
                if step % t.log_every == 0 or step == t.steps or stop.requested:
                    loss = float(metrics["loss"])  # waits for the step: timing below is honest
                    grad_norm = float(metrics["grad_norm"])
                    elapsed = time.perf_counter() - window_start
                    tokens_per_s = window_steps * tokens_per_step / elapsed
                    record = {"step": step, "split": "train", "loss": loss, "grad_norm": grad_norm,
                              "learning_rate": float(schedule(step - 1)), "tokens_per_s": tokens_per_s}
                    if byte_tokens:
                        record["bpb"] = loss / math.log(2)
                    writer.write({**record, "time": time.time()})
                    if not (math.isfinite(loss) and math.isfinite(grad_norm)):
                        raise guards.diverged(f"training loss {loss:.4f}, gradient norm {grad_norm:.4g}", step,
                                              last_saved, workdir)
                    last.update(train_loss=loss, train_step=step, tokens_per_s=tokens_per_s)
                    bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tokens_per_s:,.0f}")
                    window_start, window_steps = time.perf_counter(), 0
                if step % t.eval_every == 0 or step == t.steps:
                    result = evaluate(eval_step, state.params, val_batches)
                    writer.write({"step": step, "split": "val", **result, "time": time.time()})
                    if not math.isfinite(result["loss"]):
                        raise guards.diverged(f"validation loss {result['loss']:.4f}", step, last_saved, workdir)
                    last.update(val_loss=result["loss"], val_bpb=result["bpb"], val_step=step)
                    bar.write(f"step {step}: validation loss {result['loss']:.4f}, "
                              f"bits per byte {result['bpb']:.4f}")
                    window_start = time.perf_counter()
                if step % t.checkpoint_every == 0 or step == t.steps or stop.requested:
                    view = finetune.checkpoint_view(state, peft_cfg)
                    # one fused reduction over what is saved: cheap beside writing it
                    if not guards.all_finite((view, metrics)):
                        raise guards.diverged("the state to be saved (or this step's loss or gradient norm) holds "
                                              "NaN or Inf", step, last_saved, workdir)
                    checkpointer.save(step, view, batches.position(), meta)
                    last_saved = step
            if stop.requested:
                bar.write(f"stopped at step {step}; checkpoint saved, rerun with the same workdir to resume")
    finally:
        bar.close()
        checkpointer.close()
        writer.close()

    plot_loss(writer.path, f"{workdir}/loss.png")
    summary = {"step": step, "trainable_params": trainable_values, "stopped": stop.requested, **last}
    if step >= t.steps and t.sample_tokens > 0:
        summary["sample"] = sample_text(graphdef, state.params, t, config.seed, tokenizer)
        print(f"--- sample ({t.sample_tokens} tokens, temperature {t.sample_temperature}) ---")
        print(t.sample_prompt + summary["sample"])
        print("---")
    return summary


def resumed_metrics(metrics_path: str, step: int) -> dict:
    """The latest training and validation numbers logged at or before ``step`` (NaN and None
    where there are none): what a summary reports until this run logs its own."""
    records = last_records(metrics_path, step)
    train, val = records.get("train", {}), records.get("val", {})
    return {"val_loss": val.get("loss", math.nan), "val_bpb": val.get("bpb", math.nan), "val_step": val.get("step"),
            "train_loss": train.get("loss", math.nan), "train_step": train.get("step"),
            "tokens_per_s": train.get("tokens_per_s", math.nan)}


def final_line(summary: dict) -> str:
    """One line of a run's last real numbers, each with the step it comes from; what has not
    been measured yet is said, not printed as NaN."""
    parts = [f"final: step {summary['step']}" + (" (stopped early)" if summary.get("stopped") else "")]
    if summary.get("train_step") is not None:
        parts.append(f"training loss {summary['train_loss']:.4f} (step {summary['train_step']})")
    else:
        parts.append("no training loss logged yet")
    if summary.get("val_step") is not None:
        parts.append(f"validation loss {summary['val_loss']:.4f}, bits per byte {summary['val_bpb']:.4f} "
                     f"(step {summary['val_step']})")
    else:
        parts.append("not evaluated yet")
    if math.isfinite(summary.get("tokens_per_s", math.nan)):
        parts.append(f"{summary['tokens_per_s']:,.0f} tokens/s")
    return ", ".join(parts)


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
