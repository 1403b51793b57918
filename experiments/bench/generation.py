r"""Decode speed and memory against context length, and training throughput per mixer family.

    python -m experiments.bench.generation [--quick] [--out docs/results]

1. Decoding: for each model (linear attention, Gated DeltaNet, softmax, sliding window; same
   width and depth), prefill a context of C tokens (512 ... 16K) with the chunk ops, then time
   ``--decode-tokens`` jitted recurrent/KV-cache steps (one ``lax.scan``, compiled once per C).
   Memory is the decoding cache (recurrent states, conv states, KV caches / ring buffers) in
   bytes, computed from the cache pytree; it does not include parameters or activations.
2. Training: tokens/s of a jitted forward + backward step (cross-entropy) at T = 2K and 8K for
   every family's preset.

Writes ``generation_<tag>.json``, ``generation_<tag>.png`` and ``generation_<tag>.md`` under
``--out``.  On a shared CPU the absolute numbers move with the load; read the ratios between
models measured side by side.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from experiments.configs.presets import apply_preset
from lolax.models import LanguageModel, ModelConfig, count_params

BASE = dict(vocab_size=256, d_model=128, num_layers=4, num_heads=4, chunk_size=64, window=256)
DECODE_MODELS = {"linear_attn": "linear_attn", "gdn": "gdn", "softmax": "transformer", "swa": "swa"}
TRAIN_FAMILIES = ("linear_attn", "hedgehog", "based", "retnet", "lightning", "gla", "deltanet", "gdn",
                  "mom", "transformer", "swa")


def build(preset: str, **over) -> LanguageModel:
    values = apply_preset(dict(BASE, preset=preset))
    values.update(over)
    return LanguageModel(ModelConfig(**values), nnx.Rngs(0))


def _tree_bytes(tree) -> int:
    return int(sum(np.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(tree)))


def decode_benchmark(preset: str, context: int, steps: int, repeats: int = 2) -> dict:
    model = build(preset)
    graphdef, state = nnx.split(model)
    max_len = context + steps + 1

    @jax.jit
    def prefill(state, tokens):
        return nnx.merge(graphdef, state).prefill(tokens, max_len=max_len)

    @jax.jit
    def decode(state, caches, token):
        model = nnx.merge(graphdef, state)

        def body(carry, i):
            token, caches = carry
            logits, caches = model.decode_step(token, caches, positions=jnp.full((1,), context) + i,
                                               index=context + i)
            return (jnp.argmax(logits, -1).astype(jnp.int32), caches), None

        (token, caches), _ = jax.lax.scan(body, (token, caches), jnp.arange(steps))
        return token, caches

    tokens = jax.random.randint(jax.random.key(0), (1, context), 0, 256)
    t0 = time.perf_counter()
    logits, caches = jax.block_until_ready(prefill(state, tokens))
    prefill_s = time.perf_counter() - t0            # includes compilation
    token = jnp.argmax(logits[:, -1], -1).astype(jnp.int32)
    jax.block_until_ready(decode(state, caches, token))   # compile
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(decode(state, caches, token))
        best = min(best, time.perf_counter() - t0)
    return {"model": preset, "context": context, "decode_tokens_per_s": steps / best,
            "ms_per_token": 1e3 * best / steps, "cache_bytes": _tree_bytes(caches),
            "prefill_s_incl_compile": prefill_s, "params": count_params(model)}


def train_benchmark(preset: str, length: int, repeats: int = 2) -> dict:
    model = build(preset)
    graphdef, params = nnx.split(model, nnx.Param)
    tokens = jax.random.randint(jax.random.key(0), (1, length + 1), 0, 256)

    @jax.jit
    def step(params, tokens):
        def loss_fn(p):
            logits, aux = nnx.merge(graphdef, p)(tokens[:, :-1], return_aux=True)
            logp = jax.nn.log_softmax(logits, -1)
            return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], -1)) + aux
        return jax.value_and_grad(loss_fn)(params)

    t0 = time.perf_counter()
    jax.block_until_ready(step(params, tokens))
    compile_s = time.perf_counter() - t0
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(step(params, tokens))
        best = min(best, time.perf_counter() - t0)
    return {"model": preset, "pattern": model.config.pattern, "T": length,
            "train_tokens_per_s": length / best, "step_s": best, "compile_s": compile_s,
            "params": count_params(model)}


def write_outputs(results: dict, out: str, tag: str) -> None:
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, f"generation_{tag}.json"), "w") as f:
        json.dump(results, f, indent=1)
    lines = [f"Decode (batch 1, {results['decode_tokens']} tokens after a context of C; cache = decoding "
             f"state in MiB). {results['machine']}; shared CPU: compare ratios, not absolutes.", "",
             "| model | params | " + " | ".join(f"C={c}" for c in results["contexts"]) + " |",
             "|---|---|" + "---|" * len(results["contexts"])]
    by = {}
    for r in results["decode"]:
        by.setdefault(r["model"], {})[r["context"]] = r
    for name, rows in by.items():
        cells = [f"{rows[c]['decode_tokens_per_s']:.0f} tok/s, {rows[c]['cache_bytes'] / 2**20:.2f} MiB"
                 if c in rows else "-" for c in results["contexts"]]
        lines.append(f"| {name} | {next(iter(rows.values()))['params']:,} | " + " | ".join(cells) + " |")
    lines += ["", "Training (batch 1, forward + backward, tokens/s):", "",
              "| family | pattern | params | " + " | ".join(f"T={t}" for t in results["train_lengths"]) + " |",
              "|---|---|---|" + "---|" * len(results["train_lengths"])]
    tb = {}
    for r in results["train"]:
        tb.setdefault(r["model"], {})[r["T"]] = r
    for name, rows in tb.items():
        first = next(iter(rows.values()))
        cells = [f"{rows[t]['train_tokens_per_s']:.0f}" if t in rows else "-" for t in results["train_lengths"]]
        lines.append(f"| {name} | {first['pattern']} | {first['params']:,} | " + " | ".join(cells) + " |")
    with open(os.path.join(out, f"generation_{tag}.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    for name, rows in by.items():
        cs = sorted(rows)
        axes[0].plot(cs, [rows[c]["decode_tokens_per_s"] for c in cs], "o-", label=name)
        axes[1].plot(cs, [rows[c]["cache_bytes"] / 2**20 for c in cs], "o-", label=name)
    for ax, title in ((axes[0], "decode tokens/s"), (axes[1], "decoding cache (MiB)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context length")
        ax.set_title(title)
        ax.legend()
    axes[0].set_yscale("log")
    axes[1].set_yscale("log")
    names = list(tb)
    width = 0.8 / max(len(results["train_lengths"]), 1)
    for j, t in enumerate(results["train_lengths"]):
        axes[2].bar(np.arange(len(names)) + j * width,
                    [tb[n][t]["train_tokens_per_s"] if t in tb[n] else 0 for n in names], width, label=f"T={t}")
    axes[2].set_xticks(np.arange(len(names)) + width * (len(results["train_lengths"]) - 1) / 2)
    axes[2].set_xticklabels(names, rotation=45, ha="right")
    axes[2].set_title("training tokens/s (fwd + bwd)")
    axes[2].legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out, f"generation_{tag}.png"), dpi=110)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="short contexts and T = 2K only")
    parser.add_argument("--out", default="docs/results")
    parser.add_argument("--tag", default=None, help="file suffix (default: cpu / cpu_quick / the backend)")
    parser.add_argument("--decode-tokens", type=int, default=None)
    parser.add_argument("--skip-train", action="store_true")
    parser.add_argument("--skip-decode", action="store_true")
    parser.add_argument("--repeats", type=int, default=3, help="timed repetitions (the best is kept)")
    parser.add_argument("--update", action="store_true",
                        help="keep the other section of an existing generation_<tag>.json")
    args = parser.parse_args(argv)
    contexts = [512, 1024, 2048] if args.quick else [512, 1024, 2048, 4096, 8192, 16384]
    lengths = [2048] if args.quick else [2048, 8192]
    steps = args.decode_tokens or (16 if args.quick else 32)
    tag = args.tag or (jax.default_backend() + ("_quick" if args.quick else ""))
    results = {"machine": f"{jax.default_backend()} ({platform.processor() or platform.machine()}, "
                          f"{os.cpu_count()} cores visible), jax {jax.__version__}",
               "base": BASE, "contexts": contexts, "train_lengths": lengths, "decode_tokens": steps,
               "decode": [], "train": []}
    path = os.path.join(args.out, f"generation_{tag}.json")
    if args.update and os.path.exists(path):
        with open(path) as f:
            old = json.load(f)
        if args.skip_decode:
            results.update({k: old[k] for k in ("decode", "contexts", "decode_tokens")})
        if args.skip_train:
            results.update({k: old[k] for k in ("train", "train_lengths")})
    if not args.skip_decode:
        for c in contexts:
            for name, preset in DECODE_MODELS.items():
                r = decode_benchmark(preset, c, steps, args.repeats)
                r["model"] = name
                results["decode"].append(r)
                print(f"decode {name:12s} C={c:6d}: {r['decode_tokens_per_s']:8.1f} tok/s "
                      f"cache {r['cache_bytes'] / 2**20:8.2f} MiB", flush=True)
    if not args.skip_train:
        for t in lengths:
            for preset in TRAIN_FAMILIES:
                r = train_benchmark(preset, t, args.repeats)
                results["train"].append(r)
                print(f"train {preset:12s} T={t:6d}: {r['train_tokens_per_s']:8.1f} tok/s", flush=True)
    write_outputs(results, args.out, tag)


if __name__ == "__main__":
    main()
