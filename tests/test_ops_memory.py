"""Memory of the chunk forms grows linearly in T (XLA memory_analysis, compile only), strong
decays stay finite at long T, and the ops benchmark runs end to end (--quick)."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ops.gla import chunk_gla, recurrent_gla
from ops.linear_attn import chunk_linear_attn
from ops.simple_gla import chunk_simple_gla
from ops.testing import assert_close

H, K, V = 2, 32, 32
FAMILIES = {"linear_attn": (chunk_linear_attn, None), "simple_gla": (chunk_simple_gla, "scalar"),
            "gla": (chunk_gla, "vector")}


def _peak_bytes(fn, gate, T, grad):
    sd = lambda *s: jax.ShapeDtypeStruct(s, jnp.float32)
    args = [sd(1, T, H, K), sd(1, T, H, K), sd(1, T, H, V)]
    if gate == "scalar":
        args.append(sd(1, T, H))
    elif gate == "vector":
        args.append(sd(1, T, H, K))
    if grad:
        f = jax.grad(lambda *a: jnp.sum(fn(*a)[0]), argnums=tuple(range(len(args))))
    else:
        f = lambda *a: fn(*a)[0]
    m = jax.jit(f).lower(*args).compile().memory_analysis()
    return m.temp_size_in_bytes + m.argument_size_in_bytes + m.output_size_in_bytes


@pytest.mark.parametrize("family", list(FAMILIES))
def test_memory_grows_linearly(family):
    """Quadrupling T (2K -> 8K) must not more than ~4.4x the forward+backward peak (a T×T term
    would give 16x);
    the 4K/16K/64K figures of docs/ops.md come from experiments/bench/ops.py."""
    fn, gate = FAMILIES[family]
    small, big = _peak_bytes(fn, gate, 2048, True), _peak_bytes(fn, gate, 8192, True)
    assert big <= 4.4 * small, f"{family} forward+backward: {small} -> {big} bytes"


def _strong(T, shape_tail, seed=0):
    rng = np.random.default_rng(seed)
    n = lambda *s: jnp.asarray(rng.standard_normal(s).astype(np.float32))
    q, k, v = n(1, T, 1, 16), n(1, T, 1, 16), n(1, T, 1, 16)
    g = jax.nn.log_sigmoid(n(1, T, 1, *shape_tail)) / 0.1          # down to ~-50 per step
    return q, k, v, g


def test_gla_strong_decay_long_sequence_finite():
    """T = 4K, gates logsigmoid(u)/0.1: output, state and gradients finite; chunk = recurrent."""
    q, k, v, g = _strong(4096, (16,))
    o, h = jax.jit(lambda *a: chunk_gla(*a, output_final_state=True))(q, k, v, g)
    o2, h2 = jax.jit(lambda *a: recurrent_gla(*a, output_final_state=True))(q, k, v, g)
    assert_close("o", o2, o, 1e-5)
    assert_close("state", h2, h, 1e-5)
    grads = jax.jit(jax.grad(lambda *a: jnp.sum(chunk_gla(*a)[0]), argnums=(0, 1, 2, 3)))(q, k, v, g)
    assert all(np.all(np.isfinite(np.asarray(x))) for x in grads)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["simple_gla", "gla"])
def test_strong_decay_64k_finite(family):
    q, k, v, g = _strong(65536, (16,) if family == "gla" else ())
    fn = FAMILIES[family][0]
    o, h = jax.jit(lambda *a: fn(*a, output_final_state=True))(q, k, v, g)
    grads = jax.jit(jax.grad(lambda *a: jnp.sum(fn(*a)[0]), argnums=(0, 1, 2, 3)))(q, k, v, g)
    for x in (o, h) + tuple(grads):
        assert np.all(np.isfinite(np.asarray(x)))


def test_bench_quick_smoke(tmp_path):
    from experiments.bench import ops as bench

    out = bench.run(["--quick", "--families", "linear_attn", "--out", str(tmp_path)])
    assert {r["form"] for r in out["results"]} >= {"linear_attn/chunk", "linear_attn/recurrent"}
    assert out["peak_gflops"] > 0
    for name in ("ops_bench.json", "ops_bench.md", "ops_bench.png"):
        assert os.path.getsize(tmp_path / name) > 0
    assert json.load(open(tmp_path / "ops_bench.json"))["memory"]
