"""linear_attn: chunk vs recurrent vs naive on outputs, final states and all gradients."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ops import feature_maps
from ops.linear_attn import (chunk_linear_attn, fused_recurrent_linear_attn, naive_linear_attn,
                             recurrent_linear_attn)
from ops.testing import assert_close, assert_forms_match, random_qkv

# float32: chunk and naive differ only by summation order (~1e-7 relative); 1e-5 leaves room for
# long sums.  bfloat16: inputs are the same bf16 values for every form and all accumulate in
# float32, so the difference is the final rounding of o (and of dq/dk/dv) to bf16 (2^-9 relative
# per element) plus float32 order effects: 1e-2.
TOL = {jnp.float32: {"o": 1e-5, "final_state": 1e-5, "grad": 1e-5},
       jnp.bfloat16: {"o": 1e-2, "final_state": 1e-4, "grad": 1e-2}}


def _check(B, T, H, K, V, dtype, normalize=False, chunk_size=64, forms=("chunk",)):
    x = random_qkv(0, B, T, H, K, V, dtype=dtype)
    if normalize:  # needs a positive feature map
        x["q"], x["k"] = feature_maps.elu_plus_one(x["q"]), feature_maps.elu_plus_one(x["k"])
    args = {a: x[a] for a in ("q", "k", "v", "initial_state")}
    kw = dict(normalize=normalize, output_final_state=True)
    fns = {"chunk": lambda **a: chunk_linear_attn(**a, **kw, chunk_size=chunk_size),
           "recurrent": lambda **a: recurrent_linear_attn(**a, **kw)}
    assert_forms_match(lambda **a: naive_linear_attn(**a, **kw), {f: fns[f] for f in forms},
                       args, x["do"], x["dht"], TOL[dtype])


@pytest.mark.parametrize("T,K,V,dtype,chunk_size", [
    (1, 16, 16, jnp.float32, 64),
    (63, 16, 100, jnp.float32, 16),
    (200, 64, 16, jnp.float32, 64),
    (64, 100, 64, jnp.bfloat16, 64),
])
def test_forms_match(T, K, V, dtype, chunk_size):
    # recurrent vs naive in one representative case (both are token scans); chunk in all
    forms = ("chunk", "recurrent") if T == 63 else ("chunk",)
    _check(2, T, 2, K, V, dtype, chunk_size=chunk_size, forms=forms)


def test_normalized_forms_match():
    _check(2, 63, 2, 16, 16, jnp.float32, normalize=True, chunk_size=16)


@pytest.mark.slow
@pytest.mark.parametrize("T,K,V,dtype", list(itertools.product(
    [1, 15, 63, 64, 200], [16, 64, 100], [16, 64, 100], [jnp.float32, jnp.bfloat16])))
def test_forms_match_full(T, K, V, dtype):
    _check(2, T, 2, K, V, dtype, forms=("chunk", "recurrent"))


@pytest.mark.slow
@pytest.mark.parametrize("T", [1, 15, 63, 64, 200])
def test_normalized_forms_match_full(T):
    _check(2, T, 2, 64, 64, jnp.float32, normalize=True, forms=("chunk", "recurrent"))


def _packed_case(normalize, seed=1):
    # lengths 0 (empty), 1, 39 and 60 (crossing chunk boundaries of 16), 17
    cu = np.array([0, 0, 1, 40, 100, 117], np.int32)
    x = random_qkv(seed, 1, int(cu[-1]), 2, 16, 8, num_states=len(cu) - 1)
    if normalize:
        x["q"], x["k"] = feature_maps.elu_plus_one(x["q"]), feature_maps.elu_plus_one(x["k"])
    return cu, x


@pytest.mark.parametrize("normalize", [False, True])
def test_packed_matches_per_sequence_loop(normalize):
    cu, x = _packed_case(normalize)
    N = len(cu) - 1
    z0 = jnp.abs(jnp.asarray(np.random.default_rng(3).standard_normal((N, 2, 16)), jnp.float32)) \
        if normalize else None
    outs, finals = [], []
    for n in range(N):
        a, b = cu[n], cu[n + 1]
        if a == b:
            finals.append(x["initial_state"][n])
            continue
        o, h = naive_linear_attn(x["q"][:, a:b], x["k"][:, a:b], x["v"][:, a:b],
                                 normalize=normalize, initial_state=x["initial_state"][n:n + 1],
                                 output_final_state=True,
                                 initial_normalizer=None if z0 is None else z0[n:n + 1])
        outs.append(o)
        finals.append(h[0])
    ref_o, ref_h = jnp.concatenate(outs, 1), jnp.stack(finals)
    for name, fn, kw in [("chunk", chunk_linear_attn, {"chunk_size": 16}),
                         ("recurrent", recurrent_linear_attn, {})]:
        o, h = jax.jit(lambda q, k, v, h0: fn(q, k, v, None, normalize, h0, True, jnp.asarray(cu),
                                               initial_normalizer=z0, **kw))(
            x["q"], x["k"], x["v"], x["initial_state"])
        assert_close(f"{name} packed o", ref_o, o, 1e-5)
        assert_close(f"{name} packed final_state", ref_h, h, 1e-5)


def test_packed_gradients():
    cu, x = _packed_case(False)
    args = {a: x[a] for a in ("q", "k", "v", "initial_state")}
    kw = dict(output_final_state=True, cu_seqlens=cu)
    assert_forms_match(lambda **a: naive_linear_attn(**a, **kw),
                       {"chunk": lambda **a: chunk_linear_attn(**a, **kw, chunk_size=16)},
                       args, x["do"], x["dht"], TOL[jnp.float32])


@pytest.mark.parametrize("normalize", [False, True])
def test_decode_steps_match_full_forward(normalize):
    x = random_qkv(2, 2, 15, 2, 16, 16)
    q, k, v, h0 = x["q"], x["k"], x["v"], x["initial_state"]
    if normalize:
        q, k = feature_maps.elu_plus_one(q), feature_maps.elu_plus_one(k)
    z0 = jnp.ones((2, 2, 16), jnp.float32) if normalize else None
    o_full, h_full = chunk_linear_attn(q, k, v, None, normalize, h0, True, initial_normalizer=z0)
    step = jax.jit(lambda q, k, v, h, z: fused_recurrent_linear_attn(
        q, k, v, None, normalize, h, True, initial_normalizer=z))
    h, z, outs = h0, z0, []
    for t in range(q.shape[1]):
        o, h = step(q[:, t:t + 1], k[:, t:t + 1], v[:, t:t + 1], h, z)
        if normalize:
            z = z + k[:, t]          # the caller carries the normaliser
        outs.append(o)
    assert_close("decode o", o_full, jnp.concatenate(outs, 1), 1e-5)
    assert_close("decode state", h_full, h, 1e-5)


def test_reverse_recurrent_matches_flipped_forward():
    x = random_qkv(4, 1, 20, 2, 8, 8)
    q, k, v = x["q"], x["k"], x["v"]
    o_rev, h_rev = recurrent_linear_attn(q, k, v, output_final_state=True, reverse=True)
    flip = lambda a: a[:, ::-1]
    o, h = naive_linear_attn(flip(q), flip(k), flip(v), output_final_state=True)
    assert_close("reverse o", flip(o), o_rev, 1e-5)
    assert_close("reverse state", h, h_rev, 1e-5)


def test_defaults_scale_and_no_final_state():
    x = random_qkv(5, 1, 10, 1, 16, 4)
    o, h = chunk_linear_attn(x["q"], x["k"], x["v"])
    assert h is None and o.shape == (1, 10, 1, 4)
    o2, _ = chunk_linear_attn(x["q"], x["k"], x["v"], scale=0.25)
    assert_close("default scale is K^-0.5", o, o2, 1e-6)


def test_bf16_io_dtypes():
    x = random_qkv(6, 1, 20, 1, 16, 16, dtype=jnp.bfloat16)
    for fn in (chunk_linear_attn, recurrent_linear_attn, naive_linear_attn):
        o, h = fn(x["q"], x["k"], x["v"], output_final_state=True)
        assert o.dtype == jnp.bfloat16 and h.dtype == jnp.float32


def _bad_calls():
    x = random_qkv(7, 2, 8, 2, 4, 4)
    q, k, v, h0 = x["q"], x["k"], x["v"], x["initial_state"]
    return [
        ("q", dict(q=q[0])),                                     # rank
        ("k", dict(k=k[..., :3])),                               # shape
        ("v", dict(v=v[:, :5])),                                 # length
        ("q", dict(q=q.astype(jnp.int32))),                      # dtype
        ("initial_state", dict(initial_state=h0[:1])),           # wrong N
        ("initial_state", dict(initial_state=h0.astype(jnp.bfloat16))),
        ("cu_seqlens", dict(cu_seqlens=jnp.array([0, 8], jnp.int32))),      # B != 1
        ("chunk_size", dict(chunk_size=0)),
        ("initial_normalizer", dict(initial_normalizer=jnp.zeros((2, 2, 4)))),  # normalize=False
        ("normalize", dict(normalize="yes")),
    ], dict(q=q, k=k, v=v)


@pytest.mark.parametrize("i", range(10))
def test_bad_arguments_raise(i):
    cases, base = _bad_calls()
    name, bad = cases[i]
    for fn in (chunk_linear_attn, recurrent_linear_attn, naive_linear_attn):
        kw = {**base, **bad}
        if name == "chunk_size" and fn is not chunk_linear_attn:
            continue
        with pytest.raises(ValueError, match=name):
            fn(**kw)


def test_packed_bad_cu_seqlens():
    x = random_qkv(8, 1, 8, 1, 4, 4)
    with pytest.raises(ValueError, match="cu_seqlens"):
        chunk_linear_attn(x["q"], x["k"], x["v"], cu_seqlens=jnp.array([0, 5, 7], jnp.int32))
    with pytest.raises(ValueError, match="initial_state"):
        chunk_linear_attn(x["q"], x["k"], x["v"], initial_state=jnp.zeros((1, 1, 4, 4)),
                          cu_seqlens=jnp.array([0, 5, 8], jnp.int32))


def test_long_sequence_finite():
    """T = 8192 with unnormalised sums growing like T: still finite, matches recurrent."""
    x = random_qkv(9, 1, 8192, 1, 16, 16)
    o, h = jax.jit(lambda q, k, v: chunk_linear_attn(q, k, v, output_final_state=True))(
        x["q"], x["k"], x["v"])
    o2, h2 = jax.jit(lambda q, k, v: recurrent_linear_attn(q, k, v, output_final_state=True))(
        x["q"], x["k"], x["v"])
    assert_close("long o", o2, o, 1e-4)
    assert_close("long state", h2, h, 1e-5)
