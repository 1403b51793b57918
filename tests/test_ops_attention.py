"""Softmax baselines: blockwise vs naive (T×T float32) on outputs and gradients, GQA, window edges,
packed sequences, decoding over a KV cache, memory, argument checks.

Tolerances (relative RMS error): float32 1e-5 (same maths, online-softmax reassociation only);
bfloat16 inputs 1e-2 (both paths compute in float32 from the same bf16 values; the gap is the
rounding of o and of the gradients to bf16, 2^-9 relative).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lolax.ops import attention
from lolax.ops.testing import assert_close

B, T, H, HK, D, DV, BLOCK = 2, 50, 4, 2, 8, 6, 16


def inputs(b=B, t=T, h=H, hk=HK, d=D, dv=DV, dtype=jnp.float32, seed=0):
    rng = np.random.default_rng(seed)
    f = lambda *s: jnp.asarray(rng.standard_normal(s).astype(np.float32), dtype)
    return f(b, t, h, d), f(b, t, hk, d), f(b, t, hk, dv), f(b, t, h, dv).astype(jnp.float32)


@functools.lru_cache(maxsize=None)
def _vjp_fn(fn, kw):
    kw = dict(kw)
    if "cu" in kw:
        kw["cu_seqlens"] = np.asarray(kw.pop("cu"), np.int32)

    def f(q, k, v, do):
        o, vjp = jax.vjp(lambda q, k, v: fn(q, k, v, **kw), q, k, v)
        return (o,) + vjp(do.astype(o.dtype))

    return jax.jit(f)


def out_and_grads(fn, q, k, v, do, **kw):
    return _vjp_fn(fn, tuple(sorted(kw.items())))(q, k, v, do)


def compare(fast, naive, q, k, v, do, tol=1e-5, **kw):
    ref = out_and_grads(naive, *(x.astype(jnp.float32) for x in (q, k, v)), do, **kw)
    out = out_and_grads(fast, q, k, v, do, block_size=BLOCK, **kw)
    assert out[0].dtype == v.dtype
    for name, r, o in zip(("o", "dq", "dk", "dv"), ref, out):
        assert o.shape == r.shape, name
        # With one key per query (window 1, or T = 1) the scores do not matter: the gradients of
        # q and k are exactly 0 in the oracle and float32 round-off (~5e-8) in the blockwise form.
        assert_close(name, r, o, tol, 1e-7 if name in ("dq", "dk") else 0.0)


@pytest.mark.parametrize("causal", [True, False])
def test_softmax_gqa_vs_naive(causal):
    compare(attention.softmax_attention, attention.naive_softmax_attention, *inputs(), causal=causal)


def test_softmax_single_block_and_mha():
    q, k, v, do = inputs(b=1, t=7, h=2, hk=2)
    compare(attention.softmax_attention, attention.naive_softmax_attention, q, k, v, do)


@pytest.mark.parametrize("window", [1, 17, T, T + 30])
def test_sliding_window_edges(window):
    """window = 1 (itself only), a window across a block edge, window = T and > T (full causal)."""
    compare(attention.sliding_window_attention, attention.naive_sliding_window_attention, *inputs(),
            window=window)


def test_window_convention():
    q, k, v, _ = inputs(b=1, t=6, h=1, hk=1)
    o1 = attention.naive_sliding_window_attention(q, k, v, 1)
    np.testing.assert_allclose(np.asarray(o1), np.asarray(v), rtol=1e-6, atol=1e-6)   # only itself
    full = attention.naive_softmax_attention(q, k, v)
    np.testing.assert_allclose(np.asarray(attention.naive_sliding_window_attention(q, k, v, 6)),
                               np.asarray(full), rtol=1e-6, atol=1e-6)
    o2 = attention.naive_sliding_window_attention(q, k, v, 2)   # keys {i-1, i}
    s = jnp.einsum("d,d->", q[0, 3, 0], k[0, 2, 0]), jnp.einsum("d,d->", q[0, 3, 0], k[0, 3, 0])
    p = jax.nn.softmax(jnp.stack(s) * D ** -0.5)
    np.testing.assert_allclose(np.asarray(o2[0, 3, 0]), np.asarray(p[0] * v[0, 2, 0] + p[1] * v[0, 3, 0]),
                               rtol=1e-5, atol=1e-6)


def test_packed_matches_per_sequence():
    lens = [1, 15, 20, 14]
    cu = np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)
    q, k, v, do = inputs(b=1)
    compare(attention.softmax_attention, attention.naive_softmax_attention, q, k, v, do, cu=tuple(cu))
    compare(attention.sliding_window_attention, attention.naive_sliding_window_attention, q, k, v, do,
            window=17, cu=tuple(cu))

    @jax.jit
    def packed_and_loop(q, k, v):
        o = attention.softmax_attention(q, k, v, cu_seqlens=jnp.asarray(cu), block_size=BLOCK)
        ow = attention.sliding_window_attention(q, k, v, 4, cu_seqlens=jnp.asarray(cu), block_size=BLOCK)
        sl = lambda x, n: x[:, cu[n]:cu[n + 1]]
        ref = [attention.naive_softmax_attention(sl(q, n), sl(k, n), sl(v, n)) for n in range(len(lens))]
        refw = [attention.naive_sliding_window_attention(sl(q, n), sl(k, n), sl(v, n), 4)
                for n in range(len(lens))]
        return o, ow, jnp.concatenate(ref, 1), jnp.concatenate(refw, 1)

    o, ow, ref, refw = packed_and_loop(q, k, v)
    assert_close("per-sequence o", ref, o, 1e-5)
    assert_close("per-sequence window o", refw, ow, 1e-5)


def test_bfloat16():
    compare(attention.softmax_attention, attention.naive_softmax_attention,
            *inputs(dtype=jnp.bfloat16)[:3], inputs()[3], tol=1e-2)


def test_decode_step_with_kv_cache_and_ring_buffer():
    q, k, v, _ = inputs(b=1, t=12)
    full = attention.naive_softmax_attention(q, k, v)
    step = jax.jit(attention.attention_step)
    # growing cache of length T with a validity mask
    kc, vc = jnp.zeros_like(k), jnp.zeros_like(v)
    for t in range(12):
        kc, vc = kc.at[:, t].set(k[:, t]), vc.at[:, t].set(v[:, t])
        valid = (jnp.arange(12) <= t)[None]
        assert_close(f"step {t}", full[:, t], step(q[:, t], kc, vc, valid), 1e-5)
    # ring buffer of the last w tokens reproduces sliding-window attention
    w = 4
    ref = attention.naive_sliding_window_attention(q, k, v, w)
    kr, vr = jnp.zeros((1, w, HK, D)), jnp.zeros((1, w, HK, DV))
    for t in range(12):
        kr, vr = kr.at[:, t % w].set(k[:, t]), vr.at[:, t % w].set(v[:, t])
        valid = (jnp.arange(w) <= t)[None]
        assert_close(f"ring {t}", ref[:, t], step(q[:, t], kr, vr, valid), 1e-5)


@pytest.mark.slow
def test_memory_is_not_quadratic():
    def temp(t, fn, **kw):
        q, k, v, _ = inputs(b=1, t=t, h=2, hk=2, d=16, dv=16)
        f = jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v, **kw)), argnums=(0, 1, 2))
        return jax.jit(f).lower(q, k, v).compile().memory_analysis().temp_size_in_bytes
    m1, m4 = temp(1024, attention.softmax_attention), temp(4096, attention.softmax_attention)
    assert m4 < 6 * m1, (m1, m4)          # O(T·block), not O(T²)
    naive4 = temp(4096, attention.naive_softmax_attention)
    assert m4 < naive4 / 4, (m4, naive4)


def test_validation():
    q, k, v, _ = inputs()
    cases = [
        ("q", lambda: attention.softmax_attention(q[0], k, v)),
        ("k", lambda: attention.softmax_attention(q, k[..., :3], v)),
        ("k", lambda: attention.softmax_attention(q, jnp.concatenate([k, k[:, :, :1]], 2), v)),   # 3 ∤ 4
        ("v", lambda: attention.softmax_attention(q, k, v[:, :10])),
        ("v", lambda: attention.softmax_attention(q, k, v.astype(jnp.int32))),
        ("cu_seqlens", lambda: attention.softmax_attention(q, k, v, cu_seqlens=jnp.array([0, T]))),
        ("window", lambda: attention.sliding_window_attention(q, k, v, 0)),
        ("window", lambda: attention.sliding_window_attention(q, k, v, 2.5)),
        ("block_size", lambda: attention.softmax_attention(q, k, v, block_size=0)),
        ("valid_mask", lambda: attention.attention_step(q[:, 0], k, v, jnp.ones((B, 3), bool))),
        ("q_t", lambda: attention.attention_step(q, k, v, jnp.ones((B, T), bool))),
    ]
    for name, f in cases:
        with pytest.raises(ValueError, match=name):
            f()


@pytest.mark.slow
@pytest.mark.parametrize("window", [1, 2, 15, 16, 17, 33, 49, 50, 51])
@pytest.mark.parametrize("t", [1, 15, 16, 50])
def test_window_sweep(t, window):
    compare(attention.sliding_window_attention, attention.naive_sliding_window_attention, *inputs(t=t),
            window=window)
