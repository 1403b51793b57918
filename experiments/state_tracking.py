r"""Parity and modular counting: length generalisation of DeltaNet / Gated DeltaNet, beta in [0,1] vs [0,2].

    python -m experiments.state_tracking                 # CPU default, under 30 minutes on 2 cores
    python -m experiments.state_tracking --out=docs/results   # the same, over the committed results
    python -m experiments.state_tracking --full          # 3 seeds, longer training, S3 and mod 5 too
    python -m experiments.state_tracking --tasks=parity --mixers=deltanet,deltanet_neg --steps=500

Models train on sequences of ``train_length`` tokens with the running state as the label at every
position (so every prefix length up to ``train_length`` is supervised), then are tested on longer
sequences, scored on the final token only. Accuracy is reported raw and normalised so that chance
is 0 and perfect is 1: ``(acc - 1/m) / (1 - 1/m)`` for m states. ``*_neg`` mixers use
``allow_neg_eigval`` (beta = 2 sigmoid, eigenvalues of the transition in [-1, 1]).
Writes ``OUT/state_tracking.json`` and ``OUT/state_tracking_<task>.png``; ``--out`` is
``runs/state_tracking`` unless given, so only an explicit ``--out=docs/results`` replaces the
committed files.
"""

from __future__ import annotations

import numpy as np
from absl import app, flags

from experiments.tasks.report import line_plot, write_results
from experiments.tasks.sweeps import MIXER_SPECS, state_tracking_sweep

TASKS = flags.DEFINE_list("tasks", ["parity", "mod3"], "Tasks: parity, mod3, mod5, s3, s5.")
MIXERS = flags.DEFINE_list("mixers", ["deltanet", "deltanet_neg", "gdn", "gdn_neg"],
                           f"Mixers: {', '.join(MIXER_SPECS)}.")
TRAIN_LEN = flags.DEFINE_integer("train_length", 40, "Training sequence length.")
TEST_LENS = flags.DEFINE_list("test_lengths", ["40", "64", "128", "256"], "Test sequence lengths.")
D_MODEL = flags.DEFINE_integer("d_model", 64, "Model width.")
LAYERS = flags.DEFINE_integer("num_layers", 2, "Layers.")
STEPS = flags.DEFINE_integer("steps", 1_500, "Training steps.")
BATCH = flags.DEFINE_integer("batch_size", 64, "Batch size.")
LR = flags.DEFINE_float("learning_rate", 3e-3, "Peak learning rate.")
SEEDS = flags.DEFINE_list("seeds", ["0"], "Seeds (results averaged).")
TEST_EXAMPLES = flags.DEFINE_integer("test_examples", 500, "Test sequences per length.")
FULL = flags.DEFINE_bool("full", False, "Paper protocol: 3 seeds, 5000 steps, tasks parity/mod3/mod5/s3.")
OUT = flags.DEFINE_string("out", "runs/state_tracking", "Output folder (--out=docs/results regenerates the "
                          "committed results).")


def main(argv):
    del argv
    tasks, seeds, steps = TASKS.value, [int(s) for s in SEEDS.value], STEPS.value
    if FULL.value:
        tasks, seeds, steps = ["parity", "mod3", "mod5", "s3"], [0, 1, 2], 5_000
    lengths = [int(n) for n in TEST_LENS.value]
    rows = state_tracking_sweep(tasks, MIXERS.value, TRAIN_LEN.value, lengths, D_MODEL.value, LAYERS.value, steps,
                                BATCH.value,
               LR.value, seeds, TEST_EXAMPLES.value)
    write_results(OUT.value, "state_tracking", "experiments.state_tracking",
                  {"train_length": TRAIN_LEN.value, "rows": rows})
    for task in tasks:
        series = {}
        for mixer in MIXERS.value:
            ys = [float(np.mean([r["normalized"] for r in rows if r["task"] == task and r["mixer"] == mixer
                                 and r["length"] == n])) for n in lengths]
            series[mixer] = (lengths, ys)
        line_plot(f"{OUT.value}/state_tracking_{task}.png", series, "test length",
                  "normalised accuracy (chance 0)", f"{task}: trained on length {TRAIN_LEN.value}")


if __name__ == "__main__":
    app.run(main)
