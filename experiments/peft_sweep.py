r"""Adapters against full fine-tuning on texts the model never saw: bits per byte vs trainable values.

    python -m experiments.peft_sweep --out=runs/peft_sweep [--results=docs/results]

1. Pretrains ``make train``'s model (``experiments/configs/lm_shakespeare.py``, unchanged) on the
   plays of the embedded corpus, without Shakespeare's poems (sonnets, Lucrece and the short
   poems): a style (verse without speakers or stage directions) the model has not seen.
2. Measures the pretrained model on the poems' validation split (no adaptation).
3. Fine-tunes it on the poems once per entry of ``RUNS``: every adapter method on the attention
   projections at comparable budgets, and full fine-tuning, each for ``--steps`` steps.
4. Writes ``peft_sweep.json``, a Markdown table and ``peft_sweep.png`` (validation bits per byte
   against trainable values) to ``--results``.

Everything runs in this process, in order; rerunning with the same ``--out`` resumes finished
runs from their checkpoints (they are not retrained) and reports them again. The DyLoRA run is
also evaluated cut to ranks 1, 2 and 4 without retraining. On 2 CPU cores the whole sweep takes
about 50 minutes (the table's last column).
"""

from __future__ import annotations

import json
import math
import os
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from absl import app, flags, logging  # noqa: E402
from flax import nnx  # noqa: E402

from experiments import finetune  # noqa: E402
from experiments.configs.lm_shakespeare import get_config  # noqa: E402
from experiments.data import eval_windows, load_corpus  # noqa: E402
from experiments.data.corpus import default_corpus_files  # noqa: E402
from experiments.metrics import read_metrics  # noqa: E402
from experiments.train_state import evaluate, make_eval_step  # noqa: E402
from experiments.trainer import train  # noqa: E402
from lolax.models import peft  # noqa: E402

HELD_OUT = ("sonnets", "rape_of_lucrece", "lovers_complaint", "passionate_pilgrim", "phoenix_and_the_turtle")
ATTENTION = "q_proj,k_proj,v_proj,o_proj"

# (name, peft fields or None for full fine-tuning, learning rate). Methods that train a few
# coefficients per layer get a larger learning rate; no rate was tuned per method.
RUNS = (
    ("full fine-tuning", None, 1e-3),
    ("lora r=8", {"method": "lora", "rank": 8}, 3e-3),
    ("rslora r=8", {"method": "rslora", "rank": 8}, 3e-3),
    ("dora r=8", {"method": "dora", "rank": 8}, 3e-3),
    ("dylora r<=8", {"method": "dylora", "rank": 8}, 3e-3),
    ("eva r=8", {"method": "eva", "rank": 8}, 3e-3),
    ("randlora r=8", {"method": "randlora", "rank": 8}, 3e-3),
    ("lora r=1", {"method": "lora", "rank": 1}, 3e-3),
    ("nola 64+64", {"method": "nola", "rank": 8, "num_bases": 64}, 1e-2),
    ("lora_sb r=8", {"method": "lora_sb", "rank": 8}, 1e-2),
    ("svfit r=32", {"method": "svfit", "rank": 32}, 1e-2),
    ("loldu r=32", {"method": "loldu", "rank": 32}, 1e-2),
)

def split_corpus(out: str) -> tuple[str, str]:
    """Folders of links to the embedded texts: the plays (pretraining) and the poems (held out)."""
    plays, poems = os.path.join(out, "data", "plays"), os.path.join(out, "data", "poems")
    for folder in (plays, poems):
        os.makedirs(folder, exist_ok=True)
    for path in default_corpus_files():
        name = os.path.basename(path)
        folder = poems if name.startswith(HELD_OUT) else plays
        link = os.path.join(folder, name)
        if not os.path.exists(link):
            os.symlink(path, link)
    return plays, poems


def base_config(data_path: str, steps: int):
    c = get_config()
    c.data.path = data_path
    c.train.steps = steps
    c.train.sample_tokens = 0
    return c


def finetune_config(data_path: str, base: str, steps: int, peft_fields: dict | None, lr: float):
    c = base_config(data_path, steps)
    c.data.val_fraction = 0.1          # the poems are short: keep ~20 KB of them for validation
    c.train.eval_batches = 4
    c.train.eval_every = c.train.checkpoint_every = steps
    c.train.log_every = 25
    c.init_from = base
    c.optim.learning_rate, c.optim.warmup_steps = lr, max(steps // 10, 1)
    c.optim.weight_decay = 0.0         # decay would pull DoRA's magnitudes and SVFit's offsets to 0
    if peft_fields:
        c.peft.targets = ATTENTION
        for key, value in peft_fields.items():
            c.peft[key] = value
    return c


def held_out_bpb(model: nnx.Module, c) -> float:
    """Validation bits per byte of ``model`` on the held-out split of config ``c``."""
    graphdef, params = nnx.split(model)
    corpus = load_corpus(c.data.path, c.data.val_fraction, c.data.tokenizer)
    batches = eval_windows(corpus.val, c.data.batch_size, c.data.seq_len, c.train.eval_batches, corpus.val_bytes)
    return evaluate(make_eval_step(graphdef), params, batches)["bpb"]


def zero_shot(base: str, c) -> float:
    """The pretrained model on the held-out split, before any adaptation."""
    loaded = finetune.load_base(base)
    return held_out_bpb(finetune.build_model(loaded.model, c.seed, loaded, None)[0], c)


def final_bpb(workdir: str) -> float:
    """The run's last validation bits per byte (also for a run that was finished already)."""
    val = [r for r in read_metrics(os.path.join(workdir, "metrics.jsonl")) if r.get("split") == "val"]
    return val[-1]["bpb"] if val else math.nan


def timed(workdir: str, start: float) -> float:
    """Minutes this run took: measured now, or, for a run finished by an earlier invocation, the
    minutes recorded then (``WORKDIR/sweep_run.json``), so a rerun reports the original times."""
    record = os.path.join(workdir, "sweep_run.json")
    if os.path.exists(record):
        with open(record) as f:
            return json.load(f)["minutes"]
    minutes = (time.perf_counter() - start) / 60
    with open(record, "w") as f:
        json.dump({"minutes": minutes}, f)
    return minutes


def dylora_ranks(workdir: str, c, ranks=(1, 2, 4)) -> list[dict]:
    """The trained DyLoRA adapters cut to smaller ranks, without retraining."""
    model, *_ = finetune.restore_adapted(workdir)
    rows = []
    for rank in ranks:
        peft.set_rank(model, rank)
        trainable = sum(rank * (layer.in_features + layer.out_features) for _, layer in peft.adapted_layers(model))
        rows.append({"name": f"dylora cut to r={rank}", "trainable": trainable, "val_bpb": held_out_bpb(model, c),
                     "minutes": 0.0})
    return rows


def write_results(results: list[dict], folder: str) -> None:
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "peft_sweep.json"), "w") as f:
        json.dump(results, f, indent=2)
    lines = ["| run | trainable values | validation bits per byte | minutes |", "|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['name']} | {r['trainable']:,} | {r['val_bpb']:.4f} | {r['minutes']:.1f} |")
    with open(os.path.join(folder, "peft_sweep.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    fig, ax = plt.subplots(figsize=(9, 4.8))
    markers = "osD^vP*Xhp<>"
    for i, r in enumerate(results):
        if r["trainable"] == 0:
            ax.axhline(r["val_bpb"], color="grey", ls="--", lw=1, label=r["name"])
            continue
        ax.scatter(r["trainable"], r["val_bpb"], s=40, marker=markers[i % len(markers)],
                   color=plt.cm.tab20(i % 20), label=f"{r['name']} ({r['val_bpb']:.3f})")
    ax.set_xscale("log")
    ax.set_xlabel("trainable values")
    ax.set_ylabel("validation bits per byte (held-out poems)")
    ax.set_title("Adapting a model pretrained on the plays to the poems")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.savefig(os.path.join(folder, "peft_sweep.png"), dpi=120)
    plt.close(fig)


def sweep(out: str, results_dir: str, steps: int, pretrain_steps: int, only: list[str] | None) -> list[dict]:
    plays, poems = split_corpus(out)
    base = os.path.join(out, "pretrain")
    start = time.perf_counter()
    train(base_config(plays, pretrain_steps), base, show_progress=False)
    print(f"pretrained on the plays: {final_bpb(base):.4f} bits per byte on their validation split")
    results = [{"name": "pretrained, not adapted", "trainable": 0,
                "val_bpb": zero_shot(base, finetune_config(poems, base, steps, None, 0.0)),
                "minutes": timed(base, start)}]
    for name, fields, lr in RUNS:
        if only and name not in only:
            continue
        start = time.perf_counter()
        workdir = os.path.join(out, name.replace(" ", "_").replace("=", "").replace("<", "").replace("+", "_"))
        c = finetune_config(poems, base, steps, fields, lr)
        summary = train(c, workdir, show_progress=False)
        results.append({"name": name, "trainable": summary["trainable_params"], "val_bpb": final_bpb(workdir),
                        "learning_rate": lr, "steps": steps, "peft": fields,
                        "minutes": timed(workdir, start)})
        print(f"{name}: {summary['trainable_params']:,} trainable, {results[-1]['val_bpb']:.4f} bits per byte")
        if fields and fields["method"] == "dylora":
            results.extend(dylora_ranks(workdir, c))
        write_results(results, results_dir)
    write_results(results, results_dir)
    return results


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    f = flags.FLAGS
    results = sweep(f.out, f.results or f.out, f.steps, f.pretrain_steps, f.only)
    best = min(results, key=lambda r: r["val_bpb"] if not math.isnan(r["val_bpb"]) else math.inf)
    print(f"best: {best['name']} ({best['val_bpb']:.4f} bits per byte)")


def define_flags() -> None:
    """The command line's flags (defined only when run as a script; see ``experiments.merge``)."""
    flags.DEFINE_string("out", "runs/peft_sweep", "Folder for the runs and the data split.")
    flags.DEFINE_string("results", None, "Folder for the JSON, table and plot (default: --out).")
    flags.DEFINE_integer("steps", 300, "Fine-tuning steps per run.")
    flags.DEFINE_integer("pretrain_steps", 1000, "Pretraining steps (make train: 1000).")
    flags.DEFINE_list("only", None, "Run only these entries of RUNS (by name).")


if __name__ == "__main__":
    define_flags()
    app.run(main)
