"""Memory of the chunk forms grows linearly in T (XLA memory_analysis, compile only), strong
decays stay finite at 64K, and the ops benchmark runs end to end (--quick)."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lolax.ops.testing import GATES, family_op, random_inputs

H, K, V = 2, 32, 32


def _peak_bytes(family, T, grad):
    gate = GATES[family]
    sd = lambda *s: jax.ShapeDtypeStruct(s, jnp.float32)
    args = {"q": sd(1, T, H, K), "k": sd(1, T, H, K), "v": sd(1, T, H, V)}
    if gate:
        args["g"] = sd(1, T, H) if gate == "scalar" else sd(1, T, H, K)
    fn = family_op(family, "chunk", output_final_state=False)
    f = jax.grad(lambda a: jnp.sum(fn(**a)[0])) if grad else (lambda a: fn(**a)[0])
    m = jax.jit(f).lower(args).compile().memory_analysis()
    return m.temp_size_in_bytes + m.argument_size_in_bytes + m.output_size_in_bytes


@pytest.mark.parametrize("family", ["linear_attn", "simple_gla", "gla"])
def test_memory_grows_linearly(family):
    """Quadrupling T (2K -> 8K) must not more than ~4.4x the forward+backward peak (a T×T term
    would give 16x); the 4K/16K/64K figures of docs/ops.md come from experiments/bench/ops.py.
    (The delta rules' check is in test_ops_delta.py.)"""
    small, big = _peak_bytes(family, 2048, True), _peak_bytes(family, 8192, True)
    assert big <= 4.4 * small, f"{family} forward+backward: {small} -> {big} bytes"


@pytest.mark.slow
@pytest.mark.parametrize("family", ["simple_gla", "gla"])
def test_strong_decay_64k_finite(family):
    x = random_inputs(0, 1, 65536, 1, 16, 16, gate=GATES[family], strength=0.1)
    fn = family_op(family, "chunk")
    args = {a: x[a] for a in ("q", "k", "v", "g")}
    o, h = jax.jit(lambda a: fn(**a))(args)
    grads = jax.jit(jax.grad(lambda a: jnp.sum(fn(**a)[0])))(args)
    for x in (o, h, *jax.tree.leaves(grads)):
        assert np.all(np.isfinite(np.asarray(x)))


def test_bench_quick_smoke(tmp_path):
    from experiments.bench import ops as bench

    out = bench.run(["--quick", "--families", "linear_attn", "--out", str(tmp_path)])
    assert {r["form"] for r in out["results"]} >= {"linear_attn/chunk", "linear_attn/recurrent"}
    assert out["peak_gflops"] > 0
    for name in ("ops_bench.json", "ops_bench.md", "ops_bench.png"):
        assert os.path.getsize(tmp_path / name) > 0
    assert json.load(open(tmp_path / "ops_bench.json"))["memory"]
