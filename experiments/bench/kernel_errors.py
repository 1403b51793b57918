"""Accuracy of the Pallas kernels against the naive oracles, run in Pallas' interpreters on CPU.

    python -m experiments.bench.kernel_errors --out docs/results     # about 10 minutes on 2 CPU cores

For every family (linear_attn, simple_gla, gla, delta_rule, gated_delta_rule), on the TPU kernels
(Mosaic interpreter) and the GPU kernels (generic interpreter), the relative RMS error
``rms(out - ref) / rms(ref)`` of o, the final state and every gradient under the loss
``Σ o ⊙ do + Σ S_T ⊙ dS_T`` (``lolax.ops.testing``), in three cases: float32 packed sequences of
lengths 1, 0, 15 and 63 with an initial state each and strong gates (the delta rules with steps
in [0, 2] and ``allow_neg_eigval``, Gated DeltaNet with 4 value heads on 2 key heads); bf16 at
B = 2, T = 200 with the default two-part products; the same with single-part bf16 products
(``split_bf16=False``).  Writes ``kernel_errors.json`` and ``kernel_errors.md``.
"""

from __future__ import annotations

import argparse
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from lolax.ops import PALLAS_FAMILIES, interpret_kernels, kernel_tuning
from lolax.ops.testing import DELTA, family_inputs, family_op, rel_rms_error, value_and_grads

LENGTHS = (1, 0, 15, 63)
CASES = {"f32 packed, strong gates": dict(dtype=jnp.float32, packed=True, split=True),
         "bf16 T=200": dict(dtype=jnp.bfloat16, packed=False, split=True),
         "bf16 T=200, one-part products": dict(dtype=jnp.bfloat16, packed=False, split=False)}


def case_errors(family: str, backend: str, dtype, packed: bool, split: bool) -> dict[str, float]:
    """Relative RMS errors of one family's kernels against its oracle in one case."""
    kw = {}
    if packed:
        cu = np.concatenate([[0], np.cumsum(LENGTHS)]).astype(np.int32)
        delta = family in DELTA
        args, do, dht = family_inputs(family, 0, 1, int(cu[-1]), 2, 16, 32, strength=0.1, num_states=len(LENGTHS),
                                      beta_max=2.0 if delta else 1.0,
                                      value_heads=4 if family == "gated_delta_rule" else None)
        kw = {"cu_seqlens": cu, **({"allow_neg_eigval": True} if delta else {})}
    else:
        args, do, dht = family_inputs(family, 0, 2, 200, 2, 16, 32, dtype=dtype)
    run = lambda fn: jax.jit(lambda a: value_and_grads(fn, a, do, dht))(args)
    ref = run(family_op(family, "naive", **kw))
    with interpret_kernels(backend), kernel_tuning(backend, split_bf16=split):
        out = run(family_op(family, "chunk", implementation="pallas", chunk_size=32 if packed else 64, **kw))
    errors = {"o": rel_rms_error(ref[0], out[0]), "final_state": rel_rms_error(ref[1], out[1])}
    errors.update({"d" + name: rel_rms_error(ref[2][name], out[2][name]) for name in ref[2]})
    return errors


def table(results: dict) -> str:
    cols = ["o", "final_state", "dq", "dk", "dv", "dg", "dbeta", "dinitial_state"]
    lines = ["| case | family | backend | " + " | ".join(cols) + " |", "|---" * (len(cols) + 3) + "|"]
    for case, by_family in results.items():
        for family, by_backend in by_family.items():
            for backend, e in by_backend.items():
                cells = [f"{e[c]:.1e}" if c in e else "–" for c in cols]
                lines.append(f"| {case} | {family} | {backend} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="docs/results")
    args = parser.parse_args(argv)
    results = {case: {f: {b: case_errors(f, b, **spec) for b in ("tpu", "gpu")} for f in PALLAS_FAMILIES}
               for case, spec in CASES.items()}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "kernel_errors.json"), "w") as f:
        json.dump({"jax": jax.__version__, "backend": jax.default_backend(), "errors": results}, f, indent=1)
    text = table(results)
    with open(os.path.join(args.out, "kernel_errors.md"), "w") as f:
        f.write("Relative RMS error of the interpreted kernels against the naive oracles "
                "(`python -m experiments.bench.kernel_errors`).\n\n" + text + "\n")
    print(text)
    return results


if __name__ == "__main__":
    main()
