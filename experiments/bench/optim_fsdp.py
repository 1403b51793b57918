r"""Communication of one optimizer step under FSDP, read from compiled HLO on 8 simulated devices.

The seven attention/MLP matrices of one LLaMA-60M layer (float32) are sharded over their first
axis on an 8-device ``fsdp`` mesh (explicit sharding), and one jitted ``tx.update`` is compiled
(never run) per optimizer.  The collectives in the compiled HLO are summed with
``parallelism.hlo``: bytes one device sends under ring algorithms, split into the ops every step
runs and those inside a ``lax.cond`` branch (the projector refresh, taken every ``T`` steps).

Two versions of each low-rank method are compiled:

* ``gathered``: the gradient, moments and projector are all-gathered before the step and the
  results resharded after it (how the low-rank optimizers ran under FSDP before they kept the
  maths sharded; emulated here by resharding the update's inputs to replicated);
* ``sharded``: the optimizer as it is, with the projections contracting over the sharded
  dimension (an all-reduce of the small projected matrix) and the gradient gathered only for
  the SVD of a refresh.

    python -m experiments.bench.optim_fsdp --out docs/results      # about a minute on 2 cores

Outputs ``optim_fsdp.json``, ``optim_fsdp.md`` and ``optim_fsdp.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform

os.environ.setdefault("JAX_PLATFORMS", "cpu")
_FORCED = "xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", "")
if "JAX_NUM_CPU_DEVICES" not in os.environ and not _FORCED:
    os.environ["JAX_NUM_CPU_DEVICES"] = "8"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.sharding import AxisType, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from experiments.bench import write_outputs  # noqa: E402
from lolax import optim  # noqa: E402
from lolax.optim.accounting import LLAMA_CONFIGS  # noqa: E402
from lolax.parallelism import hlo  # noqa: E402

DEVICES = 8
RANK = 128
METHODS = (
    ("adamw", "adamw", {}),
    ("galore", "galore", {"rank": RANK}),
    ("galore (8-bit moments)", "galore", {"rank": RANK, "moments_8bit": True}),
    ("fira", "fira", {"rank": RANK}),
    ("frugal", "frugal", {"rank": RANK}),
    ("natural_galore", "natural_galore", {"rank": RANK}),
    ("apollo", "apollo", {"rank": RANK}),
    ("apollo_mini", "apollo_mini", {}),
)


def layer_shapes() -> dict:
    cfg = LLAMA_CONFIGS["60M"]
    h, f = cfg["hidden"], cfg["ffn"]
    return {"attn": {n: {"kernel": (h, h)} for n in ("q_proj", "k_proj", "v_proj", "o_proj")},
            "mlp": {"gate_proj": {"kernel": (h, f)}, "up_proj": {"kernel": (h, f)},
                    "down_proj": {"kernel": (f, h)}}}


def _totals(ops: list[hlo.Collective]) -> dict:
    out = {}
    for where, keep in (("every_step", False), ("refresh_only", True)):
        chosen = [op for op in ops if op.conditional == keep]
        out[where] = {"sent_bytes": int(sum(op.traffic for op in chosen)),
                      "ops": {k: int(v["count"]) for k, v in hlo.summary(chosen).items()}}
    return out


def measure(tx, mesh, shapes, gathered: bool) -> dict:
    spec = NamedSharding(mesh, P("fsdp", None))
    params = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s, jnp.float32, sharding=spec), shapes,
                          is_leaf=lambda x: isinstance(x, tuple))
    with jax.set_mesh(mesh):
        state = jax.eval_shape(tx.init, params)

        def step(g, s, p):
            if not gathered:
                return tx.update(g, s, p)
            whole = lambda t: jax.tree.map(lambda x: jax.sharding.reshard(x, P()), t)
            u, s2 = tx.update(whole(g), whole(s), p)
            back = lambda new, old: jax.sharding.reshard(new, jax.typeof(old).sharding.spec)
            return jax.tree.map(back, u, g), jax.tree.map(back, s2, s)

        text = jax.jit(step).lower(params, state, params).compile().as_text()
    return _totals(hlo.collectives(text))


def run() -> dict:
    if jax.device_count() < DEVICES:
        raise SystemExit(f"needs {DEVICES} devices, found {jax.device_count()} (set JAX_NUM_CPU_DEVICES=8)")
    mesh = jax.make_mesh((DEVICES,), ("fsdp",), axis_types=(AxisType.Explicit,),
                         devices=jax.devices()[:DEVICES])
    shapes = layer_shapes()
    gradient_bytes = sum(4 * a * b for a, b in jax.tree.leaves(shapes, is_leaf=lambda x: isinstance(x, tuple)))
    rows = []
    for label, name, kw in METHODS:
        tx = optim.from_config(name, 1e-2, **kw)
        row = {"method": label, "sharded": measure(tx, mesh, shapes, gathered=False)}
        if name != "adamw":
            row["gathered"] = measure(tx, mesh, shapes, gathered=True)
        rows.append(row)
        print(label, json.dumps(row), flush=True)
    return {"devices": DEVICES, "rank": RANK, "layer": "LLaMA-60M, 7 matrices, float32",
            "gradient_bytes": gradient_bytes, "jax": jax.__version__, "machine": platform.processor() or
            platform.machine(), "rows": rows}


def _mb(x: float) -> str:
    return f"{x / 2 ** 20:.2f}"


def markdown(res: dict) -> str:
    lines = [f"One optimizer step on the {res['layer']} layer sharded over {res['devices']} simulated devices "
             f"(rank {res['rank']}); MiB one device sends (ring algorithms), from the compiled HLO. "
             f"The layer's gradient is {_mb(res['gradient_bytes'])} MiB.", "",
             "| method | gathered: every step | sharded: every step | sharded: refresh only | collectives every step |",
             "|---|---|---|---|---|"]
    for r in res["rows"]:
        g, s = r.get("gathered"), r["sharded"]
        before = _mb(g["every_step"]["sent_bytes"] + g["refresh_only"]["sent_bytes"]) if g else "-"
        ops = ", ".join(f"{n} {k}" for k, n in s["every_step"]["ops"].items()) or "none"
        lines.append(f"| {r['method']} | {before} | {_mb(s['every_step']['sent_bytes'])} "
                     f"| {_mb(s['refresh_only']['sent_bytes'])} | {ops} |")
    return "\n".join(lines) + "\n"


def plot(res: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in res["rows"] if "gathered" in r]
    names = [r["method"] for r in rows]
    gathered = [(r["gathered"]["every_step"]["sent_bytes"] + r["gathered"]["refresh_only"]["sent_bytes"]) / 2 ** 20
                for r in rows]
    every = [r["sharded"]["every_step"]["sent_bytes"] / 2 ** 20 for r in rows]
    refresh = [r["sharded"]["refresh_only"]["sent_bytes"] / 2 ** 20 for r in rows]
    x = range(len(rows))
    fig, ax = plt.subplots(figsize=(9, 4))
    ax.bar([i - 0.27 for i in x], gathered, 0.27, label="gathered, every step")
    ax.bar(list(x), every, 0.27, label="sharded, every step")
    ax.bar([i + 0.27 for i in x], refresh, 0.27, label="sharded, refresh steps only")
    ax.set_xticks(list(x), names, rotation=20, ha="right")
    ax.set_yscale("symlog", linthresh=0.01)
    ax.set_ylabel("MiB sent per device")
    ax.set_title(f"optimizer step under FSDP ({res['devices']} devices, {res['layer']})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="runs/bench", help="folder for optim_fsdp.{json,md,png}")
    args = ap.parse_args()
    print(write_outputs(args.out, "optim_fsdp", run(), markdown, plot))


if __name__ == "__main__":
    main()
