r"""Fold an adapter run's adapters into its base: an ordinary checkpoint any run can start from.

    python -m experiments.merge --workdir=runs/dora --out=runs/dora_merged [--step=N]

``--out`` becomes a run folder like a training run's: ``config.json`` (the adapter run's config
with the adapters and ``init_from`` cleared and the model section in full) and a checkpoint of
the merged parameters at the same step, with a fresh optimizer state. Continue from it with
``--config.init_from=runs/dora_merged``, or evaluate it like any run.
"""

import os

import jax
import jax.numpy as jnp
import ml_collections
from absl import app, flags, logging
from flax import nnx

from experiments import finetune
from experiments.checkpoint import Checkpointer, write_config
from experiments.optimizers import make_optimizer
from experiments.train_state import TrainState
from lolax.models import peft


def merge_run(workdir: str, out: str, step: int | None = None) -> dict:
    """Writes the merged run to ``out``; returns its config dict."""
    if os.path.isdir(os.path.join(out, "checkpoints")) and os.listdir(os.path.join(out, "checkpoints")):
        raise ValueError(f"--out={out!r} already holds checkpoints; choose a new folder")
    model, saved, step, position = finetune.restore_adapted(workdir, step)
    merged = peft.merge(model)
    config = dict(saved)
    config["peft"] = {**saved["peft"], "method": ""}
    config["init_from"] = ""
    cfg = ml_collections.ConfigDict(config)
    tx = make_optimizer(cfg.optim, cfg.train.steps)
    params = nnx.state(merged, nnx.Param)
    state = TrainState(params=params, opt_state=tx.init(params), step=jnp.asarray(step, jnp.int32),
                       rng=jax.random.key_data(jax.random.key(cfg.seed + 1)))
    write_config(out, config)
    checkpointer = Checkpointer(out, keep=1)
    try:
        checkpointer.save(step, state, position)
    finally:
        checkpointer.close()
    return config


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # orbax logs every file it writes
    f = flags.FLAGS
    merge_run(f.workdir, f.out, f.step)
    print(f"merged {f.workdir} into {f.out}")


def define_flags() -> None:
    """The command line's flags (defined only when run as a script, so that importing
    ``merge_run`` next to other scripts' modules cannot clash over flag names)."""
    flags.DEFINE_string("workdir", None, "The adapter run's folder.")
    flags.DEFINE_string("out", None, "Folder to write the merged run to (must not hold checkpoints).")
    flags.DEFINE_integer("step", None, "Checkpoint to merge (default: the newest).")
    flags.mark_flags_as_required(["workdir", "out"])


if __name__ == "__main__":
    define_flags()
    app.run(main)
