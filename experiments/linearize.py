r"""Linearise a trained softmax Transformer: attention transfer, then LoRA recovery.

    python -m experiments.linearize --config=experiments/configs/linearize.py \
        --config.teacher=runs/teacher --config.method=lolcats --workdir=runs/lolcats

The teacher is a lolax run folder or a Hugging Face checkpoint folder.  ``--workdir`` receives

- ``transfer/``: stage 1 (skipped by ``liger``, which adds no parameters): the new parameters of
  every replaced layer learn to reproduce the teacher's attention output on the teacher's hidden
  states (``experiments/transfer.py``), with checkpoints and ``metrics.jsonl``;
- ``student/``: the student after stage 1, an ordinary run folder;
- ``recovery/``: stage 2, an adapter run of the training script: LoRA on the attention
  projections, language-model loss, starting from ``student/``;
- ``final/``: the adapters folded in (``experiments.merge``): an ordinary run folder that
  generates (``python -m experiments.generate --model=.../final``), trains further
  (``--config.init_from``) and runs on the kernels;
- ``linearize.json``: what was copied and trained, tokens used, and the validation figures.

Rerunning with the same ``--workdir`` resumes whichever stage was interrupted.
"""

from __future__ import annotations

import json
import math
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags, logging
from flax import nnx
from tqdm import tqdm

from experiments import finetune, transfer
from experiments.checkpoint import Checkpointer, abstract_like, write_config
from experiments.configs.lm_shakespeare import get_config as training_config
from experiments.data import BatchIterator, eval_windows, load_corpus, load_tokenizer
from experiments.merge import merge_run
from experiments.metrics import MetricsWriter
from experiments.optimizers import make_optimizer
from experiments.train_state import TrainState, evaluate, make_eval_step
from experiments.trainer import check_vocab, train
from lolax.models import LanguageModel, ModelConfig

SETTINGS = ("teacher", "method", "target", "window", "hedgehog_dim", "seed")
"""The settings a workdir is tied to: a rerun with others is refused."""


def load_teacher(path: str, runtime: dict) -> LanguageModel:
    """The teacher model from a lolax run folder or a Hugging Face checkpoint folder."""
    if not path:
        raise ValueError("config.teacher is empty: pass --config.teacher=RUN_FOLDER (or a Hugging Face "
                         "checkpoint folder)")
    base = finetune.load_base(path)
    cfg = ModelConfig.from_dict({**base.model.to_dict(), **runtime, "scan_layers": False})
    if base.model.scan_layers:
        raise ValueError(f"teacher {path!r} was trained with model.scan_layers = True; linearisation needs "
                         "its layers unstacked")
    return finetune.model_from_base(base, cfg)


def _check_settings(workdir: str, config: ml_collections.ConfigDict) -> None:
    path = os.path.join(workdir, "linearize_config.json")
    current = {k: config[k] for k in SETTINGS}
    if os.path.exists(path):
        with open(path) as f:
            saved = {k: v for k, v in json.load(f).items() if k in SETTINGS}
        diffs = [f"{k}: workdir has {saved.get(k)!r}, config has {current[k]!r}"
                 for k in SETTINGS if saved.get(k) != current[k]]
        if diffs:
            raise ValueError(f"workdir {workdir!r} holds a linearisation with other settings:\n  "
                             + "\n  ".join(diffs) + "\nUse a new --workdir, or the same settings to resume.")
    os.makedirs(workdir, exist_ok=True)
    with open(path, "w") as f:
        json.dump(config.to_dict(), f, indent=2, sort_keys=True)


def stage_config(config: ml_collections.ConfigDict, student_dir: str) -> ml_collections.ConfigDict:
    """The training-script config of stage 2: LoRA on the student in ``student_dir``."""
    c, r = training_config(), config.recovery
    c.seed = config.seed
    for key, value in config.data.items():
        c.data[key] = value
    for section in ("model", "mesh"):
        for key, value in config[section].items():
            c[section][key] = value
    c.init_from = student_dir
    c.peft.method = "lora"
    c.peft.rank, c.peft.alpha, c.peft.dropout, c.peft.targets = r.rank, r.alpha, r.dropout, r.targets
    c.optim.name = "adamw"
    c.optim.learning_rate, c.optim.warmup_steps = r.learning_rate, r.warmup_steps
    c.optim.weight_decay = 0.0
    t = c.train
    t.steps, t.log_every, t.eval_every, t.eval_batches = r.steps, r.log_every, r.eval_every, r.eval_batches
    t.checkpoint_every, t.keep_checkpoints = r.checkpoint_every, 2
    t.sample_tokens, t.sample_prompt = r.sample_tokens, r.sample_prompt
    return c


def transfer_optimizer(config: ml_collections.ConfigDict):
    t = config.transfer
    optim = ml_collections.ConfigDict({
        "name": "adamw", "learning_rate": t.learning_rate, "warmup_steps": t.warmup_steps, "min_lr_ratio": 0.1,
        "weight_decay": 0.0, "b1": 0.9, "b2": 0.999, "grad_clip": 1.0, "rank": -1, "update_proj_gap": -1,
        "scale": -1.0})
    return make_optimizer(optim, t.steps)


def export_run(out: str, params: nnx.State, model_cfg: ModelConfig, config: ml_collections.ConfigDict,
               step: int = 0) -> None:
    """Writes ``params`` as an ordinary run folder (config, checkpoint with a fresh optimizer state)."""
    saved = config.to_dict()
    saved["model"] = {**model_cfg.to_dict(), "preset": ""}
    saved["init_from"] = ""
    saved["peft"] = {**saved["peft"], "method": ""}
    cfg = ml_collections.ConfigDict(saved)
    tx = make_optimizer(cfg.optim, cfg.train.steps)
    state = TrainState(params=params, opt_state=tx.init(params), step=jnp.asarray(step, jnp.int32),
                       rng=jax.random.key_data(jax.random.key(cfg.seed + 1)))
    write_config(out, saved)
    checkpointer = Checkpointer(out, keep=1)
    try:
        checkpointer.save(step, state, {"epoch": 0, "index": 0})
    finally:
        checkpointer.close()


def run_transfer(config: ml_collections.ConfigDict, workdir: str, student: transfer.Student,
                 teacher: LanguageModel, corpus, show_progress: bool = True) -> tuple[nnx.State, dict]:
    """Stage 1 (resumable): returns the student's parameters and the last metrics."""
    t, d = config.transfer, config.data
    tx = transfer_optimizer(config)
    graphdef, state = transfer.init_transfer(student, tx)
    batches = BatchIterator(corpus.train, d.batch_size, d.seq_len, config.seed)
    val = [b["inputs"] for b in eval_windows(corpus.val, d.batch_size, d.seq_len, t.eval_batches, corpus.val_bytes)]
    folder = os.path.join(workdir, "transfer")
    checkpointer = Checkpointer(folder, keep=2)
    start = checkpointer.latest_step()
    if start is not None:
        state, position = checkpointer.restore(start, abstract_like(state))
        batches.restore(position)
        print(f"attention transfer resumed from step {start}")
    step_fn = transfer.transfer_step(graphdef, teacher, tx, student.new, student.replaced)
    eval_fn = transfer.transfer_eval(graphdef, teacher, student.replaced)
    writer = MetricsWriter(folder)
    step = int(state.step)
    last = {"train_mse": math.nan, "val_mse": math.nan}
    bar = tqdm(total=t.steps, initial=step, disable=not show_progress, dynamic_ncols=True, unit="step",
               desc="attention transfer")
    try:
        while step < t.steps:
            state, mse = step_fn(state, jnp.asarray(next(batches)["inputs"]))
            step += 1
            bar.update(1)
            if step % t.log_every == 0 or step == t.steps:
                last["train_mse"] = float(mse)
                bar.set_postfix(mse=f"{last['train_mse']:.3g}")
                writer.write({"step": step, "split": "train", "mse": last["train_mse"], "time": time.time()})
            if step % t.eval_every == 0 or step == t.steps:
                last["val_mse"] = float(np.mean([float(eval_fn(state.params, jnp.asarray(x))) for x in val]))
                writer.write({"step": step, "split": "val", "mse": last["val_mse"], "time": time.time()})
                bar.write(f"transfer step {step}: validation mse {last['val_mse']:.4g}")
            if step % t.checkpoint_every == 0 or step == t.steps:
                checkpointer.save(step, state, batches.position())
    finally:
        bar.close()
        checkpointer.close()
    if math.isnan(last["val_mse"]):
        last["val_mse"] = float(np.mean([float(eval_fn(state.params, jnp.asarray(x))) for x in val]))
    return state.params, last


def validation_bpb(model: LanguageModel, corpus, config: ml_collections.ConfigDict, batches: int) -> float:
    graphdef, params = nnx.split(model, nnx.Param)
    val = eval_windows(corpus.val, config.data.batch_size, config.data.seq_len, batches, corpus.val_bytes)
    return evaluate(make_eval_step(graphdef), params, val)["bpb"]


def linearize(config: ml_collections.ConfigDict, workdir: str, show_progress: bool = True) -> dict:
    """Runs (or resumes) the whole pipeline in ``workdir``; returns the summary it writes."""
    _check_settings(workdir, config)
    runtime = {k: v for k, v in config.model.items()}
    teacher = load_teacher(config.teacher, runtime)
    student_cfg = transfer.student_config(teacher.config, config.method, config.target, config.window,
                                          config.hedgehog_dim or None)
    student = transfer.build_student(teacher, student_cfg, config.seed)
    tokenizer = load_tokenizer(config.data.tokenizer)
    check_vocab(tokenizer, teacher.config, config.teacher)
    corpus = load_corpus(config.data.path, config.data.val_fraction, tokenizer)
    print(f"student layers {','.join(student_cfg.layer_kinds)}: {len(student.copied)} parameter arrays copied "
          f"from the teacher, {len(student.new)} new "
          f"({sum(int(np.prod(v.shape)) for p, v in _named(student.model) if p in set(student.new)):,} values)")
    tokens_per_step = config.data.batch_size * config.data.seq_len
    summary: dict = {"method": config.method, "student_pattern": ",".join(student_cfg.layer_kinds),
                     "copied": len(student.copied), "new": list(student.new)}
    eval_batches = config.recovery.eval_batches
    summary["teacher_val_bpb"] = validation_bpb(teacher, corpus, config, eval_batches)
    student_dir = os.path.join(workdir, "student")
    stage2 = stage_config(config, student_dir)
    transfer_steps = config.transfer.steps if student.new else 0
    if not os.path.isdir(os.path.join(student_dir, "checkpoints")):
        if transfer_steps:
            params, metrics = run_transfer(config, workdir, student, teacher, corpus, show_progress)
            nnx.update(student.model, params)
            summary.update(metrics)
        export_run(student_dir, nnx.state(student.model, nnx.Param), student_cfg, stage2)
    else:
        nnx.update(student.model, finetune.load_base(student_dir).params)
    summary["student_val_bpb"] = validation_bpb(student.model, corpus, config, eval_batches)
    recovery_dir, final_dir = os.path.join(workdir, "recovery"), os.path.join(workdir, "final")
    if not os.path.isdir(os.path.join(final_dir, "checkpoints")):
        result = train(stage2, recovery_dir, show_progress=show_progress)
        summary["recovery_trainable"] = result["trainable_params"]
        merge_run(recovery_dir, final_dir)
    model = finetune.model_from_base(finetune.load_base(final_dir))
    summary["final_val_bpb"] = validation_bpb(model, corpus, config, eval_batches)
    summary["tokens"] = {"transfer": transfer_steps * tokens_per_step,
                         "recovery": config.recovery.steps * tokens_per_step}
    summary["tokens"]["total"] = summary["tokens"]["transfer"] + summary["tokens"]["recovery"]
    with open(os.path.join(workdir, "linearize.json"), "w") as f:
        json.dump(summary, f, indent=2)
    return summary


def _named(model: nnx.Module):
    return (("/".join(map(str, p)), v) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param)))


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    summary = linearize(flags.FLAGS.config, flags.FLAGS.workdir)
    print(f"teacher {summary['teacher_val_bpb']:.4f} bits per byte; student after transfer "
          f"{summary['student_val_bpb']:.4f}; after recovery {summary['final_val_bpb']:.4f} "
          f"({summary['tokens']['total']:,} tokens); result in {os.path.join(flags.FLAGS.workdir, 'final')}")


def define_flags() -> None:
    """The command line's flags (defined only when run as a script)."""
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", "experiments/configs/linearize.py",
                                    "Path to the linearisation config file.", lock_config=True)
    flags.DEFINE_string("workdir", None, "Folder for the stages' checkpoints and the result.")
    flags.mark_flags_as_required(["workdir"])


if __name__ == "__main__":
    from experiments.cli import parse_flags

    define_flags()
    app.run(main, flags_parser=parse_flags)
