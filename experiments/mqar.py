r"""MQAR: recall accuracy against decode-state size for every mixer (the Zoology / Based figure).

    python -m experiments.mqar                      # CPU default, about 32 minutes on 2 cores, into runs/mqar
    python -m experiments.mqar --out=docs/results   # the same, over the committed results
    python -m experiments.mqar --full               # the paper's sizes (V=8192, L up to 256)
    python -m experiments.mqar --conv_hybrid --d_models=64  # a BaseConv layer before every mixer layer
    python -m experiments.mqar --mixers=gdn,transformer --d_models=64 --steps=500
    python -m experiments.mqar --learning_rates=1e-3,3e-3,1e-2 --seeds=0,1,2   # best lr by mean over seeds
    python -m experiments.mqar --learning_rates=1e-3,3e-3,1e-2 --seeds=0,1,2 --lr_selection=first_seed
    python -m experiments.mqar --seq_len=128 --num_pairs=8 --lr_from=runs/mqar/mqar.json --seeds=0,1,2
    python -m experiments.mqar --merge=runs/a,runs/b --out=docs/results   # one table and plot from several runs

Each mixer preset is trained at several widths; the x-axis is the number of floats the model keeps
per sequence for decoding (recurrent states and KV caches, see
``experiments.tasks.runner.decode_state_size``). Writes ``OUT/mqar.json``, ``OUT/mqar.md`` (mean
± spread over the seeds) and ``OUT/mqar.png``; ``--out`` is ``runs/mqar`` unless given, so only an
explicit ``--out=docs/results`` replaces the committed files. The files are rewritten after every
(mixer, width) finishes, so a long sweep that is stopped keeps what it finished.
"""

from __future__ import annotations

import json
import os

import numpy as np
from absl import app, flags

from experiments.tasks.report import line_plot, write_results
from experiments.tasks.sweeps import LR_SELECTIONS, mqar_markdown, mqar_sweep

MIXERS = flags.DEFINE_list("mixers", ["linear_attn", "based", "retnet", "gla", "deltanet", "gdn", "transformer"],
                           "Model presets (experiments/configs/presets.py) to compare, or the variants of "
                           "experiments.tasks.sweeps.MQAR_MIXER_SPECS (gdn_no_gate, gdn_sigmoid_gate, "
                           "deltanet_no_conv, gdn_no_conv, gdn_no_gate_no_conv).")
D_MODELS = flags.DEFINE_list("d_models", ["32", "64", "128"], "Model widths (state size grows with them).")
VOCAB = flags.DEFINE_integer("vocab_size", 256, "MQAR vocabulary (keys below V/2, values above).")
SEQ_LEN = flags.DEFINE_integer("seq_len", 64, "Input length.")
PAIRS = flags.DEFINE_integer("num_pairs", 4, "Key-value pairs per example.")
LR_SELECTION = flags.DEFINE_enum("lr_selection", "all_seeds", LR_SELECTIONS,
                                 "all_seeds: every rate on every seed, best mean kept; first_seed: every rate on "
                                 "the first seed, only the best one on the others.")
LR_FROM = flags.DEFINE_string("lr_from", None, "An mqar.json whose kept learning rate per (mixer, d_model) is "
                              "reused on every seed instead of sweeping (pairs it lacks are swept; with several "
                              "lengths in it, the last row of a pair wins).")
MERGE = flags.DEFINE_list("merge", None, "Folders (or mqar.json files) of earlier runs: write one mqar.json, "
                          "mqar.md and plot per length into --out from their rows, training nothing.")
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


def write_outputs(out: str, rows: list[dict], payload: dict, title_suffix: str = "") -> None:
    """``OUT/mqar.json`` (``payload`` and the rows), ``OUT/mqar.md`` and one plot per input length."""
    write_results(out, "mqar", "experiments.mqar", {**payload, "rows": rows})
    with open(f"{out}/mqar.md", "w") as f:
        f.write(mqar_markdown(rows))
    lengths = sorted({(r["seq_len"], r["num_pairs"]) for r in rows})
    for seq_len, pairs in lengths:
        series = {}
        for mixer in dict.fromkeys(r["mixer"] for r in rows):
            pts = sorted((r["state_size"], r["accuracy"], r.get("accuracy_std", 0.0)) for r in rows
                         if r["mixer"] == mixer and r["seq_len"] == seq_len)
            if pts:
                series[mixer] = tuple(list(column) for column in zip(*pts))
        suffix = "" if len(lengths) == 1 else f"_L{seq_len}"
        line_plot(f"{out}/mqar{suffix}.png", series, "decode state size (floats per sequence)",
                  "MQAR accuracy (mean ± std over seeds)",
                  f"MQAR V={payload['vocab_size']} L={seq_len} D={pairs}{title_suffix}", logx=True)


def _load_rows(path: str) -> dict:
    with open(os.path.join(path, "mqar.json") if os.path.isdir(path) else path) as f:
        return json.load(f)


def merge(paths: list[str], out: str) -> None:
    """One set of outputs from several runs' rows; a later run's row replaces an earlier one's."""
    records = [_load_rows(p) for p in paths]
    vocabs = {r["vocab_size"] for r in records}
    if len(vocabs) != 1:
        raise ValueError(f"--merge needs runs with one vocabulary, got vocab_size {sorted(vocabs)} in {paths}")
    rows = {}
    for record in records:
        for row in record["rows"]:
            rows[(row["seq_len"], row["num_pairs"], row["mixer"], row["d_model"])] = row
    write_outputs(out, list(rows.values()), {"vocab_size": vocabs.pop(), "merged_from": {
        p: {k: r.get(k) for k in ("command", "date", "model_overrides", "seeds")} for p, r in zip(paths, records)}})


def main(argv):
    del argv
    if MERGE.value:
        merge(MERGE.value, OUT.value)
        return
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
    fixed_lrs = None
    if LR_FROM.value:
        fixed_lrs = {(r["mixer"], r["d_model"]): r["learning_rate"] for r in _load_rows(LR_FROM.value)["rows"]}
    payload = {"vocab_size": vocab, "settings": settings, "model_overrides": overrides, "seeds": seeds,
               "steps": STEPS.value, "learning_rates": lrs, "lr_selection": LR_SELECTION.value,
               "lr_from": LR_FROM.value}
    title = ("" if CONV.value is None else f", conv_size={CONV.value}") + (
        ", BaseConv hybrids" if overrides.get("conv_hybrid") else "")
    mqar_sweep(MIXERS.value, [int(d) for d in D_MODELS.value], vocab, settings, STEPS.value, batch, lrs,
               TRAIN_EXAMPLES.value, TEST_EXAMPLES.value, SEED.value, seeds=seeds, lr_selection=LR_SELECTION.value,
               fixed_lrs=fixed_lrs, on_row=lambda rows: write_outputs(OUT.value, rows, payload, title), **overrides)


if __name__ == "__main__":
    app.run(main)
