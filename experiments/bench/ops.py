"""Benchmark of the sequence-mixing ops: time, achieved GFLOP/s and peak memory.

    python -m experiments.bench.ops                 # full run (about 10-20 minutes on 2 CPU cores)
    python -m experiments.bench.ops --quick --out /tmp/bench   # smoke run, a few seconds

For every family of ``lolax.ops`` (linear_attn unnormalised, simple_gla, gla, delta_rule,
gated_delta_rule) it times the chunk and recurrent forms, forward and forward+backward, at
B = 1, H = 4, K = V = 64 and T in {1K, 4K, 16K} (64K forward for the chunk forms), plus one
head-size-128 run, against causal ``jax.nn.dot_product_attention`` (XLA, materialises T×T) and
``lolax.ops.attention.softmax_attention`` (blockwise).  Forms are timed round-robin at
each T (so a busy shared CPU slows them alike): the ratios are more trustworthy than the
absolute times.  It measures the float32 matmul peak of this machine (best of large square
matmuls) and reports each chunk form's achieved GFLOP/s against it, using the *nominal* chunk
FLOP count (see ``chunk_flops``).  Peak memory comes from
``jax.jit(f).lower(...).compile().memory_analysis()`` (temp + arguments + outputs) at 4K, 16K and
64K.  Writes ``ops_bench.json``, ``ops_bench.md`` (the table) and ``ops_bench.png`` (log-log time
against T) into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from lolax.ops import FAMILIES as _FAMILY_NAMES
from lolax.ops.testing import DELTA, GATES, family_op

# name: (gate kind, delta rule?); linear attention runs unnormalised, as the other families do
FAMILIES = {name: (GATES[name], name in DELTA) for name in _FAMILY_NAMES}


def chunk_flops(family: str, B: int, T: int, H: int, K: int, V: int, C: int = 64) -> float:
    """Nominal forward FLOPs of the chunk form (multiply-adds count 2).

    Diagonal decays, per token and head: Q Kᵀ (2CK) + A V (2CV) + state update Kᵀ V (2KV) +
    inter-chunk Q S (2KV).  Delta rules add K Kᵀ (2CK), W = T K and U = T V (2C(K+V)/... counted
    as 2CK + 2CV) and W S (2KV).  Forward+backward is counted as 3x forward.  The GLA form also
    does elementwise work (c·K exps per token for its 16×16 diagonal sub-blocks) that this count
    leaves out."""
    per_token = 2 * (C * K + C * V + 2 * K * V)
    if FAMILIES[family][1]:
        per_token += 2 * (2 * C * K + C * V + K * V)
    return float(B * T * H * per_token)


def _block(x):
    return jax.block_until_ready(x)


def _time(fn, args, reps: int) -> list[float]:
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        _block(fn(*args))
        out.append(time.perf_counter() - t0)
    return out


def matmul_peak(n: int, reps: int) -> float:
    """Best float32 GFLOP/s of an n×n @ n×n matmul under jit (all cores XLA uses)."""
    a = jnp.asarray(np.random.default_rng(0).standard_normal((n, n)), jnp.float32)
    f = jax.jit(lambda a, b: a @ b)
    _block(f(a, a))
    best = min(_time(f, (a, a), reps))
    return 2 * n ** 3 / best / 1e9


def _inputs(family, B, T, H, K, V, seed=0):
    rng = np.random.default_rng(seed)
    n = lambda *s: jnp.asarray(rng.standard_normal(s).astype(np.float32))
    q, k, v = n(B, T, H, K), n(B, T, H, K), n(B, T, H, V)
    if family is None:          # softmax baselines
        return (q, k, v)
    gate, delta = FAMILIES[family]
    if delta:                   # the delta rule needs unit keys
        q = q / jnp.linalg.norm(q, axis=-1, keepdims=True)
        k = k / jnp.linalg.norm(k, axis=-1, keepdims=True)
    args = [q, k, v]
    if gate == "scalar":
        args.append(jax.nn.log_sigmoid(n(B, T, H)) / 16)
    elif gate == "vector":
        args.append(jax.nn.log_sigmoid(n(B, T, H, K)) / 16)
    if delta:
        args.append(jax.nn.sigmoid(n(B, T, H)))
    return tuple(args)


def _first(out):
    return out[0] if isinstance(out, tuple) else out


def _fwd_and_grad(fn):
    f = jax.jit(lambda *a: _first(fn(*a)))

    def loss(*a):
        o = _first(fn(*a))
        return jnp.sum(o.astype(jnp.float32) * jnp.cos(jnp.arange(o.shape[-1], dtype=jnp.float32)))

    g = jax.jit(lambda *a: jax.grad(loss, argnums=tuple(range(len(a))))(*a))   # all inputs
    return f, g


SOFTMAX_MEMORY_BUDGET = 6 * 2 ** 30


def dot_product_attention(q, k, v):
    """Causal ``jax.nn.dot_product_attention`` (XLA: materialises the T×T scores per head).

    When the scores of all heads would not fit in ``SOFTMAX_MEMORY_BUDGET`` (fwd+bwd keeps
    about three T×T float32 arrays per head) the heads are run one after another with
    ``lax.map``: the same arithmetic, the same time on a compute-bound CPU, a fraction of the
    memory."""
    B, T, H, _ = q.shape
    if 3 * 4 * B * H * T * T <= SOFTMAX_MEMORY_BUDGET:
        return jax.nn.dot_product_attention(q, k, v, is_causal=True)
    per_head = lambda x: jnp.moveaxis(x, 2, 0)[:, :, :, None, :]      # [H, B, T, 1, D]
    o = jax.lax.map(lambda a: jax.nn.dot_product_attention(*a, is_causal=True),
                    (per_head(q), per_head(k), per_head(v)))
    return jnp.moveaxis(o[:, :, :, 0, :], 0, 2)


def load_forms(log):
    """{label: (family or None, fn, kind)} with kind in chunk / recurrent / softmax."""
    forms = {}
    for fam, (gate, delta) in FAMILIES.items():
        names = ("q", "k", "v") + (("g",) if gate else ()) + (("beta",) if delta else ())
        for form, label in (("chunk", "chunk"), ("fused_recurrent", "recurrent")):
            op = family_op(fam, form, output_final_state=False)
            forms[f"{fam}/{label}"] = (fam, lambda *a, op=op, names=names: op(**dict(zip(names, a))), label)
    forms["softmax/jax.nn.dot_product_attention"] = (None, dot_product_attention, "softmax")
    try:
        from lolax.ops.attention import softmax_attention
        forms["softmax/ops.attention (blockwise)"] = (None, softmax_attention, "softmax")
    except Exception as e:  # noqa: BLE001
        log(f"skipping ops.attention: {type(e).__name__}: {e}")
    return forms


def _select(forms, families):
    """Keeps the named families; ``softmax`` in the list keeps the baselines (always kept if
    no family list is given; with one, only the XLA dot-product baseline is kept unless
    ``softmax`` is named)."""
    if not families:
        return forms
    keep = {}
    for label, spec in forms.items():
        fam = spec[0]
        if fam in families or (fam is None and ("softmax" in families or "dot_product" in label)):
            keep[label] = spec
    return keep


def peak_memory(fn, args, grad: bool) -> float:
    """MiB of temp + arguments + outputs from XLA's memory analysis (compile only)."""
    sds = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in args]
    if grad:
        f = jax.grad(lambda *a: jnp.sum(_first(fn(*a)).astype(jnp.float32)),
                     argnums=tuple(range(len(args))))
    else:
        f = lambda *a: _first(fn(*a))
    m = jax.jit(f).lower(*sds).compile().memory_analysis()
    return (m.temp_size_in_bytes + m.argument_size_in_bytes + m.output_size_in_bytes) / 2 ** 20


def run(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny smoke run (seconds)")
    p.add_argument("--out", default="docs/results", help="output directory")
    p.add_argument("--T", type=int, nargs="*", help="sequence lengths (fwd and fwd+bwd)")
    p.add_argument("--T-fwd-only", type=int, nargs="*", help="extra lengths, chunk forward only")
    p.add_argument("--reps", type=int, default=None)
    p.add_argument("--families", nargs="*", default=None, help="subset of families to run")
    p.add_argument("--softmax-max-T", type=int, default=16384,
                   help="skip the materialising softmax baseline above this T")
    p.add_argument("--recurrent-bwd-max-T", type=int, default=16384)
    a = p.parse_args(argv)

    quick = a.quick
    Ts = a.T or ([128] if quick else [1024, 4096, 16384])
    T_fwd = a.T_fwd_only if a.T_fwd_only is not None else ([] if quick else [65536])
    reps = a.reps or (1 if quick else 3)
    H, K, V = (2, 16, 16) if quick else (4, 64, 64)
    big_head = None if quick else (16384, 4, 128)   # (T, H, K=V) for the head-size run
    mem_Ts = [256] if quick else [4096, 16384, 65536]
    os.makedirs(a.out, exist_ok=True)
    lines = []

    def log(s=""):
        print(s, flush=True)
        lines.append(s)

    forms = load_forms(log)
    forms = _select(forms, a.families)
    peak = matmul_peak(256 if quick else 2048, 3 if quick else 10)
    log(f"jax {jax.__version__}, {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs visible, devices {jax.devices()}")
    log(f"float32 matmul peak (jit, {256 if quick else 2048}^2): {peak:.1f} GFLOP/s")

    results = []

    def bench_at(T, H, K, V, fwd_only, which):
        compiled = {}
        for label, (fam, fn, kind) in forms.items():
            if which and kind not in which:
                continue
            if kind == "softmax" and "dot_product" in label and T > a.softmax_max_T:
                continue
            args = _inputs(fam, 1, T, H, K, V)
            f, g = _fwd_and_grad(fn)
            do_bwd = not fwd_only and not (kind == "recurrent" and T > a.recurrent_bwd_max_T)
            try:
                t0 = time.perf_counter()
                _block(f(*args))
                if do_bwd:
                    _block(g(*args))
                compiled[label] = (fam, kind, f, g if do_bwd else None, args)
                log(f"  compiled {label} T={T} ({time.perf_counter() - t0:.1f}s incl. first run)")
            except Exception as e:  # noqa: BLE001 - e.g. out of memory: record and go on
                log(f"  {label} T={T}: failed ({type(e).__name__}: {str(e)[:120]})")
        times = {lab: {"fwd": [], "fwdbwd": []} for lab in compiled}
        n_reps = 1 if (T >= 16384 and not quick) else reps
        for _ in range(max(n_reps, 1)):                    # round-robin: forms share the noise
            for lab, (fam, kind, f, g, args) in compiled.items():
                times[lab]["fwd"] += _time(f, args, 1)
                if g is not None:
                    times[lab]["fwdbwd"] += _time(g, args, 1)
        for lab, (fam, kind, f, g, args) in compiled.items():
            r = {"form": lab, "family": fam, "kind": kind, "T": T, "H": H, "K": K, "V": V,
                 "fwd_s": min(times[lab]["fwd"]),
                 "fwdbwd_s": min(times[lab]["fwdbwd"]) if times[lab]["fwdbwd"] else None}
            if kind == "chunk":
                fl = chunk_flops(fam, 1, T, H, K, V)
                r["fwd_gflops"] = fl / r["fwd_s"] / 1e9
                r["fwd_frac_peak"] = r["fwd_gflops"] / peak
                if r["fwdbwd_s"]:
                    r["fwdbwd_gflops"] = 3 * fl / r["fwdbwd_s"] / 1e9
                    r["fwdbwd_frac_peak"] = r["fwdbwd_gflops"] / peak
            results.append(r)

    for T in Ts:
        log(f"T = {T}, H = {H}, K = V = {K}")
        bench_at(T, H, K, V, False, None)
    for T in T_fwd:
        log(f"T = {T} (forward only), H = {H}, K = V = {K}")
        bench_at(T, H, K, V, True, ("chunk", "recurrent"))
    if big_head:
        Tb, Hb, Kb = big_head
        log(f"head size {Kb}: T = {Tb}, H = {Hb}")
        bench_at(Tb, Hb, Kb, Kb, False, None)

    memory = []
    for label, (fam, fn, kind) in forms.items():
        if kind != "chunk":
            continue
        for T in mem_Ts:
            args = _inputs(fam, 1, T, H, K, V)
            try:
                memory.append({"form": label, "T": T, "fwd_MiB": peak_memory(fn, args, False),
                               "fwdbwd_MiB": peak_memory(fn, args, True)})
            except Exception as e:  # noqa: BLE001
                log(f"  memory {label} T={T}: failed ({type(e).__name__})")

    table = format_table(results, memory, peak, H, K)
    log(table)
    out = {"peak_gflops": peak, "jax": jax.__version__, "cpus": os.cpu_count(), "quick": quick,
           "command": "python -m experiments.bench.ops " + " ".join(argv if argv is not None else sys.argv[1:]),
           "results": results, "memory": memory}
    with open(os.path.join(a.out, "ops_bench.json"), "w") as fh:
        json.dump(out, fh, indent=1)
    with open(os.path.join(a.out, "ops_bench.md"), "w") as fh:
        fh.write(table + "\n")
    plot(results, os.path.join(a.out, "ops_bench.png"), H, K)
    return out


def _fmt(x, unit=""):
    if x is None:
        return "-"
    if x >= 100:
        return f"{x:.0f}{unit}"
    if x >= 1:
        return f"{x:.2f}{unit}"
    return f"{x * 1e3:.1f}m{unit}" if unit == "s" else f"{x:.3f}{unit}"


def format_table(results, memory, peak, H, K) -> str:
    rows = ["| form | T | H | K=V | fwd | fwd+bwd | fwd GFLOP/s (% peak) | fwd+bwd GFLOP/s (% peak) |"
            " softmax(XLA)/this fwd+bwd | recurrent/this fwd+bwd | recurrent/this fwd |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    idx = {(r["form"], r["T"], r["K"]): r for r in results}
    for r in results:
        ratio = lambda other, key: (
            "-" if other is None or other.get(key) is None or not r.get(key) else f"{other[key] / r[key]:.1f}x")
        sm = idx.get(("softmax/jax.nn.dot_product_attention", r["T"], r["K"]))
        rec = idx.get((f"{r['family']}/recurrent", r["T"], r["K"])) if r["family"] else None
        gf = lambda key: (f"{r[key + '_gflops']:.1f} ({100 * r[key + '_frac_peak']:.0f}%)"
                          if key + "_gflops" in r else "-")
        is_chunk = r["kind"] == "chunk"
        rows.append(f"| {r['form']} | {r['T']} | {r['H']} | {r['K']} | {_fmt(r['fwd_s'], 's')} | "
                    f"{_fmt(r['fwdbwd_s'], 's')} | {gf('fwd')} | {gf('fwdbwd')} | "
                    f"{ratio(sm, 'fwdbwd_s') if is_chunk else '-'} | "
                    f"{ratio(rec, 'fwdbwd_s') if is_chunk else '-'} | "
                    f"{ratio(rec, 'fwd_s') if is_chunk else '-'} |")
    rows.append("")
    rows.append(f"float32 matmul peak {peak:.1f} GFLOP/s; times are best-of-reps seconds "
                "(m = milli); ratios > 1x mean the chunk form is faster.")
    if memory:
        rows += ["", "Peak memory (MiB, XLA memory_analysis: temp + arguments + outputs):", "",
                 "| form | T | forward | forward+backward |", "|---|---|---|---|"]
        for m in memory:
            rows.append(f"| {m['form']} | {m['T']} | {m['fwd_MiB']:.0f} | {m['fwdbwd_MiB']:.0f} |")
    return "\n".join(rows)


def plot(results, path, H, K):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, key, title in ((axes[0], "fwd_s", "forward"), (axes[1], "fwdbwd_s", "forward+backward")):
        for form in sorted({r["form"] for r in results}):
            pts = sorted((r["T"], r[key]) for r in results
                         if r["form"] == form and r.get(key) and r["K"] == K and r["H"] == H)
            if len(pts) < 1:
                continue
            style = "-o" if "chunk" in form else ("--s" if "recurrent" in form else ":^")
            ax.loglog(*zip(*pts), style, label=form, markersize=4)
        ax.set_xlabel("T (tokens)")
        ax.set_ylabel("seconds")
        ax.set_title(f"{title}, B=1, H={H}, K=V={K}")
        ax.grid(True, which="both", alpha=0.3)
    axes[1].legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    run(argv)


if __name__ == "__main__":
    main()
