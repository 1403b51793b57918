r"""Linearisation against training from scratch, on the embedded corpus: quality, tokens, decoding.

    python -m experiments.linearize_repro --out=runs/linearize_repro [--results=docs/results]

1. Trains the teacher (``experiments/configs/lm_teacher.py``: four softmax layers with grouped
   heads) unless ``--out`` already holds it.
2. Linearises it three ways with ``experiments.linearize``: LoLCATs, Liger and attention transfer
   to Gated DeltaNet, each with ``--window`` keys of sliding window where it has one.
3. Trains two students' architectures from scratch on as many tokens as the longest
   linearisation used: Gated DeltaNet, and LoLCATs' layer (the same window).
4. Measures every model on the same validation windows, the size of its decoding state at two
   context lengths, and its greedy decoding speed per token after a short and after a long
   prompt (batch 1; prefill excluded; repetitions interleaved across the models, medians), and
   writes ``linearize.json``, a Markdown table and ``linearize.png`` to ``--results`` (``--out``
   unless given; ``--results=docs/results`` replaces the committed files).

Every stage resumes: rerunning with the same ``--out`` skips what is finished.
"""

from __future__ import annotations

import json
import os
import statistics
import time

import matplotlib

matplotlib.use("Agg")
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
from absl import app, flags, logging  # noqa: E402
from flax import nnx  # noqa: E402

from experiments import finetune  # noqa: E402
from experiments.configs.linearize import get_config as linearize_config  # noqa: E402
from experiments.configs.lm_teacher import get_config as teacher_config  # noqa: E402
from experiments.data import eval_windows, load_corpus  # noqa: E402
from experiments.linearize import linearize  # noqa: E402
from experiments.train_state import evaluate, make_eval_step  # noqa: E402
from experiments.trainer import train  # noqa: E402
from lolax.models import LanguageModel, generate  # noqa: E402

# (name, linearize config changes)
LINEARISATIONS = (
    ("lolcats", {"method": "lolcats"}),
    ("liger", {"method": "liger"}),
    ("gdn transfer", {"method": "transfer", "target": "gated_deltanet"}),
)
# (name, pattern): students' architectures trained from scratch (window as the linearisations')
SCRATCH = (("gdn from scratch", "E"), ("lolcats from scratch", "O"))
CONTEXTS = (256, 4096)          # decoding state and speed are measured at these context lengths


def decode_state_bytes(model: LanguageModel, context: int) -> int:
    """Bytes of the decoding caches for a context of ``context`` tokens (batch 1)."""
    graphdef, state = nnx.split(model)
    caches = jax.eval_shape(lambda s: nnx.merge(graphdef, s).prefill(jnp.zeros((1, 8), jnp.int32),
                                                                     max_len=context)[1], state)
    return sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(caches))


def decode_speeds(models: dict[str, LanguageModel], context: int, repeats: int = 3, short: int = 16,
                  long: int = 80) -> dict[str, float]:
    """Greedy decoding tokens/s per model (batch 1) after a prompt filling ``context - long``
    tokens: the time of ``long`` new tokens minus that of ``short`` (so the prompt's prefill
    cancels out), over ``long - short``.  Everything is compiled first; the timed calls visit
    every model in turn, ``repeats`` rounds, and each model's median is used."""
    prompt = jnp.ones((1, context - long), jnp.int32)
    run = lambda model, n: generate(model, prompt, n, temperature=0.0).block_until_ready()
    for model in models.values():
        run(model, short), run(model, long)
    times = {name: {short: [], long: []} for name in models}
    for _ in range(repeats):
        for name, model in models.items():
            for n in (short, long):
                start = time.perf_counter()
                run(model, n)
                times[name][n].append(time.perf_counter() - start)
    return {name: (long - short) / max(statistics.median(t[long]) - statistics.median(t[short]), 1e-9)
            for name, t in times.items()}


def reproduce(out: str, window: int, transfer_steps: int, recovery_steps: int, show_progress: bool = True) -> dict:
    teacher_dir = os.path.join(out, "teacher")
    tc = teacher_config()
    train(tc, teacher_dir, show_progress=show_progress)
    rows = {"teacher (softmax)": {"kind": "teacher", "tokens": tc.train.steps * tc.data.batch_size * tc.data.seq_len,
                                  "folder": teacher_dir}}
    longest = 0
    for name, changes in LINEARISATIONS:
        c = linearize_config()
        c.teacher, c.window = teacher_dir, window
        c.transfer.steps, c.recovery.steps = transfer_steps, recovery_steps
        for key, value in changes.items():
            c[key] = value
        start = time.time()
        summary = linearize(c, os.path.join(out, name.replace(" ", "_")), show_progress=show_progress)
        rows[name] = {"kind": "linearised", "tokens": summary["tokens"]["total"],
                      "folder": os.path.join(out, name.replace(" ", "_"), "final"),
                      "after_transfer_bpb": summary["student_val_bpb"], "new_parameters": summary["new"]}
        longest = max(longest, summary["tokens"]["total"])
        print(f"{name}: {summary['final_val_bpb']:.4f} bits per byte ({time.time() - start:.0f} s)")
    for name, pattern in SCRATCH:
        sc = teacher_config()
        sc.model.pattern = pattern
        if pattern == "O":
            sc.model.window = window
        sc.model.num_kv_heads = None
        sc.train.steps = longest // (sc.data.batch_size * sc.data.seq_len)
        sc.train.eval_every = sc.train.checkpoint_every = sc.train.steps
        folder = os.path.join(out, name.replace(" ", "_"))
        train(sc, folder, show_progress=show_progress)
        rows[name] = {"kind": "scratch", "tokens": longest, "folder": folder}

    corpus = load_corpus(tc.data.path, tc.data.val_fraction, tc.data.tokenizer)
    val = eval_windows(corpus.val, tc.data.batch_size, tc.data.seq_len, tc.train.eval_batches, corpus.val_bytes)
    models = {name: finetune.model_from_base(finetune.load_base(row["folder"])) for name, row in rows.items()}
    for name, model in models.items():
        graphdef, params = nnx.split(model, nnx.Param)
        rows[name]["val_bpb"] = evaluate(make_eval_step(graphdef), params, val)["bpb"]
        kinds = model.config.layer_kinds
        rows[name]["pattern"] = f"{len(kinds)} x {kinds[0]}" if len(set(kinds)) == 1 else ",".join(kinds)
        rows[name]["state_bytes"] = {str(n): decode_state_bytes(model, n) for n in CONTEXTS}
    for n in CONTEXTS:
        speeds = decode_speeds(models, n)
        for name in rows:
            rows[name].setdefault("decode_tokens_per_s", {})[str(n)] = speeds[name]
    return {"window": window, "teacher_tokens": rows["teacher (softmax)"]["tokens"], "rows": rows}


def write_results(result: dict, folder: str) -> None:
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "linearize.json"), "w") as f:
        json.dump(result, f, indent=2)
    rows, teacher = result["rows"], result["rows"]["teacher (softmax)"]
    lines = ["| model | layers | training tokens | val bits/byte | after transfer only | decoding state at 256 / 4096 "
             "tokens | decode tokens/s at 256 / 4096 |", "|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        share = "" if r is teacher else f" ({r['tokens'] / teacher['tokens']:.0%} of the teacher's)"
        after = f"{r['after_transfer_bpb']:.3f}" if "after_transfer_bpb" in r else ""
        state = " / ".join(f"{r['state_bytes'][str(n)] / 1024:,.0f} KiB" for n in CONTEXTS)
        speed = " / ".join(f"{r['decode_tokens_per_s'][str(n)]:,.0f}" for n in CONTEXTS)
        lines.append(f"| {name} | {r['pattern']} | {r['tokens']:,}{share} | {r['val_bpb']:.3f} | {after} | {state} | "
                     f"{speed} |")
    with open(os.path.join(folder, "linearize.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for name, r in rows.items():
        left.scatter(r["tokens"], r["val_bpb"], s=40)
        left.annotate(name, (r["tokens"], r["val_bpb"]), textcoords="offset points", xytext=(5, 3), fontsize=8)
        right.plot(CONTEXTS, [r["state_bytes"][str(n)] / 1024 for n in CONTEXTS], marker="o", label=name)
    left.set_xscale("log")
    left.set_xlabel("training tokens")
    left.set_ylabel("validation bits per byte")
    left.grid(alpha=0.3)
    right.set_xscale("log", base=2)
    right.set_yscale("log")
    right.set_xlabel("context length (tokens)")
    right.set_ylabel("decoding state (KiB, batch 1)")
    right.grid(alpha=0.3)
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(folder, "linearize.png"), dpi=120)
    plt.close(fig)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    f = flags.FLAGS
    result = reproduce(f.out, f.window, f.transfer_steps, f.recovery_steps)
    results = f.results or f.out
    write_results(result, results)
    print(open(os.path.join(results, "linearize.md")).read())


def define_flags() -> None:
    flags.DEFINE_string("out", None, "Folder for the teacher, the linearisations and the baseline.")
    flags.DEFINE_string("results", None, "Folder for linearize.json, .md and .png (default: --out; "
                        "--results=docs/results regenerates the committed results).")
    flags.DEFINE_integer("window", 16, "Sliding-window keys of the LoLCATs and Liger layers.")
    flags.DEFINE_integer("transfer_steps", 200, "Attention-transfer steps (batch 16 x 256 tokens).")
    flags.DEFINE_integer("recovery_steps", 300, "LoRA recovery steps (batch 16 x 256 tokens).")
    flags.mark_flags_as_required(["out"])


if __name__ == "__main__":
    define_flags()
    app.run(main)
