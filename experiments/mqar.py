r"""MQAR: recall accuracy against decode-state size for every mixer (the Zoology / Based figure).

    python -m experiments.mqar                      # CPU default, about 32 minutes on 2 cores, into runs/mqar
    python -m experiments.mqar --out=docs/results   # the same, over the committed results
    python -m experiments.mqar --full               # the paper's sizes (V=8192, L up to 256)
    python -m experiments.mqar --conv_hybrid --d_models=64  # a BaseConv layer before every mixer layer
    python -m experiments.mqar --mixers=gdn,transformer --d_models=64 --steps=500
    python -m experiments.mqar --learning_rates=1e-3,3e-3,1e-2 --seeds=0,1,2   # the protocol: best lr by mean

Each mixer preset is trained at several widths; the x-axis is the number of floats the model keeps
per sequence for decoding (recurrent states and KV caches, see
``experiments.tasks.runner.decode_state_size``). Writes ``OUT/mqar.json``, ``OUT/mqar.md`` (mean
± spread over the seeds) and ``OUT/mqar.png``; ``--out`` is ``runs/mqar`` unless given, so only an
explicit ``--out=docs/results`` replaces the committed files.
"""

from __future__ import annotations

import numpy as np
from absl import app, flags

from experiments.tasks.report import line_plot, write_results
from experiments.tasks.sweeps import mqar_markdown, mqar_sweep

MIXERS = flags.DEFINE_list("mixers", ["linear_attn", "based", "retnet", "gla", "deltanet", "gdn", "transformer"],
                           "Model presets (experiments/configs/presets.py) to compare, or the variants of "
                           "experiments.tasks.sweeps.MQAR_MIXER_SPECS (gdn_no_gate, gdn_sigmoid_gate).")
D_MODELS = flags.DEFINE_list("d_models", ["32", "64", "128"], "Model widths (state size grows with them).")
VOCAB = flags.DEFINE_integer("vocab_size", 256, "MQAR vocabulary (keys below V/2, values above).")
SEQ_LEN = flags.DEFINE_integer("seq_len", 64, "Input length.")
PAIRS = flags.DEFINE_integer("num_pairs", 4, "Key-value pairs per example.")
TRAIN_EXAMPLES = flags.DEFINE_integer("train_examples", 20_000, "Training examples.")
TEST_EXAMPLES = flags.DEFINE_integer("test_examples", 1_000, "Test examples.")
STEPS = flags.DEFINE_integer("steps", 1_500, "Training steps per run.")
BATCH = flags.DEFINE_integer("batch_size", 32, "Batch size.")
LRS = flags.DEFINE_list("learning_rates", ["3e-3"], "Learning rates to sweep; the best test accuracy is kept.")
WINDOW = flags.DEFINE_integer("window", 16, "Sliding-window size for the presets that have one (based, swa); the "
                              "presets' 64 would cover the whole default input. --full uses 64 unless this is given.")
CONV = flags.DEFINE_integer("conv_size", None, "Short-convolution size for the presets that have one (deltanet, gdn: "
                            "4); 0 removes it, to separate the convolution's help from the recurrence's.")
CONV_HYBRID = flags.DEFINE_bool("conv_hybrid", False, "Put a BaseConv layer (conv_size taps) before every mixer "
                                "layer, as Zoology does for every architecture (on by default with --full).")
SEED = flags.DEFINE_integer("seed", 0, "Seed for data and initialisation.")
SEEDS = flags.DEFINE_list("seeds", None, "Seeds to repeat every run with (mean and spread reported, the learning "
                          "rate chosen by the mean); default: --seed alone.")
FULL = flags.DEFINE_bool("full", False, "Paper sizes: V=8192, (L, D) = (64,4), (128,8), (256,16); "
                         "batch 256, lr sweep over logspace(-3, -1.5, 4).")
OUT = flags.DEFINE_string("out", "runs/mqar", "Output folder for mqar.json and mqar.png (--out=docs/results "
                          "regenerates the committed results).")


def main(argv):
    del argv
    if FULL.value:
        vocab, settings, batch = 8192, [(64, 4), (128, 8), (256, 16)], 256
        lrs = [float(x) for x in np.logspace(-3, -1.5, 4)]
    else:
        vocab, settings, batch = VOCAB.value, [(SEQ_LEN.value, PAIRS.value)], BATCH.value
        lrs = [float(x) for x in LRS.value]
    overrides = {"window": 64 if FULL.value and not flags.FLAGS["window"].present else WINDOW.value}
    if CONV.value is not None:
        overrides["conv_size"] = CONV.value
    if CONV_HYBRID.value or (FULL.value and not flags.FLAGS["conv_hybrid"].present):
        overrides["conv_hybrid"] = True
    seeds = [int(x) for x in SEEDS.value] if SEEDS.value else [SEED.value]
    rows = mqar_sweep(MIXERS.value, [int(d) for d in D_MODELS.value], vocab, settings, STEPS.value, batch, lrs,
                      TRAIN_EXAMPLES.value, TEST_EXAMPLES.value, SEED.value, seeds=seeds, **overrides)
    write_results(OUT.value, "mqar", "experiments.mqar", {"vocab_size": vocab, "settings": settings,
                                                            "model_overrides": overrides, "seeds": seeds, "rows": rows})
    with open(f"{OUT.value}/mqar.md", "w") as f:
        f.write(mqar_markdown(rows))
    for seq_len, pairs in settings:
        series = {}
        for mixer in MIXERS.value:
            pts = sorted((r["state_size"], r["accuracy"]) for r in rows
                         if r["mixer"] == mixer and r["seq_len"] == seq_len)
            series[mixer] = ([p[0] for p in pts], [p[1] for p in pts])
        suffix = "" if len(settings) == 1 else f"_L{seq_len}"
        line_plot(f"{OUT.value}/mqar{suffix}.png", series, "decode state size (floats per sequence)",
                  "MQAR accuracy", f"MQAR V={vocab} L={seq_len} D={pairs}"
                  + ("" if CONV.value is None else f", conv_size={CONV.value}")
                  + (", BaseConv hybrids" if CONV_HYBRID.value else ""), logx=True)


if __name__ == "__main__":
    app.run(main)
