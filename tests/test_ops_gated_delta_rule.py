"""Gated DeltaNet ops: chunk vs recurrent vs naive, gate-strength sweep, grouped values, packing,
decoding, long sequences with strong gates, argument checks.  Harness and tolerances: see
``test_ops_delta_rule.py``."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import pytest

from ops import gated_delta_rule
from ops.testing import assert_close
from test_ops_delta_rule import (FAMILIES, call, check_family, decode_case, forward_and_grads, jcall,
                                 make_inputs, packed_case, validation_cases)


@pytest.mark.parametrize("gate_c", [0.1, 1.0, 10.0])
def test_gate_strength_sweep(gate_c):
    """g = logsigmoid(u)/c; c = 0.1 is a 10x stronger decay (overflow check of the chunk form)."""
    check_family("gated", 2, 63, 2, 16, 16, chunk_size=16, gate_c=gate_c)


def test_long_chunks_and_head_dims():
    check_family("gated", 1, 200, 2, 64, 100, chunk_size=64)


def test_beta_up_to_two():
    check_family("gated", 2, 63, 2, 16, 16, chunk_size=16, beta_max=2.0, gate_c=0.1)


@pytest.mark.slow
def test_bfloat16():
    check_family("gated", 2, 63, 2, 16, 16, dtype=jnp.bfloat16, chunk_size=16)


def test_grouped_value_heads():
    """HV = 2H: value head hv reads q/k head hv // 2 (checked against explicitly repeated q, k)."""
    check_family("gated", 1, 40, 2, 16, 16, HV=4, chunk_size=16)
    args, _ = make_inputs(1, 40, 2, 16, 16, gated=True, HV=4)
    rep = dict(args, q=jnp.repeat(args["q"], 2, axis=2), k=jnp.repeat(args["k"], 2, axis=2))
    o_ref, h_ref = jcall(FAMILIES["gated"]["naive"], rep, True)
    o, h = jcall(FAMILIES["gated"]["naive"], args, True)      # chunk == naive is checked above
    assert o.shape == (1, 40, 4, 16) and h.shape == (1, 4, 16, 16)
    assert_close("o", o_ref, o, 2e-5)
    assert_close("state", h_ref, h, 2e-5)


def test_packed_with_grouped_values():
    packed_case("gated", [1, 15, 37, 16, 2], chunk_size=16, HV=4)


def test_decode_with_grouped_values():
    decode_case("gated", HV=4)


def test_validation():
    validation_cases("gated")
    args, _ = make_inputs(1, 8, 2, 4, 4, gated=True, HV=3)
    with pytest.raises(ValueError, match="multiple"):
        call(FAMILIES["gated"]["chunk"], args, True)


def test_transitions_compose_to_final_state():
    args, _ = make_inputs(2, 50, 2, 16, 8, gated=True, gate_c=0.5)
    m, s_ext = jax.jit(functools.partial(gated_delta_rule.chunk_gated_transitions, chunk_size=16))(
        args["k"], args["v"], args["g"], args["beta"])
    S = args["h0"]
    for c in range(m.shape[1]):
        S = m[:, c] @ S + s_ext[:, c]
    _, h_ref = jcall(FAMILIES["gated"]["naive"], args, True)
    assert_close("folded state", h_ref, S, 2e-5)


def _long_strong_gate(T, check_recurrent):
    args, cot = make_inputs(1, T, 1, 16, 16, gated=True, gate_c=0.02, beta_max=2.0)
    args["g"] = args["g"].at[0, T // 2].set(-1e4)   # a near-total reset mid-sequence
    o, h, grads = forward_and_grads(FAMILIES["gated"]["chunk"], args, cot, gated=True)
    for name, x in [("o", o), ("state", h)] + [(f"d{n}", g) for n, g in grads.items()]:
        assert bool(jnp.all(jnp.isfinite(x))), name
    if check_recurrent:
        o_r, h_r = jcall(FAMILIES["gated"]["recurrent"], args, True)
        assert_close("o", o_r, o, 1e-4)
        assert_close("state", h_r, h, 1e-4)


def test_long_sequence_strong_gates_finite():
    _long_strong_gate(2048, check_recurrent=True)


@pytest.mark.slow
def test_64k_strong_gates_finite():
    _long_strong_gate(65536, check_recurrent=False)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("beta_max", [1.0, 2.0])
@pytest.mark.parametrize("gate_c", [0.1, 1.0, 10.0])
@pytest.mark.parametrize("K,V", [(16, 16), (64, 64), (100, 100), (16, 100)])
@pytest.mark.parametrize("T", [1, 15, 63, 64, 200])
def test_full_product(T, K, V, gate_c, beta_max, dtype):
    check_family("gated", 2, T, 2, K, V, dtype=dtype, gate_c=gate_c, beta_max=beta_max,
                 chunk_size=16 if T < 100 else 64)


@pytest.mark.slow
def test_packed_long():
    packed_case("gated", [1, 15, 0, 100, 300, 64, 128], chunk_size=64, H=2, K=32, V=32, HV=4)
