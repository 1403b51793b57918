r"""How a busy CPU slows GaLore's SVD refresh far more than an ordinary step.

Each measurement runs in a fresh subprocess, timing (minimum and median of ``--reps`` runs after
a warm-up) the jitted top-128 SVD of one ``512 x 1376`` float32 matrix (a LLaMA-60M MLP kernel)
and one jitted AdamW step on the same matrix, in three set-ups:

* ``default``: XLA's CPU client as it starts;
* ``one core``: the process pinned to one core (``os.sched_setaffinity``);
* ``OPENBLAS_NUM_THREADS=1``: the LAPACK behind JAX's CPU SVD (OpenBLAS) limited to one thread.

and two conditions: ``idle`` (nothing else started by the script) and ``busy`` (``--hogs``
other processes multiplying matrices with NumPy meanwhile, OpenBLAS threads at their default,
as a parallel test run or a second job would).  The
set-ups are interleaved, ``--rounds`` times.

    python -m experiments.bench.svd_contention --out docs/results     # about 2 minutes

Writes ``svd_contention.json``, ``.md`` and ``.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from experiments.bench import write_outputs

SETUPS = {"default": {}, "one core": {"pin": True}, "OPENBLAS_NUM_THREADS=1": {"env": {"OPENBLAS_NUM_THREADS": "1"}}}

_CHILD = r"""
import os, sys, time, json
if {pin}:
    os.sched_setaffinity(0, {{sorted(os.sched_getaffinity(0))[0]}})
import jax, jax.numpy as jnp, numpy as np, optax
a = jnp.asarray(np.random.default_rng(0).normal(size=(512, 1376)), jnp.float32)
svd = jax.jit(lambda a: jnp.linalg.svd(a, full_matrices=False)[0][:, :128])
tx = optax.adamw(1e-3)
step = jax.jit(lambda g, s, p: tx.update(g, s, p))
state = tx.init(a)
def timed(f, *args):
    jax.block_until_ready(f(*args))
    ts = []
    for _ in range({reps}):
        t = time.perf_counter(); jax.block_until_ready(f(*args)); ts.append(time.perf_counter() - t)
    return min(ts), float(np.median(ts))
print(json.dumps({{"svd": timed(svd, a), "adamw": timed(step, a, state, a)}}))
"""


# another job on the machine: NumPy matrix products with OpenBLAS's default threads, as a test
# worker or a second training process would run
_HOG = "import numpy as np\na = np.random.rand(768, 768)\nwhile True:\n    a @ a\n"


def measure(setup: dict, reps: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_NUM_THREADS"}
    env.update(setup.get("env", {}))
    code = _CHILD.format(pin=bool(setup.get("pin")), reps=reps)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def run(reps: int, rounds: int, hogs: int) -> dict:
    res = {cond: {name: {"svd": [], "adamw": []} for name in SETUPS} for cond in ("idle", "busy")}
    hog_env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_NUM_THREADS"}
    for cond in ("idle", "busy"):
        procs = [subprocess.Popen([sys.executable, "-c", _HOG], env=hog_env)
                 for _ in range(hogs if cond == "busy" else 0)]
        try:
            for _ in range(rounds):
                for name, setup in SETUPS.items():
                    r = measure(setup, reps)
                    for k in ("svd", "adamw"):
                        res[cond][name][k].append(r[k])
                    print(cond, name, r, flush=True)
        finally:
            for p in procs:
                p.kill()
                p.wait()
    summary = {cond: {name: {k: {"min_ms": 1e3 * min(v[0] for v in runs[k]),
                                 "median_ms": 1e3 * sorted(v[1] for v in runs[k])[len(runs[k]) // 2]}
                             for k in runs} for name, runs in by.items()} for cond, by in res.items()}
    return {"cores": len(os.sched_getaffinity(0)), "hogs": hogs, "reps": reps, "rounds": rounds,
            "matrix": [512, 1376], "rank": 128, "raw": res, "summary": summary,
            "time": time.strftime("%Y-%m-%d %H:%M")}


def markdown(r: dict) -> str:
    lines = [f"Top-128 SVD of a 512 x 1376 float32 matrix and one AdamW step on it, {r['cores']} cores; "
             f"'busy' = {r['hogs']} processes multiplying matrices (NumPy, OpenBLAS's default threads) "
             f"beside it. Minimum (median) over {r['rounds']} rounds of {r['reps']} runs, in ms.", "",
             "| set-up | SVD idle | SVD busy | AdamW idle | AdamW busy |", "|---|---|---|---|---|"]
    s = r["summary"]
    for name in SETUPS:
        cell = lambda cond, k: f"{s[cond][name][k]['min_ms']:.1f} ({s[cond][name][k]['median_ms']:.1f})"
        lines.append(f"| {name} | {cell('idle', 'svd')} | {cell('busy', 'svd')} | {cell('idle', 'adamw')} "
                     f"| {cell('busy', 'adamw')} |")
    return "\n".join(lines) + "\n"


def plot(r: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    s = r["summary"]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for ax, k in zip(axes, ("svd", "adamw")):
        x = range(len(SETUPS))
        for off, cond in ((-0.2, "idle"), (0.2, "busy")):
            ax.bar([i + off for i in x], [s[cond][n][k]["median_ms"] for n in SETUPS], 0.4, label=cond)
        ax.set_xticks(list(x), list(SETUPS))
        ax.set_title(f"{'top-128 SVD' if k == 'svd' else 'AdamW step'} (median ms)")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="runs/bench")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--hogs", type=int, default=2, help="matrix-multiplying processes beside it in 'busy'")
    args = ap.parse_args()
    print(write_outputs(args.out, "svd_contention", run(args.reps, args.rounds, args.hogs), markdown, plot))


if __name__ == "__main__":
    main()
