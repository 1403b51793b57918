"""Optimizer-state memory of the LLaMA configs of the GaLore paper (60M to 7B, untied embeddings).

Counts come from ``optim.state_bytes`` (``jax.eval_shape`` of ``tx.init``: exact,
nothing allocated), next to the per-matrix state formula of each method
(``W`` ``m × n``, ``m <= n``, rank ``r``). The ``AdamW`` row is ``optim.adamw``
(``optax.adamw``); in the low-rank rows the leaves that are not projected keep
full Adam moments in the aliases' ``'adam'`` branch (the "other (Adam)" column).

The ``SLTrain + AdamW`` rows are a different model, not a different optimizer: every
attention / MLP weight is re-parameterised as SLTrain (``models/sltrain.py``: ``A (m, r)``,
``B (r, n)`` and ``round(delta m n)`` sparse values; rank ``r = hidden / 4``, density
``delta = 0.03``) and trained with plain AdamW, so its parameter column shrinks too; a second
table adds the weights to the state for AdamW on the dense model against SLTrain.

    .venv/bin/python experiments/bench/optim_memory.py [--dtype bfloat16] [--markdown PATH]
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from lolax import optim  # noqa: E402
from lolax.optim.accounting import LLAMA_CONFIGS, llama_abstract_params  # noqa: E402

FORMULAS = {
    "AdamW": "2mn",
    "AdamW 8-bit": "2mn (1 byte each, plus a float32 scale per 256)",
    "LISA (2 layers) + AdamW": "2mn for 2 sampled layers, 0 for the others",
    "OwLore (2 layers)": "GaLore's mr + 2nr for 2 sampled layers, 0 for the others",
    "GaLore (std)": "mr (projector) + 2nr",
    "GaLore 8-bit": "mr (projector) + 2nr (1 byte each, plus a float32 scale per 256)",
    "APOLLO": "2nr + 2 (key, limiter norm)",
    "APOLLO-Mini": "2n + 2",
    "Fira": "GaLore + 1",
    "FRUGAL (rho=0.25)": "mr + 2nr, r = round(rho*m)",
    "SLTrain + AdamW": "2(mr + rn + delta mn) (A, B, S values)",
}
SLTRAIN_DENSITY = 0.03
DENSE_ADAM = ("AdamW", "AdamW 8-bit")      # rows whose state covers every weight
LISA_ACTIVE = 2


def sltrain_rank(cfg) -> int:
    return cfg["hidden"] // 4


def block_values(params) -> int:
    """Values of the leaves under an ``attn`` or ``mlp`` block, norms excluded (the projections)."""
    return sum(int(np.prod(x.shape)) for p, x in jax.tree_util.tree_flatten_with_path(params)[0]
               if {"attn", "mlp"} & set(optim.masking.path_names(p)))


def optimizers(cfg):
    gr, ar = cfg["galore_rank"], cfg["apollo_rank"]
    return {
        "AdamW": optim.adamw(1e-2),
        "AdamW 8-bit": optim.adamw_8bit(1e-2),
        "LISA (2 layers) + AdamW": optim.lisa_adamw(1e-2, num_active=LISA_ACTIVE),
        "OwLore (2 layers)": optim.owlore(1e-2, num_active=LISA_ACTIVE, rank=gr),
        "GaLore (std)": optim.galore(1e-2, rank=gr),
        "GaLore 8-bit": optim.galore(1e-2, rank=gr, moments_8bit=True),
        "APOLLO": optim.apollo(1e-2, rank=ar),
        "APOLLO-Mini": optim.apollo_mini(1e-2),
        "Fira": optim.fira(1e-2, rank=gr),
        "FRUGAL (rho=0.25)": optim.frugal(1e-2, density=0.25),
    }


def linears_state(name: str, low: int, n_lin: int, cfg) -> int:
    """State values on the projected kernels: the low-rank state, both Adam moments of every
    kernel, or (LISA) both moments of the kernels of the sampled layers."""
    if name in DENSE_ADAM:
        return 2 * n_lin
    if name.startswith("LISA"):
        return 2 * n_lin * LISA_ACTIVE // cfg["layers"]
    return low


def table(dtype=jnp.float32):
    rows = []
    for size, cfg in LLAMA_CONFIGS.items():
        params = llama_abstract_params(dtype=dtype, **cfg)
        n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
        n_lin = sum(int(np.prod(x.shape)) for p, x in jax.tree_util.tree_flatten_with_path(params)[0]
                    if optim.masking.is_projected_path(optim.masking.path_names(p), len(x.shape)))
        for name, tx in optimizers(cfg).items():
            b = optim.state_bytes(tx, params)
            low = sum(v["values"] for k, v in b.items() if k.startswith("lowrank/"))
            adam = sum(v["values"] for k, v in b.items() if k.startswith("adam/") or k in ("mu", "nu"))
            rows.append(dict(size=size, params_M=n_params / 1e6, linears_M=n_lin / 1e6, optimizer=name,
                             rank=(cfg["galore_rank"] if name in ("GaLore (std)", "GaLore 8-bit", "Fira",
                                                                  "OwLore (2 layers)") else
                                   cfg["apollo_rank"] if name == "APOLLO" else
                                   1 if name == "APOLLO-Mini" else "-"),
                             linears_state_M=linears_state(name, low, n_lin, cfg) / 1e6,
                             other_adam_M=(adam - (linears_state(name, low, n_lin, cfg) if name in DENSE_ADAM
                                                   or name.startswith("LISA") else 0)) / 1e6,
                             total_M=b["total"]["values"] / 1e6,
                             total_GiB=b["total"]["bytes"] / 2**30,
                             formula=FORMULAS[name]))
        rows.append(sltrain_row(size, cfg, dtype))
    return rows


def sltrain_row(size, cfg, dtype):
    params = llama_abstract_params(dtype=dtype, sltrain_rank=sltrain_rank(cfg), sltrain_density=SLTRAIN_DENSITY,
                                   **cfg)
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    n_lin = block_values(params)
    b = optim.state_bytes(optim.adamw(1e-2), params)
    adam = sum(v["values"] for k, v in b.items() if k in ("mu", "nu"))
    return dict(size=size, params_M=n_params / 1e6, linears_M=n_lin / 1e6, optimizer="SLTrain + AdamW",
                rank=sltrain_rank(cfg), linears_state_M=2 * n_lin / 1e6, other_adam_M=(adam - 2 * n_lin) / 1e6,
                total_M=b["total"]["values"] / 1e6, total_GiB=b["total"]["bytes"] / 2**30,
                weights_GiB=optim.param_bytes(params) / 2**30, formula=FORMULAS["SLTrain + AdamW"])


def with_weights(rows, dtype=jnp.float32):
    """Per size: weights + AdamW state of the dense model against the SLTrain model."""
    out = []
    for size, cfg in LLAMA_CONFIGS.items():
        dense = next(r for r in rows if r["size"] == size and r["optimizer"] == "AdamW")
        slt = next(r for r in rows if r["size"] == size and r["optimizer"] == "SLTrain + AdamW")
        dense_w = optim.param_bytes(llama_abstract_params(dtype=dtype, **cfg)) / 2**30
        out.append(dict(size=size, rank=slt["rank"], dense_M=dense["params_M"], sltrain_M=slt["params_M"],
                        dense_GiB=dense_w + dense["total_GiB"], sltrain_GiB=slt["weights_GiB"] + slt["total_GiB"]))
    return out


def markdown(rows, dtype_name):
    out = [f"State values (millions) and bytes ({dtype_name} states), untied embeddings, "
           "vocab 32000; 'linears' = attention/MLP kernels projected by the default mask, "
           "'other' = Adam moments of embeddings, norms and LM head.", "",
           "| model | params (linears) | optimizer | rank | state on linears | other (Adam) "
           "| total values | total GiB | per-matrix formula |",
           "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['size']} | {r['params_M']:.2f}M ({r['linears_M']:.2f}M) | {r['optimizer']} "
                   f"| {r['rank']} | {r['linears_state_M']:.3f}M | {r['other_adam_M']:.2f}M "
                   f"| {r['total_M']:.2f}M | {r['total_GiB']:.3f} | {r['formula']} |")
    out += ["", f"Weights plus AdamW state ({dtype_name} weights and states): the dense model against "
            f"SLTrain (rank hidden/4, density {SLTRAIN_DENSITY}) on every attention/MLP weight; "
            "embeddings and head stay dense in both.", "",
            "| model | SLTrain rank | params dense | params SLTrain | dense + AdamW GiB | SLTrain + AdamW GiB "
            "| SLTrain / dense |",
            "|---|---|---|---|---|---|---|"]
    for r in with_weights(rows, jnp.dtype(dtype_name)):
        out.append(f"| {r['size']} | {r['rank']} | {r['dense_M']:.2f}M | {r['sltrain_M']:.2f}M "
                   f"| {r['dense_GiB']:.3f} | {r['sltrain_GiB']:.3f} | {r['sltrain_GiB'] / r['dense_GiB']:.2f} |")
    return "\n".join(out)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--markdown", default=None, help="also write the table to this file")
    args = ap.parse_args()
    rows = table(jnp.dtype(args.dtype))
    md = markdown(rows, args.dtype)
    print(md)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(md + "\n")


if __name__ == "__main__":
    main()
