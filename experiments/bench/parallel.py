r"""Communication bytes and per-device memory of one sequence-parallel layer, read from compiled HLO.

For LASP-2 (simple_gla and gated_delta_rule), ring attention, Ulysses and all-gather-KV attention
this compiles (never runs) one layer's forward and forward+backward on sub-meshes of the simulated
devices, sums the collectives in the compiled HLO (``parallelism.hlo``: result bytes, and the
bytes one device sends under ring algorithms, loops counted by their trip count), and reads
``memory_analysis()`` (per device: arguments + outputs + temporaries − aliased).  Simulated CPU
devices share the host's cores, so no timings are reported: bytes and memory only.

    JAX_NUM_CPU_DEVICES=8 python -m experiments.bench.parallel            # writes docs/results/
    JAX_NUM_CPU_DEVICES=8 python -m experiments.bench.parallel --quick    # 2 points per method

Outputs ``docs/results/parallel_comm.json``, ``parallel_comm.md`` (tables) and
``parallel_comm.png`` (bytes sent per device against T at W = 8, and against W at fixed T).
"""

from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
_FORCED = "xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", "")
if "JAX_NUM_CPU_DEVICES" not in os.environ and not _FORCED:
    os.environ["JAX_NUM_CPU_DEVICES"] = "8"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from lolax.parallelism import hlo  # noqa: E402
from lolax.parallelism.lasp2 import lasp2  # noqa: E402
from lolax.parallelism.ring import sequence_parallel_attention  # noqa: E402

METHODS = ("lasp2_simple_gla", "lasp2_gated_delta_rule", "ring", "ulysses", "allgather")
B, H, D = 1, 8, 64          # batch, heads, head dim (K = V = D)
CHUNK = 64


def _layer(method, mesh):
    if method.startswith("lasp2_"):
        family = method[len("lasp2_"):]

        def f(q, k, v, g, beta):
            kw = {"g": g} if family == "simple_gla" else {"g": g, "beta": beta}
            return lasp2(family, q, k, v, mesh=mesh, chunk_size=CHUNK, **kw)[0]
    else:
        def f(q, k, v, g, beta):
            return sequence_parallel_attention(q, k, v, mesh=mesh, mode=method)
    return f


def measure(method: str, W: int, T: int) -> dict:
    mesh = jax.make_mesh((W,), ("sequence",), axis_types=(jax.sharding.AxisType.Auto,),
                         devices=jax.devices()[:W])
    sh = NamedSharding(mesh, P(None, "sequence"))
    x = jax.ShapeDtypeStruct((B, T, H, D), jnp.float32, sharding=sh)
    gate = jax.ShapeDtypeStruct((B, T, H), jnp.float32, sharding=sh)
    f = _layer(method, mesh)
    grad = jax.grad(lambda *a: jnp.sum(f(*a) ** 2), argnums=(0, 1, 2, 3, 4))
    row = {"method": method, "W": W, "T": T, "B": B, "H": H, "D": D}
    for name, fn in (("fwd", f), ("fwd_bwd", grad)):
        t0 = time.perf_counter()
        compiled = jax.jit(fn).lower(x, x, x, gate, gate).compile()
        ops = hlo.collectives(compiled.as_text())
        mem = compiled.memory_analysis()
        row[name] = {
            "collectives": {k: {"count": int(v["count"]), "bytes": int(v["bytes"]),
                                "sent_bytes": float(v["traffic"])}
                            for k, v in hlo.summary(ops).items()},
            "sent_bytes": float(sum(op.traffic for op in ops)),
            "memory": {"argument": int(mem.argument_size_in_bytes), "output": int(mem.output_size_in_bytes),
                       "temp": int(mem.temp_size_in_bytes), "alias": int(mem.alias_size_in_bytes),
                       "peak": int(mem.argument_size_in_bytes + mem.output_size_in_bytes
                                   + mem.temp_size_in_bytes - mem.alias_size_in_bytes)},
            "compile_s": round(time.perf_counter() - t0, 2),
        }
    return row


def _fmt(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def table(rows: list[dict]) -> str:
    head = ("| method | W | T | fwd collectives | fwd sent / device | fwd+bwd sent / device | "
            "fwd peak mem / device | fwd+bwd peak mem / device |\n|---|---|---|---|---|---|---|---|\n")
    lines = []
    for r in rows:
        coll = ", ".join(f"{v['count']}× {k}" for k, v in r["fwd"]["collectives"].items())
        lines.append(f"| {r['method']} | {r['W']} | {r['T']} | {coll} | {_fmt(r['fwd']['sent_bytes'])} | "
                     f"{_fmt(r['fwd_bwd']['sent_bytes'])} | {_fmt(r['fwd']['memory']['peak'])} | "
                     f"{_fmt(r['fwd_bwd']['memory']['peak'])} |")
    return head + "\n".join(lines) + "\n"


def plot(rows: list[dict], path: str, W_fixed: int, T_fixed: int) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for m in METHODS:
        a = sorted((r for r in rows if r["method"] == m and r["W"] == W_fixed), key=lambda r: r["T"])
        if a:
            axes[0].plot([r["T"] for r in a], [r["fwd_bwd"]["sent_bytes"] for r in a], "o-", label=m)
            axes[2].plot([r["T"] for r in a], [r["fwd_bwd"]["memory"]["peak"] for r in a], "o-", label=m)
        b = sorted((r for r in rows if r["method"] == m and r["T"] == T_fixed), key=lambda r: r["W"])
        if b:
            axes[1].plot([r["W"] for r in b], [r["fwd_bwd"]["sent_bytes"] for r in b], "o-", label=m)
    axes[0].set(xscale="log", yscale="log", xlabel="T (tokens)", ylabel="bytes sent per device",
                title=f"fwd+bwd communication, W = {W_fixed}")
    axes[1].set(xscale="log", yscale="log", xlabel="W (devices on the sequence axis)",
                ylabel="bytes sent per device", title=f"fwd+bwd communication, T = {T_fixed}")
    axes[2].set(xscale="log", yscale="log", xlabel="T (tokens)", ylabel="bytes",
                title=f"fwd+bwd peak memory per device, W = {W_fixed}")
    for ax in axes:
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"one layer, B={B}, H={H}, head dim {D}, float32 (from compiled HLO)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="docs/results")
    ap.add_argument("--Ts", default="4096,16384,65536", help="T values at W = max")
    ap.add_argument("--Ws", default="2,4,8", help="W values at T = --T-fixed")
    ap.add_argument("--T-fixed", type=int, default=16384)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--quick", action="store_true", help="T in {4096, 16384} at W = 8 only")
    args = ap.parse_args(argv)
    Ts = [4096, 16384] if args.quick else [int(t) for t in args.Ts.split(",")]
    Ws = [] if args.quick else [int(w) for w in args.Ws.split(",")]
    Wmax = jax.device_count()
    points = sorted({(Wmax, T) for T in Ts} | {(W, args.T_fixed) for W in Ws if W <= Wmax})
    rows = []
    for method in args.methods.split(","):
        for W, T in points:
            if method == "ulysses" and H % W:
                continue
            r = measure(method, W, T)
            rows.append(r)
            print(f"{method:24s} W={W} T={T:6d}  fwd sent {_fmt(r['fwd']['sent_bytes']):>10s}  "
                  f"fwd+bwd sent {_fmt(r['fwd_bwd']['sent_bytes']):>10s}  "
                  f"peak {_fmt(r['fwd_bwd']['memory']['peak']):>10s}", flush=True)
    os.makedirs(args.out, exist_ok=True)
    meta = {"devices": jax.device_count(), "platform": jax.devices()[0].platform, "jax": jax.__version__,
            "B": B, "H": H, "D": D, "chunk_size": CHUNK, "dtype": "float32",
            "sent_bytes": "per device, ring algorithms: all-gather/all-to-all (n-1)/n x result, "
                          "reduce-scatter (n-1) x result, all-reduce 2(n-1)/n x size, "
                          "collective-permute 1 x size, loops times trip count"}
    with open(os.path.join(args.out, "parallel_comm.json"), "w") as fh:
        json.dump({"meta": meta, "rows": rows}, fh, indent=1)
    with open(os.path.join(args.out, "parallel_comm.md"), "w") as fh:
        fh.write(f"One layer, B={B}, H={H}, head dim {D}, float32; bytes and memory per device from "
                 "compiled HLO (`python -m experiments.bench.parallel`).\n\n" + table(rows))
    plot(rows, os.path.join(args.out, "parallel_comm.png"), Wmax, args.T_fixed)
    print(f"wrote {args.out}/parallel_comm.{{json,md,png}}")


if __name__ == "__main__":
    main()
