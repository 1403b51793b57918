r"""GaLore's projector refresh: full SVD against warm-started subspace iteration and randomized SVD.

    python -m experiments.bench.projector_quality --out docs/results

Three measurements, written to ``projector_quality.{json,md,png}``:

1. **Quality on real gradients.**  A byte-level softmax LM on the embedded corpus trains with
   AdamW; every ``--gap`` steps the gradient of every 2-D weight is taken.  For each of them the
   exact top-``rank`` left subspace (full SVD) is compared with (a) two steps of subspace iteration
   started from the exact subspace of the previous snapshot (what ``svd_method='subspace'``
   does at a refresh) and (b) the randomized range finder: the mean ``sin^2`` of the principal
   angles, and the share of the gradient's energy the projector captures relative to the exact
   one (``|Q^T G|^2 / |Q_exact^T G|^2``).
2. **Time of one refresh** of GaLore (rank 128) on one LLaMA-60M layer's seven matrices, per
   method, with ``optax.contrib.galore`` alongside; repetitions interleaved, minimum per method.
3. **A short LM run** with GaLore per method (same data, seed and learning rate): validation loss.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
import optax

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from experiments.bench.optim_step import at_step, lm_setup, matrices_60m  # noqa: E402
from lolax import optim  # noqa: E402
from lolax.optim import projection  # noqa: E402

METHODS = ("full", "subspace", "randomized")


def _left(g: np.ndarray) -> np.ndarray:
    """The side GaLore projects (``std``): rows when the matrix is wide or square, else columns."""
    return g if g.shape[0] <= g.shape[1] else g.T


def subspace_errors(q: np.ndarray, exact: np.ndarray, g: np.ndarray) -> tuple[float, float]:
    """(mean sin^2 of the principal angles between ``q`` and ``exact``, captured energy ratio)."""
    cos = np.linalg.svd(q.T @ exact, compute_uv=False)
    energy = np.sum((q.T @ g) ** 2) / max(np.sum((exact.T @ g) ** 2), 1e-30)
    return float(np.mean(1 - np.clip(cos, 0, 1) ** 2)), float(energy)


def gradient_snapshots(steps: int, gap: int, lr: float, seq: int, batch: int, d_model: int, layers: int):
    """Gradients of the 2-D weights every ``gap`` steps of an AdamW run: list of {name: array}."""
    params, loss_fn, batches, _, source = lm_setup(seq, batch, d_model, layers)
    tx = optax.adamw(lr, weight_decay=0.0)
    opt_state = tx.init(params)
    grad_fn = jax.jit(jax.grad(loss_fn))

    @jax.jit
    def step(params, opt_state, toks):
        grads = grad_fn(params, toks)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, grads

    snaps = []
    for i, toks in enumerate(batches(steps)):
        params, opt_state, grads = step(params, opt_state, toks)
        if i % gap == 0:
            flat = jax.tree_util.tree_flatten_with_path(grads)[0]
            snaps.append({jax.tree_util.keystr(p): np.asarray(g, np.float64) for p, g in flat
                          if g.ndim == 2 and min(g.shape) > 1 and "embed" not in jax.tree_util.keystr(p)})
    return snaps, source


def quality(snaps, rank: int) -> dict:
    key = jax.random.key(0)
    per = {m: {"sin2": [], "energy": []} for m in ("subspace", "randomized", "previous")}
    for prev, cur in zip(snaps[:-1], snaps[1:]):
        for name, g in cur.items():
            a, a_prev = _left(g), _left(prev[name])
            r = min(rank, a.shape[0] - 1)
            exact = np.asarray(projection.svd_projector(jnp.asarray(a, jnp.float32), r, "left"), np.float64)
            start = projection.svd_projector(jnp.asarray(a_prev, jnp.float32), r, "left")
            cands = {
                "subspace": projection.svd_projector(jnp.asarray(a, jnp.float32), r, "left", method="subspace",
                                                     previous=start),
                "randomized": projection.svd_projector(jnp.asarray(a, jnp.float32), r, "left", method="randomized",
                                                       key=jax.random.fold_in(key, len(per["subspace"]["sin2"]))),
                "previous": start,       # no refresh at all: the last projector kept
            }
            for m, q in cands.items():
                sin2, energy = subspace_errors(np.asarray(q, np.float64), exact, a)
                per[m]["sin2"].append(sin2)
                per[m]["energy"].append(energy)
    return {m: {"mean_sin2": float(np.mean(v["sin2"])), "median_sin2": float(np.median(v["sin2"])),
                "mean_energy": float(np.mean(v["energy"])), "min_energy": float(np.min(v["energy"])),
                "sin2": v["sin2"], "energy": v["energy"]} for m, v in per.items()}


def refresh_times(reps: int, rank: int = 128) -> dict:
    params = matrices_60m(1)
    grads = jax.tree.map(lambda x: x * 1e-2 + 1e-3, params)
    txs = {f"galore ({m})": optim.galore(1e-2, rank=rank, svd_method=m) for m in METHODS}
    txs["optax.contrib.galore"] = optax.contrib.galore(1e-2, rank=rank)
    txs["adamw (ordinary step)"] = optim.adamw(1e-2)
    fns = {}
    for name, tx in txs.items():
        upd = jax.jit(tx.update)
        s0 = tx.init(params)
        _, s1 = jax.block_until_ready(upd(grads, s0, params))
        s = at_step(s1, 200)         # a later refresh: subspace iteration starts from the first projector
        jax.block_until_ready(upd(grads, s, params))
        fns[name] = (upd, s)
    times = {n: [] for n in fns}
    for _ in range(reps):
        for n, (upd, s) in fns.items():
            t = time.perf_counter()
            jax.block_until_ready(upd(grads, s, params))
            times[n].append(time.perf_counter() - t)
    return {n: float(np.min(t)) for n, t in times.items()}


def lm_runs(steps: int, gap: int, rank: int, lr: float, seq: int, batch: int, d_model: int, layers: int) -> dict:
    out = {}
    for m in METHODS:
        params, loss_fn, batches, val, _ = lm_setup(seq, batch, d_model, layers)
        data, val_data = batches(steps), batches(8, val)
        tx = optim.galore(lr, rank=rank, update_proj_gap=gap, svd_method=m)
        opt_state = tx.init(params)

        @jax.jit
        def step(params, opt_state, toks):
            loss, grads = jax.value_and_grad(loss_fn)(params, toks)
            updates, opt_state = tx.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state, loss

        start = time.perf_counter()
        for toks in data:
            params, opt_state, _ = step(params, opt_state, toks)
        val_loss = float(np.mean([float(loss_fn(params, v)) for v in val_data]))
        out[m] = {"val_loss": val_loss, "seconds": time.perf_counter() - start}
        print(f"galore ({m}): validation loss {val_loss:.4f}", flush=True)
    return out


def write(res: dict, folder: str) -> None:
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "projector_quality.json"), "w") as f:
        json.dump(res, f, indent=2)
    q, a = res["quality"], res["args"]
    lines = [f"Device: {jax.devices()[0]} (jax {jax.__version__}).", "",
             f"Quality on real gradients: {res['source']}, AdamW lr {a['lr']}, gradients every {a['gap']} "
             f"steps over {a['steps']} steps, rank {a['rank']}; {len(q['subspace']['sin2'])} (matrix, refresh) pairs. "
             "sin^2: mean over the principal angles against the exact top-rank subspace; energy: "
             "|Q^T G|^2 relative to the exact projector's.", "",
             "| projector at a refresh | mean sin^2 | median sin^2 | mean energy | worst energy |",
             "|---|---|---|---|---|"]
    labels = {"subspace": "subspace iteration (2 steps, warm start)", "randomized": "randomized range finder",
              "previous": "no refresh (previous projector kept)"}
    for m in ("subspace", "randomized", "previous"):
        lines.append(f"| {labels[m]} | {q[m]['mean_sin2']:.2e} | {q[m]['median_sin2']:.2e} | "
                     f"{q[m]['mean_energy']:.4f} | {q[m]['min_energy']:.4f} |")
    t = res["refresh_s"]
    lines += ["", "One refresh step of GaLore (rank 128) on one LLaMA-60M layer (7 matrices), minimum of "
              f"{a['reps']} interleaved repetitions:", "", "| step | ms | / full SVD |", "|---|---|---|"]
    for n, s in t.items():
        lines.append(f"| {n} | {s * 1e3:.1f} | {s / t['galore (full)']:.2f} |")
    lm = res["lm"]
    lines += ["", f"Short LM run with GaLore (rank {a['lm_rank']}, T = {a['lm_gap']}, lr {a['lm_lr']}, "
              f"{a['lm_steps']} steps; same data and seed): validation loss (nats/byte)", "",
              "| svd_method | val loss |", "|---|---|"]
    lines += [f"| {m} | {lm[m]['val_loss']:.4f} |" for m in METHODS]
    with open(os.path.join(folder, "projector_quality.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    fig, ax = plt.subplots(figsize=(6, 4))
    for m in ("subspace", "randomized", "previous"):
        ax.plot(sorted(q[m]["sin2"]), label=labels[m])
    ax.set_yscale("log")
    ax.set_xlabel("(matrix, refresh) pairs, sorted")
    ax.set_ylabel("mean sin^2 of principal angles vs exact")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(folder, "projector_quality.png"), dpi=120)
    plt.close(fig)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="docs/results")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--gap", type=int, default=100)
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--lm-steps", type=int, default=400)
    ap.add_argument("--lm-gap", type=int, default=50)
    ap.add_argument("--lm-rank", type=int, default=16)
    ap.add_argument("--lm-lr", type=float, default=3e-2)
    args = ap.parse_args()
    shape = dict(seq=128, batch=16, d_model=128, layers=2)
    snaps, source = gradient_snapshots(args.steps, args.gap, args.lr, **shape)
    res = {"args": vars(args), "source": source, "quality": quality(snaps, args.rank),
           "refresh_s": refresh_times(args.reps)}
    res["lm"] = lm_runs(args.lm_steps, args.lm_gap, args.lm_rank, args.lm_lr, seq=64, batch=16, d_model=64, layers=2)
    write(res, args.out)
    print(open(os.path.join(args.out, "projector_quality.md")).read())


if __name__ == "__main__":
    main()
