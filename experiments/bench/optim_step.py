"""Optimizer step time relative to AdamW, and a short LM comparison.

Part 1 (``--part step``): the attention/MLP matrices of the LLaMA-60M config
(``--layers`` of its 8 layers; 7 kernels per layer, float32), one jitted
``tx.update`` per optimizer, timed at a refresh step (``count = T``, a refresh after the
first: SVD, warm-started subspace iteration or a new random projector) and at an ordinary
step. The baseline ``adamw`` is
``optim.adamw`` (``optax.adamw``); ``adam_hf`` is the HF-style Adam that the
low-rank aliases use on the leaves they do not project (``optim.scale_by_adam``
plus the same decoupled weight decay), here applied to every matrix. GaLore
(``std`` side, ours) is also compared with ``optax.contrib.galore``
(``reverse_std`` side).

Part 2 (``--part lm``): a small ``models.LanguageModel`` (softmax attention,
byte vocabulary) on the Shakespeare bytes of ``experiments.data`` (falls back
to an inline LM on a synthetic stream if those are missing), equal steps and
batches for every optimizer, constant learning rate swept over ``--lrs``;
train/validation loss table and a plot.

    .venv/bin/python -m experiments.bench.optim_step --part all --layers 2 --lrs 0.001,0.003,0.01,0.03 \
        --out docs/results/optim_step.json --plot docs/results/optim_lm.png --markdown docs/results/optim_step.md

(``-m`` imports ``experiments`` first, which keeps OpenBLAS single-threaded: see
``experiments/__init__.py``.)  Without ``--out`` the results go to ``runs/bench/``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from lolax import optim  # noqa: E402
from lolax.optim.accounting import LLAMA_CONFIGS  # noqa: E402


def matrices_60m(layers):
    cfg = LLAMA_CONFIGS["60M"]
    h, f = cfg["hidden"], cfg["ffn"]
    rng = np.random.default_rng(0)
    mk = lambda *s: jnp.asarray(rng.normal(size=s) / np.sqrt(s[0]), jnp.float32)
    return {f"layers_{i}": {
        "attn": {n: {"kernel": mk(h, h)} for n in ("q_proj", "k_proj", "v_proj", "o_proj")},
        "mlp": {"gate_proj": {"kernel": mk(h, f)}, "up_proj": {"kernel": mk(h, f)},
                "down_proj": {"kernel": mk(f, h)}}} for i in range(layers)}


def _time(fn, *args, reps):
    """Minimum over ``reps`` runs after a warm-up: the least-disturbed estimate on a
    shared machine."""
    out = fn(*args)
    jax.block_until_ready(out)
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        ts.append(time.perf_counter() - t0)
    return float(np.min(ts))


def at_step(state, step: int):
    """``state`` with every step counter (int32 leaves named ``count``) set to ``step``: a refresh
    when ``step`` is a multiple of the gap, after the first one (so warm starts have a start)."""
    def reset(path, x):
        name = jax.tree_util.keystr(path)
        return jnp.full_like(x, step) if name.endswith(".count") and x.dtype == jnp.int32 else x
    return jax.tree_util.tree_map_with_path(reset, state)


def projection_floor(rank: int) -> optax.GradientTransformation:
    """Not an optimizer: only the two products a rank-``rank`` projection method does per matrix
    and step (project the gradient, project the result back), with a fixed projector. Its time
    is the floor under GaLore's and APOLLO's ordinary steps."""

    def init_fn(params):
        return tuple(jnp.full((min(p.shape), rank), 0.01, p.dtype) for p in jax.tree.leaves(params))

    def update_fn(updates, state, params=None):
        out = [q @ (q.T @ g) if g.shape[0] <= g.shape[1] else (g @ q) @ q.T
               for g, q in zip(jax.tree.leaves(updates), state)]
        return jax.tree.unflatten(jax.tree.structure(updates), out), state

    return optax.GradientTransformation(init_fn, update_fn)


def step_times(layers, reps, gap=200, refresh_reps=2):
    """Round-robin timing: every repetition visits every optimizer in turn, so load
    from other processes on a shared machine hits all of them alike; min per cell."""
    params = matrices_60m(layers)
    grads = jax.tree.map(lambda x: x * 1e-2 + 1e-3, params)
    txs = {
        "adamw": optim.adamw(1e-2),
        "adamw_8bit": optim.adamw_8bit(1e-2),
        "lisa_adamw (1 layer)": optim.lisa_adamw(1e-2, num_active=1),
        # random weights have no outliers at OwLore's tau = 13; a resample (every T here) is a refresh
        "owlore (1 layer)": optim.owlore(1e-2, num_active=1, interval=gap, rank=128, update_proj_gap=gap, tau=3.0),
        "adam_hf": optax.chain(optim.scale_by_adam(), optax.add_decayed_weights(1e-4),
                               optax.scale_by_learning_rate(1e-2)),
        "galore (full SVD)": optim.galore(1e-2, rank=128, update_proj_gap=gap, svd_method="full"),
        "galore": optim.galore(1e-2, rank=128, update_proj_gap=gap),     # warm-started subspace iteration
        "galore (full SVD, 8-bit moments)": optim.galore(1e-2, rank=128, update_proj_gap=gap, svd_method="full",
                                                         moments_8bit=True),
        "optax.contrib.galore": optax.contrib.galore(1e-2, rank=128, update_proj_gap=gap),
        "apollo": optim.apollo(1e-2, rank=128, update_proj_gap=gap),
        "apollo (cached projector)": optim.apollo(1e-2, rank=128, update_proj_gap=gap, cache_projector=True),
        "projections only (rank 128)": projection_floor(128),
        "apollo_mini": optim.apollo_mini(1e-2, update_proj_gap=gap),
        "fira (full SVD)": optim.fira(1e-2, rank=128, update_proj_gap=gap, svd_method="full"),
        "fira": optim.fira(1e-2, rank=128, update_proj_gap=gap),
        "frugal": optim.frugal(1e-2, density=0.25, update_proj_gap=gap),
    }
    fns = {}
    for name, tx in txs.items():
        upd = jax.jit(tx.update)
        s0 = tx.init(params)
        _, s1 = jax.block_until_ready(upd(grads, s0, params))   # compiles; count 0 = first refresh
        jax.block_until_ready(upd(grads, s1, params))           # count 1 = ordinary
        s_ref = at_step(s1, gap)                                # a later refresh (count = gap)
        jax.block_until_ready(upd(grads, s_ref, params))
        fns[name] = (upd, s_ref, s1)

    def once(upd, s):
        t0 = time.perf_counter()
        jax.block_until_ready(upd(grads, s, params))
        return time.perf_counter() - t0

    t_plain = {n: [] for n in fns}
    t_ref = {n: [] for n in fns}
    for _ in range(reps):
        for n, (upd, s0, s1) in fns.items():
            t_plain[n].append(once(upd, s1))
    for _ in range(refresh_reps):
        for n, (upd, s0, s1) in fns.items():
            t_ref[n].append(once(upd, s0))
    res = {}
    for n in fns:
        res[n] = {"refresh_s": min(t_ref[n]), "ordinary_s": min(t_plain[n]),
                  "ordinary_median_s": float(np.median(t_plain[n]))}
        print(f"{n:>22}: refresh {res[n]['refresh_s'] * 1e3:9.1f} ms   ordinary "
              f"{res[n]['ordinary_s'] * 1e3:8.1f} ms (median {res[n]['ordinary_median_s'] * 1e3:.1f})",
              flush=True)
    base = res["adamw"]["ordinary_s"]
    for name, r in res.items():
        r["refresh_vs_adamw"] = r["refresh_s"] / base
        r["ordinary_vs_adamw"] = r["ordinary_s"] / base
        r["amortised_vs_adamw"] = ((gap - 1) * r["ordinary_s"] + r["refresh_s"]) / gap / base
    res["galore_vs_optax_contrib"] = {
        k: res["galore (full SVD)"][k] / res["optax.contrib.galore"][k] for k in ("refresh_s", "ordinary_s")}
    return res


# ----------------------------------------------------------------------------- LM
def lm_setup(seq, batch, d_model, layers, seed=0):
    """``models.LanguageModel`` (softmax attention, byte vocabulary) on Shakespeare bytes from
    ``experiments.data``; falls back to a tiny inline model on a synthetic stream."""
    try:
        from flax import nnx

        from experiments.data.corpus import load_corpus
        from lolax.models import LanguageModel, ModelConfig
        model = LanguageModel(ModelConfig(vocab_size=256, d_model=d_model, num_layers=layers,
                                          pattern="S", num_heads=max(1, d_model // 32)),
                              nnx.Rngs(seed))
        graphdef, params = nnx.split(model, nnx.Param)
        corpus = load_corpus()
        stream, val = corpus.train, corpus.val
        source = (f"models.LanguageModel(d_model={d_model}, layers={layers}, pattern='S') on "
                  f"Shakespeare bytes ({corpus.describe()})")

        def loss_fn(p, toks):
            logits = nnx.merge(graphdef, p)(toks[:, :-1])
            return optax.softmax_cross_entropy_with_integer_labels(logits, toks[:, 1:]).mean()
    except Exception as e:  # noqa: BLE001  (models / data developed in parallel)
        print(f"models/experiments.data unavailable ({e!r}); using the synthetic fallback")
        params, loss_fn, stream, val, source = _fallback_lm(seq, seed)
    rng = np.random.default_rng(seed)

    def batches(steps, data=stream):
        idx = rng.integers(0, len(data) - seq - 1, size=(steps, batch))
        return jnp.asarray(data[idx[..., None] + np.arange(seq + 1)].astype(np.int32))

    return params, loss_fn, batches, val, source


def _fallback_lm(seq, seed, vocab=32, d=32):
    k = iter(jax.random.split(jax.random.key(seed), 16))
    init = lambda *s: jax.random.normal(next(k), s) / np.sqrt(s[0])
    params = {
        "embed": {"embedding": jax.random.normal(next(k), (vocab, d))},
        "attn": {n: {"kernel": init(d, d)} for n in ("q_proj", "k_proj", "v_proj", "o_proj")},
        "mlp": {"up_proj": {"kernel": init(d, 4 * d)}, "down_proj": {"kernel": init(4 * d, d)}},
        "norm": {"scale": jnp.ones((d,))},
        "lm_head": {"kernel": init(d, vocab)},
    }
    rng = np.random.default_rng(seed)
    table = rng.integers(0, vocab, size=(vocab, vocab))
    stream = [1, 2]
    for _ in range(20000):   # a noisy order-2 Markov stream
        stream.append(int(table[stream[-2], stream[-1]] if rng.random() < 0.8 else rng.integers(vocab)))
    stream = np.asarray(stream)

    def loss_fn(p, toks):
        x = p["embed"]["embedding"][toks[:, :-1]]
        a = p["attn"]
        q, kk, v = (x @ a[n]["kernel"] for n in ("q_proj", "k_proj", "v_proj"))
        att = jnp.where(jnp.tril(jnp.ones((seq, seq), bool)), q @ kk.transpose(0, 2, 1) / np.sqrt(d),
                        -1e9)
        x = x + jax.nn.softmax(att) @ v @ a["o_proj"]["kernel"]
        x = x + jax.nn.gelu(x @ p["mlp"]["up_proj"]["kernel"]) @ p["mlp"]["down_proj"]["kernel"]
        x = x * p["norm"]["scale"] / jnp.sqrt(jnp.mean(x * x, -1, keepdims=True) + 1e-6)
        return optax.softmax_cross_entropy_with_integer_labels(
            x @ p["lm_head"]["kernel"], toks[:, 1:]).mean()

    return params, loss_fn, stream, stream[-5000:], "synthetic order-2 Markov stream, inline LM"


def lm_methods(rank, gap):
    """name -> (constructor, keywords, static keywords for ``optax.inject_hyperparams``)."""
    return {
        "adamw": (optim.adamw, dict(weight_decay=0.0), ()),   # no weight decay, like the others
        "galore (full SVD)": (optim.galore, dict(rank=rank, update_proj_gap=gap, svd_method="full"),
                              ("rank", "update_proj_gap", "svd_method")),
        "apollo": (optim.apollo, dict(rank=rank, update_proj_gap=gap), ("rank", "update_proj_gap")),
        "apollo_mini": (optim.apollo_mini, dict(update_proj_gap=gap), ("rank", "update_proj_gap")),
        "fira (full SVD)": (optim.fira, dict(rank=rank, update_proj_gap=gap, svd_method="full"),
                            ("rank", "update_proj_gap", "svd_method")),
        "galore": (optim.galore, dict(rank=rank, update_proj_gap=gap), ("rank", "update_proj_gap")),
        "adamw_8bit": (optim.adamw_8bit, dict(weight_decay=0.0), ("block_size", "min_size")),
        "galore (full SVD, 8-bit moments)": (
            optim.galore, dict(rank=rank, update_proj_gap=gap, svd_method="full", moments_8bit=True),
            ("rank", "update_proj_gap", "svd_method")),
        "lisa_adamw (1 of 2 layers)": (optim.lisa_adamw, dict(weight_decay=0.0, num_active=1, interval=gap),
                                       ("num_active", "interval", "seed")),
        # a model trained from scratch has no outliers at OwLore's tau = 13 (a fine-tuning default)
        "owlore (1 of 2 layers, tau 3)": (
            optim.owlore, dict(num_active=1, interval=gap, rank=rank, update_proj_gap=gap, tau=3.0),
            ("num_active", "interval", "rank", "update_proj_gap", "seed", "tau", "layer_of", "input_axis")),
    }


def lm_compare(steps, lrs, gap, rank, seeds=(0,), seq=64, batch=16, d_model=64, layers=2):
    """Validation loss per optimizer and learning rate, mean and spread over ``seeds`` (each seed
    draws the model's initialisation and the batch order)."""
    methods = lm_methods(rank, gap)
    runs = {name: {str(lr): [] for lr in lrs} for name in methods}
    for seed in seeds:
        params, loss_fn, batches, val, source = lm_setup(seq, batch, d_model, layers, seed=seed)
        print(f"LM (seed {seed}):", source, flush=True)
        data = batches(steps)
        val_data = batches(8, val).reshape(-1, seq + 1)
        for name, (fn, kw, static) in methods.items():
            # constant lr, injected, so one compilation per method and seed
            tx = optax.inject_hyperparams(fn, static_args=static)(learning_rate=lrs[0], **kw)

            def run(p, s, d, v, tx=tx, loss_fn=loss_fn):
                def body(c, toks):
                    p, s = c
                    loss, g = jax.value_and_grad(loss_fn)(p, toks)
                    u, s = tx.update(g, s, p)
                    return (optax.apply_updates(p, u), s), loss
                (p, s), losses = jax.lax.scan(body, (p, s), d)
                return losses, jnp.mean(jax.vmap(lambda t: loss_fn(p, t[None]))(v))

            run = jax.jit(run)
            for lr in lrs:
                s0 = tx.init(params)
                s0 = s0._replace(hyperparams={**s0.hyperparams, "learning_rate": jnp.asarray(lr, jnp.float32)})
                t0 = time.perf_counter()
                losses, vloss = run(params, s0, data, val_data)
                losses = np.asarray(losses)
                runs[name][str(lr)].append({"val": float(vloss), "train": float(losses[-20:].mean()),
                                            "curve": losses[:: max(1, steps // 100)],
                                            "wall_s": time.perf_counter() - t0})
                print(f"{name:>12} seed {seed} lr {lr:g}: train loss (last 20) {runs[name][str(lr)][-1]['train']:.4f}"
                      f"  val {float(vloss):.4f}", flush=True)
    out = {"source": source, "steps": steps, "seq": seq, "batch": batch, "rank": rank, "gap": gap,
           "seeds": list(seeds)}
    for name, by_lr in runs.items():
        out[name] = {}
        for lr, rs in by_lr.items():
            vals = [r["val"] for r in rs]
            out[name][lr] = {"val_loss": float(np.mean(vals)), "val_loss_std": float(np.std(vals)),
                             "val_loss_seeds": vals, "final_train_loss": float(np.mean([r["train"] for r in rs])),
                             "curve": np.mean([r["curve"] for r in rs], axis=0).tolist(),
                             "wall_s": float(np.mean([r["wall_s"] for r in rs]))}
    return out


def plot(lm, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, runs in lm.items():
        if not isinstance(runs, dict) or "curve" in runs or name == "source":
            continue
        lr, best = min(runs.items(), key=lambda kv: kv[1]["val_loss"])
        c = np.asarray(best["curve"])
        ax.plot(np.linspace(0, lm["steps"], len(c)), c,
                label=f"{name} (lr {lr}): val {best['val_loss']:.3f}")
    ax.set_xlabel("step")
    ax.set_ylabel("train loss")
    ax.set_title("short LM run, best lr (by val loss) per optimizer")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def markdown(res) -> str:
    out = [f"Device: {res.get('device')} (jax {res.get('jax')}, optax {res.get('optax')})."]
    if "step" in res:
        st = res["step"]
        out += ["", f"Per-step time on the LLaMA-60M attention/MLP matrices ({res['args']['layers']} "
                "of 8 layers, float32), jitted `tx.update`, repetitions interleaved across optimizers, "
                "minimum per cell; ratios against `optim.adamw`'s ordinary step; amortised = "
                "(199 ordinary + 1 refresh) / 200.", "",
                "| optimizer | refresh step (ms) | ordinary step (ms) | refresh / AdamW "
                "| ordinary / AdamW | amortised / AdamW (T = 200) |", "|---|---|---|---|---|---|"]
        for name, r in st.items():
            if name == "galore_vs_optax_contrib":
                continue
            out.append(f"| {name} | {r['refresh_s'] * 1e3:.1f} | {r['ordinary_s'] * 1e3:.1f} "
                       f"| {r['refresh_vs_adamw']:.1f} | {r['ordinary_vs_adamw']:.2f} "
                       f"| {r['amortised_vs_adamw']:.2f} |")
        g = st["galore_vs_optax_contrib"]
        out += ["", f"GaLore (ours, full SVD, `std` side) / `optax.contrib.galore` (`reverse_std`): refresh "
                f"{g['refresh_s']:.2f}x, ordinary {g['ordinary_s']:.2f}x."]
    if "lm" in res:
        lm = res["lm"]
        names = [k for k, v in lm.items() if isinstance(v, dict) and k != "args"]
        lrs = list(lm[names[0]].keys())
        seeds = lm.get("seeds", [0])
        out += ["", f"Short LM run: {lm['source']}; {lm['steps']} steps, batch {lm['batch']} x "
                f"{lm['seq']} tokens, constant lr, rank {lm['rank']} (APOLLO-Mini 1), T = {lm['gap']}. "
                f"Validation loss (nats/byte) on 8 held-out batches, mean ± standard deviation over "
                f"{len(seeds)} seed(s) (initialisation and batch order); best mean per row in bold.", "",
                "| optimizer | " + " | ".join(f"lr {lr}" for lr in lrs) + " |",
                "|---|" + "---|" * len(lrs)]
        for n in names:
            cells = [lm[n][lr] for lr in lrs]
            best = min(c["val_loss"] for c in cells)

            def cell(c, best=best):
                text = f"{c['val_loss']:.3f}" + (f" ± {c['val_loss_std']:.3f}" if len(seeds) > 1 else "")
                return f"**{text}**" if c["val_loss"] == best else text
            out.append(f"| {n} | " + " | ".join(cell(c) for c in cells) + " |")
    return "\n".join(out)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--part", default="all", choices=["step", "lm", "all"])
    ap.add_argument("--layers", type=int, default=2, help="LLaMA-60M layers to time (of 8)")
    ap.add_argument("--reps", type=int, default=10, help="ordinary-step repetitions")
    ap.add_argument("--refresh-reps", type=int, default=2)
    ap.add_argument("--lm-steps", type=int, default=300)
    ap.add_argument("--lm-gap", type=int, default=50)
    ap.add_argument("--lm-rank", type=int, default=16)
    ap.add_argument("--lrs", default="0.003,0.01,0.03")
    ap.add_argument("--seeds", default="0,1,2", help="comma-separated seeds of the LM comparison")
    ap.add_argument("--out", default="runs/bench/optim_step.json")
    ap.add_argument("--plot", default="runs/bench/optim_lm.png")
    ap.add_argument("--markdown", default=None, help="also write the tables to this file")
    ap.add_argument("--merge", default=None,
                    help="JSON of an earlier run whose parts not re-run here are kept")
    args = ap.parse_args()
    res = {"device": str(jax.devices()[0]), "machine": platform.machine(),
           "jax": jax.__version__, "optax": optax.__version__, "args": vars(args)}
    if args.part in ("step", "all"):
        res["step"] = step_times(args.layers, args.reps, refresh_reps=args.refresh_reps)
    if args.part in ("lm", "all"):
        res["lm"] = lm_compare(args.lm_steps, [float(x) for x in args.lrs.split(",")], args.lm_gap,
                               args.lm_rank, seeds=[int(x) for x in args.seeds.split(",")])
        plot(res["lm"], args.plot)
    if args.merge:
        with open(args.merge) as f:
            old = json.load(f)
        for k in ("step", "lm"):
            if k not in res and k in old:
                res[k] = old[k]
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    os.makedirs(os.path.dirname(os.path.abspath(args.plot)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)
    md = markdown(res)
    print(md)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(md + "\n")


if __name__ == "__main__":
    main()
