"""gla: chunk (sub-chunked) vs recurrent vs naive, packing, decoding, overflow safety."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ops.gla import chunk_gla, fused_recurrent_gla, naive_gla, recurrent_gla
from ops.testing import assert_close, assert_forms_match, random_qkv

# float32: summation order only.  bfloat16: rounding of o and the input gradients to bf16
# (2^-9 relative per element) on top of float32 accumulation: 1e-2 (FLA uses 4e-3..5e-3 on GPU
# for its own kernels against a float32-upcast reference).
TOL = {jnp.float32: {"o": 1e-5, "final_state": 1e-5, "grad": 1e-5},
       jnp.bfloat16: {"o": 1e-2, "final_state": 1e-4, "grad": 1e-2}}


def _check(B, T, H, K, V, dtype, strength, chunk_size=64, sub=16, forms=("chunk",)):
    x = random_qkv(0, B, T, H, K, V, gate="vector", strength=strength, dtype=dtype)
    args = {a: x[a] for a in ("q", "k", "v", "g", "initial_state")}
    kw = dict(output_final_state=True)
    fns = {"chunk": lambda **a: chunk_gla(**a, **kw, chunk_size=chunk_size, sub_chunk_size=sub),
           "recurrent": lambda **a: recurrent_gla(**a, **kw)}
    assert_forms_match(lambda **a: naive_gla(**a, **kw), {f: fns[f] for f in forms},
                       args, x["do"], x["dht"], TOL[dtype])


@pytest.mark.parametrize("T,K,V,dtype,strength,chunk_size,sub", [
    (1, 16, 16, jnp.float32, 1.0, 64, 16),
    (63, 16, 100, jnp.float32, 0.1, 32, 8),
    (200, 64, 16, jnp.float32, 10.0, 64, 16),
    (200, 16, 16, jnp.float32, 0.1, 64, 16),
    (64, 100, 64, jnp.bfloat16, 1.0, 64, 16),
])
def test_forms_match(T, K, V, dtype, strength, chunk_size, sub):
    forms = ("chunk", "recurrent") if T == 63 else ("chunk",)
    _check(2, T, 2, K, V, dtype, strength, chunk_size, sub, forms=forms)


@pytest.mark.slow
@pytest.mark.parametrize("T,K,V,dtype", list(itertools.product(
    [1, 15, 63, 64, 200], [16, 64, 100], [16, 64, 100], [jnp.float32, jnp.bfloat16])))
def test_forms_match_full(T, K, V, dtype):
    _check(2, T, 2, K, V, dtype, 1.0, forms=("chunk", "recurrent"))


@pytest.mark.slow
@pytest.mark.parametrize("T,strength,dtype", list(itertools.product(
    [1, 15, 63, 64, 200], [0.1, 1.0, 10.0], [jnp.float32, jnp.bfloat16])))
def test_gate_strength_sweep_full(T, strength, dtype):
    _check(2, T, 2, 64, 64, dtype, strength, forms=("chunk", "recurrent"))


def _packed_case():
    cu = np.array([0, 0, 1, 40, 100, 117], np.int32)   # empty, length 1, crossing chunks of 32
    x = random_qkv(1, 1, int(cu[-1]), 2, 16, 8, gate="vector", strength=0.5, num_states=5)
    return cu, x


def test_packed_matches_per_sequence_loop():
    cu, x = _packed_case()
    outs, finals = [], []
    for n in range(len(cu) - 1):
        a, b = cu[n], cu[n + 1]
        if a == b:
            finals.append(x["initial_state"][n])
            continue
        o, h = naive_gla(x["q"][:, a:b], x["k"][:, a:b], x["v"][:, a:b], x["g"][:, a:b],
                         initial_state=x["initial_state"][n:n + 1], output_final_state=True)
        outs.append(o)
        finals.append(h[0])
    ref_o, ref_h = jnp.concatenate(outs, 1), jnp.stack(finals)
    for name, fn, kw in [("chunk", chunk_gla, {"chunk_size": 32, "sub_chunk_size": 8}),
                         ("recurrent", recurrent_gla, {})]:
        o, h = jax.jit(lambda q, k, v, g, h0: fn(q, k, v, g, None, h0, True, jnp.asarray(cu), **kw))(
            x["q"], x["k"], x["v"], x["g"], x["initial_state"])
        assert_close(f"{name} packed o", ref_o, o, 1e-5)
        assert_close(f"{name} packed final_state", ref_h, h, 1e-5)


def test_packed_gradients():
    cu, x = _packed_case()
    args = {a: x[a] for a in ("q", "k", "v", "g", "initial_state")}
    kw = dict(output_final_state=True, cu_seqlens=cu)
    assert_forms_match(lambda **a: naive_gla(**a, **kw),
                       {"chunk": lambda **a: chunk_gla(**a, **kw, chunk_size=32, sub_chunk_size=8)},
                       args, x["do"], x["dht"], TOL[jnp.float32])


def test_decode_steps_match_full_forward():
    x = random_qkv(2, 2, 15, 2, 16, 16, gate="vector")
    q, k, v, g, h0 = x["q"], x["k"], x["v"], x["g"], x["initial_state"]
    o_full, h_full = chunk_gla(q, k, v, g, initial_state=h0, output_final_state=True)
    step = jax.jit(lambda q, k, v, g, h: fused_recurrent_gla(q, k, v, g, initial_state=h,
                                                             output_final_state=True))
    h, outs = h0, []
    for t in range(q.shape[1]):
        o, h = step(q[:, t:t + 1], k[:, t:t + 1], v[:, t:t + 1], g[:, t:t + 1], h)
        outs.append(o)
    assert_close("decode o", o_full, jnp.concatenate(outs, 1), 1e-5)
    assert_close("decode state", h_full, h, 1e-5)


def test_extreme_gates_no_overflow():
    """Gates of -80 per step (exp(+80 * 16) would overflow any factorisation) on half the
    channels, 0 on the others: outputs and gradients finite and equal to the recurrence."""
    x = random_qkv(3, 1, 130, 1, 16, 8, gate="vector")
    g = jnp.where(jnp.arange(16) % 2 == 0, -80.0, 0.0) * jnp.ones_like(x["g"])
    args = {"q": x["q"], "k": x["k"], "v": x["v"], "g": g, "initial_state": x["initial_state"][:1]}
    kw = dict(output_final_state=True)
    errs = assert_forms_match(lambda **a: naive_gla(**a, **kw),
                              {"chunk": lambda **a: chunk_gla(**a, **kw)},
                              args, x["do"], x["dht"], TOL[jnp.float32])
    assert all(np.isfinite(e) for e in errs["chunk"].values())


def _bad_calls():
    x = random_qkv(7, 2, 8, 2, 4, 4, gate="vector")
    base = dict(q=x["q"], k=x["k"], v=x["v"], g=x["g"])
    return [
        ("g", dict(g=x["g"][..., 0])),                 # scalar gate given to gla
        ("g", dict(g=None)),
        ("g", dict(g=x["g"].astype(jnp.int32))),
        ("v", dict(v=x["v"][:, :, :1])),
        ("initial_state", dict(initial_state=jnp.zeros((3, 2, 4, 4)))),
    ], base


@pytest.mark.parametrize("i", range(5))
def test_bad_arguments_raise(i):
    cases, base = _bad_calls()
    name, bad = cases[i]
    for fn in (chunk_gla, recurrent_gla, naive_gla):
        with pytest.raises(ValueError, match=name):
            fn(**{**base, **bad})


def test_bad_sub_chunk_size():
    x = random_qkv(8, 1, 8, 1, 4, 4, gate="vector")
    with pytest.raises(ValueError, match="sub_chunk_size"):
        chunk_gla(x["q"], x["k"], x["v"], x["g"], chunk_size=64, sub_chunk_size=24)
