r"""LRA ListOps accuracy per mixer.

    python -m experiments.listops                 # CPU default: trees of 32 to 256 tokens, about 31 minutes
    python -m experiments.listops --out=docs/results   # the same, over the committed results
    python -m experiments.listops --full          # LRA sizes: 500 < length < 2000, 96k training trees
    python -m experiments.listops --mixers=gla,transformer --steps=500

A causal model reads the whole expression and predicts the answer digit at its last token.
Writes ``OUT/listops.json`` and ``OUT/listops.png``; ``--out`` is ``runs/listops`` unless given, so
only an explicit ``--out=docs/results`` replaces the committed files.
"""

from __future__ import annotations

import numpy as np
from absl import app, flags

from experiments.tasks import generate_listops
from experiments.tasks.report import bar_plot, write_results
from experiments.tasks.sweeps import listops_sweep

MIXERS = flags.DEFINE_list("mixers", ["transformer", "linear_attn", "retnet", "gla", "deltanet", "gdn"],
                           "Model presets to compare.")
MIN_LEN = flags.DEFINE_integer("min_length", 32, "Trees longer than this (tokens).")
MAX_LEN = flags.DEFINE_integer("max_length", 256, "Trees shorter than this (tokens).")
MAX_DEPTH = flags.DEFINE_integer("max_depth", 6, "Maximum tree depth.")
MAX_ARGS = flags.DEFINE_integer("max_args", 5, "Maximum operator arguments.")
TRAIN = flags.DEFINE_integer("train_examples", 8_000, "Training trees.")
TEST = flags.DEFINE_integer("test_examples", 1_000, "Test trees.")
D_MODEL = flags.DEFINE_integer("d_model", 64, "Model width.")
LAYERS = flags.DEFINE_integer("num_layers", 2, "Layers.")
STEPS = flags.DEFINE_integer("steps", 1_500, "Training steps.")
BATCH = flags.DEFINE_integer("batch_size", 32, "Batch size.")
LR = flags.DEFINE_float("learning_rate", 1e-3, "Peak learning rate.")
SEED = flags.DEFINE_integer("seed", 0, "Seed.")
FULL = flags.DEFINE_bool("full", False, "LRA sizes: 500 < length < 2000, depth 10, 10 args, 96k/2k trees, "
                         "4 layers of width 512, 5000 steps.")
OUT = flags.DEFINE_string("out", "runs/listops", "Output folder (--out=docs/results regenerates the committed "
                          "results).")


def main(argv):
    del argv
    if FULL.value:
        lo, hi, depth, args, n_train, n_test, d, layers, steps = 500, 2000, 10, 10, 96_000, 2_000, 512, 4, 5_000
    else:
        lo, hi, depth, args = MIN_LEN.value, MAX_LEN.value, MAX_DEPTH.value, MAX_ARGS.value
        n_train, n_test, d, layers, steps = TRAIN.value, TEST.value, D_MODEL.value, LAYERS.value, STEPS.value
    data = generate_listops(n_train + n_test, max_depth=depth, max_args=args, min_length=lo, max_length=hi,
                            seed=SEED.value)
    train = {k: v[:n_train] for k, v in data.items()}
    test = {k: v[n_train:] for k, v in data.items()}
    majority = float(np.max(np.bincount(test["answers"], minlength=10)) / n_test)
    rows = listops_sweep(MIXERS.value, train, test, BATCH.value, d, layers, steps, LR.value, SEED.value)
    write_results(OUT.value, "listops", "experiments.listops",
                  {"min_length": lo, "max_length": hi, "max_depth": depth, "max_args": args,
                   "majority_class_accuracy": majority, "rows": rows})
    bar_plot(f"{OUT.value}/listops.png", [r["mixer"] for r in rows], [r["accuracy"] for r in rows],
             "test accuracy", f"ListOps ({lo} < length < {hi})", baseline=("majority class", majority))

if __name__ == "__main__":
    app.run(main)
