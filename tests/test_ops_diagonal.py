"""What is particular to the diagonal-decay families: normalised linear attention with its
``(S, z)`` state, simple GLA's constant decays and named schedules, GLA's value-side decay and
sub-chunks, strong gates.  The shared matrix is in test_ops_families.py."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lolax.ops import feature_maps, gla, lightning_attn, linear_attn, retention, simple_gla
from lolax.ops.testing import assert_close, assert_forms_match, random_inputs, rel_rms_error

F32 = {"o": 1e-5, "final_state": 1e-5, "grad": 1e-5}


# ---------------------------------------------------------------------------------------------
# Normalised linear attention
# ---------------------------------------------------------------------------------------------

def _normalized(T=63, N=2, seed=0):
    x = random_inputs(seed, N, T, 2, 16, 8)
    q, k = feature_maps.elu_plus_one(x["q"]), feature_maps.elu_plus_one(x["k"])       # positive maps
    z0 = jnp.abs(jnp.asarray(np.random.default_rng(seed).standard_normal((N, 1, 2, 16)), jnp.float32))
    return q, k, x["v"], x["initial_state"], z0, x["do"], x["dht"]


def _normalized_loss(fn, do, dht):
    def loss(q, k, v, S0, z0):
        o, (S, z) = fn(q, k, v, initial_state=(S0, z0), output_final_state=True, normalize=True)
        return jnp.sum(o * do) + jnp.sum(S * dht) + jnp.sum(z * jnp.arange(z.size).reshape(z.shape)), (o, S, z)
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4), has_aux=True))


def test_normalized_forms_match_naive_with_the_key_sum_state():
    q, k, v, S0, z0, do, dht = _normalized()
    (_, ref), ref_grads = _normalized_loss(linear_attn.naive_linear_attn, do, dht)(q, k, v, S0, z0)
    for name, fn in [("chunk", lambda *a, **kw: linear_attn.chunk_linear_attn(*a, **kw, chunk_size=16)),
                     ("fused_recurrent", linear_attn.fused_recurrent_linear_attn)]:
        (_, out), grads = _normalized_loss(fn, do, dht)(q, k, v, S0, z0)
        for what, a, b in zip(("o", "S", "z"), ref, out):
            assert_close(f"{name} {what}", a, b, 1e-5)
        for what, a, b in zip(("dq", "dk", "dv", "dS0", "dz0"), ref_grads, grads):
            assert_close(f"{name} {what}", a, b, 1e-5)


def test_normalized_defaults_follow_fla():
    """chunk_linear_attn normalises by default, fused_recurrent_linear_attn does not; the state is
    then the pair (S [N, H, K, V], z [N, 1, H, K]) with z the running key sum."""
    q, k, v, _, _, _, _ = _normalized(T=20, N=1)
    o, (S, z) = linear_attn.chunk_linear_attn(q, k, v, output_final_state=True)
    assert S.shape == (1, 2, 16, 8) and z.shape == (1, 1, 2, 16)
    assert_close("z is the key sum", jnp.sum(k, axis=1, keepdims=True), z, 1e-6)
    o_plain, S_plain = linear_attn.fused_recurrent_linear_attn(q, k, v, output_final_state=True)
    assert_close("state", S, S_plain, 1e-5)
    assert rel_rms_error(o, o_plain) > 0.5


def test_normalized_decoding_carries_the_pair():
    q, k, v, S0, z0, _, _ = _normalized(T=12, N=2)
    o_full, _ = linear_attn.chunk_linear_attn(q, k, v, initial_state=(S0, z0), normalize=True)
    step = jax.jit(lambda q, k, v, s: linear_attn.fused_recurrent_linear_attn(
        q, k, v, initial_state=s, output_final_state=True, normalize=True))
    state, outs = (S0, z0), []
    for t in range(12):
        o, state = step(q[:, t:t + 1], k[:, t:t + 1], v[:, t:t + 1], state)
        outs.append(o)
    assert_close("decoded o", o_full, jnp.concatenate(outs, 1), 1e-5)


def test_normalized_packed():
    cu = np.array([0, 5, 5, 30, 41], np.int32)
    q, k, v, _, _, _, _ = _normalized(T=41, N=1)
    _, _, _, S0, z0, _, _ = _normalized(T=2, N=4)
    ref = jax.jit(lambda *a: linear_attn.naive_linear_attn(*a[:3], initial_state=a[3:], output_final_state=True,
                                                           cu_seqlens=cu))(q, k, v, S0, z0)
    for fn in (lambda *a, **kw: linear_attn.chunk_linear_attn(*a, **kw, chunk_size=16),
               linear_attn.fused_recurrent_linear_attn):
        o, (S, z) = jax.jit(lambda q, k, v, S0, z0: fn(q, k, v, initial_state=(S0, z0), output_final_state=True,
                                                        normalize=True, cu_seqlens=cu))(q, k, v, S0, z0)
        assert_close("o", ref[0], o, 1e-5)
        assert_close("S", ref[1][0], S, 1e-5)
        assert_close("z", ref[1][1], z, 1e-5)


def test_unnormalized_long_sequence_finite():
    """T = 8192 with sums growing like T: finite, and the chunk form equals the recurrence."""
    x = random_inputs(9, 1, 8192, 1, 16, 16)
    run = lambda fn: jax.jit(lambda q, k, v: fn(q, k, v, normalize=False, output_final_state=True))(
        x["q"], x["k"], x["v"])
    (o, h), (o2, h2) = run(linear_attn.chunk_linear_attn), run(linear_attn.fused_recurrent_linear_attn)
    assert_close("o", o2, o, 1e-4)
    assert_close("state", h2, h, 1e-4)


# ---------------------------------------------------------------------------------------------
# Simple GLA: constant decays, no decay, the named schedules
# ---------------------------------------------------------------------------------------------

def test_g_gamma_forms_match_naive():
    x = random_inputs(0, 2, 63, 2, 16, 16)
    args = {"q": x["q"], "k": x["k"], "v": x["v"], "initial_state": x["initial_state"],
            "g_gamma": jnp.log(jnp.array([0.9, 0.3]))}
    kw = dict(output_final_state=True)
    # dg_gamma sums the per-token gradient over B*T tokens: its relative error grows ~sqrt(B*T)
    assert_forms_match(lambda **a: simple_gla.naive_simple_gla(**a, **kw),
                       {"chunk": lambda **a: simple_gla.chunk_simple_gla(**a, **kw, chunk_size=16),
                        "fused_recurrent": lambda **a: simple_gla.fused_recurrent_simple_gla(**a, **kw)},
                       args, x["do"], x["dht"], dict(F32, dg_gamma=1e-4))


def test_no_decay_is_linear_attention_and_both_gates_raise():
    x = random_inputs(1, 1, 30, 2, 8, 8, gate="scalar")
    ref, _ = linear_attn.naive_linear_attn(x["q"], x["k"], x["v"], normalize=False)
    for fn in (simple_gla.chunk_simple_gla, simple_gla.fused_recurrent_simple_gla, simple_gla.naive_simple_gla):
        assert_close("no decay", ref, fn(x["q"], x["k"], x["v"])[0], 1e-5)
        with pytest.raises(ValueError, match="at most one of g"):
            fn(x["q"], x["k"], x["v"], x["g"], jnp.zeros((2,)))


def test_schedules():
    np.testing.assert_allclose(np.exp(np.asarray(simple_gla.retnet_g_gamma(4))), 1 - 2.0 ** (-5 - np.arange(4)),
                               rtol=1e-7)
    np.testing.assert_allclose(simple_gla.alibi_slopes(8), 2.0 ** (-np.arange(1, 9)), rtol=1e-12)
    # 6 heads: the 4-head slopes, then every other slope of the 8-head set
    np.testing.assert_allclose(simple_gla.alibi_slopes(6), [2 ** -2, 2 ** -4, 2 ** -6, 2 ** -8, 2 ** -1, 2 ** -3],
                               rtol=1e-12)
    g = np.asarray(simple_gla.lightning_g_gamma(8, 0, 4, "alibi_slopes"))
    np.testing.assert_allclose(g, -(2.0 ** -np.arange(1, 9)) * (1 + 1e-5), rtol=1e-6)
    g_last = np.asarray(simple_gla.lightning_g_gamma(8, 3, 4, "alibi_slopes"))
    np.testing.assert_allclose(g_last, -(2.0 ** -np.arange(1, 9)) * 1e-5, rtol=1e-5)
    f = np.asarray(simple_gla.lightning_g_gamma(4, 1, 4, "fla_linear"))
    np.testing.assert_allclose(f, -(8 / 4) * (1 - 1 / 4) * np.arange(4), rtol=1e-6)
    with pytest.raises(ValueError, match="decay"):
        simple_gla.lightning_g_gamma(4, 0, 2, "nope")
    with pytest.raises(ValueError, match="layer_idx"):
        simple_gla.lightning_g_gamma(4, 2, 2, "fla_linear")


def test_retention_and_lightning_are_simple_gla_with_their_schedules():
    x = random_inputs(4, 1, 20, 4, 8, 8)
    q, k, v = x["q"], x["k"], x["v"]
    ref, _ = simple_gla.naive_simple_gla(q, k, v, g_gamma=simple_gla.retnet_g_gamma(4))
    assert_close("retention", ref, retention.chunk_retention(q, k, v, chunk_size=8)[0], 1e-5)
    assert_close("retention recurrent", ref, retention.fused_recurrent_retention(q, k, v)[0], 1e-5)
    ref, _ = simple_gla.naive_simple_gla(q, k, v, g_gamma=simple_gla.lightning_g_gamma(4, 1, 3, "fla_linear"))
    assert_close("lightning (FLA's default schedule)", ref,
                 lightning_attn.chunk_lightning_attn(q, k, v, 1, 3, chunk_size=8)[0], 1e-5)
    ref, _ = simple_gla.naive_simple_gla(q, k, v, g_gamma=simple_gla.lightning_g_gamma(4, 1, 3, "alibi_slopes"))
    assert_close("lightning alibi recurrent", ref,
                 lightning_attn.fused_recurrent_lightning_attn(q, k, v, 1, 3, decay="alibi_slopes")[0], 1e-5)


# ---------------------------------------------------------------------------------------------
# GLA: value-side decay in the recurrent form, sub-chunks, strong gates
# ---------------------------------------------------------------------------------------------

def test_fused_recurrent_gla_with_key_and_value_decays():
    x = random_inputs(2, 2, 40, 2, 8, 16, gate="vector", strength=0.5)
    gv = random_inputs(3, 2, 40, 2, 16, 8, gate="vector")["g"]                # [B, T, H, V]
    args = {"q": x["q"], "k": x["k"], "v": x["v"], "g": x["g"], "gv": gv, "initial_state": x["initial_state"]}
    kw = dict(output_final_state=True)
    assert_forms_match(lambda **a: gla.naive_gla(**a, **kw),
                       {"fused_recurrent": lambda g, **a: gla.fused_recurrent_gla(gk=g, **a, **kw)},
                       args, x["do"], x["dht"], F32)


@pytest.mark.parametrize("chunk_size,sub", [(32, 8), (64, 32)])
def test_gla_sub_chunk_sizes(chunk_size, sub):
    x = random_inputs(4, 1, 70, 2, 16, 8, gate="vector", strength=0.3)
    args = {a: x[a] for a in ("q", "k", "v", "g", "initial_state")}
    kw = dict(output_final_state=True)
    assert_forms_match(lambda **a: gla.naive_gla(**a, **kw),
                       {"chunk": lambda **a: gla.chunk_gla(**a, **kw, chunk_size=chunk_size, sub_chunk_size=sub)},
                       args, x["do"], x["dht"], F32)
    with pytest.raises(ValueError, match="sub_chunk_size"):
        gla.chunk_gla(x["q"], x["k"], x["v"], x["g"], chunk_size=64, sub_chunk_size=24)


def test_gla_extreme_gates_do_not_overflow():
    """-80 per step on half the channels (exp(80 * 16) overflows any factorised form), 0 on the
    others: outputs and every gradient finite and equal to the recurrence."""
    x = random_inputs(3, 1, 130, 1, 16, 8, gate="vector")
    g = jnp.where(jnp.arange(16) % 2 == 0, -80.0, 0.0) * jnp.ones_like(x["g"])
    args = {"q": x["q"], "k": x["k"], "v": x["v"], "g": g, "initial_state": x["initial_state"][:1]}
    kw = dict(output_final_state=True)
    assert_forms_match(lambda **a: gla.naive_gla(**a, **kw), {"chunk": lambda **a: gla.chunk_gla(**a, **kw)},
                       args, x["do"], x["dht"], F32)


@pytest.mark.parametrize("family", ["simple_gla", "gla"])
def test_strong_decay_long_sequence(family):
    """T = 4K, gates logsigmoid(u)/0.1 (down to ~-50 per step): finite and equal to the recurrence."""
    x = random_inputs(5, 1, 4096, 1, 16, 16, gate="scalar" if family == "simple_gla" else "vector", strength=0.1)
    mod = simple_gla if family == "simple_gla" else gla
    chunk, rec = getattr(mod, f"chunk_{family}"), getattr(mod, f"fused_recurrent_{family}")
    args = (x["q"], x["k"], x["v"], x["g"])
    o, h = jax.jit(lambda *a: chunk(*a, output_final_state=True))(*args)
    o2, h2 = jax.jit(lambda *a: rec(*a, output_final_state=True))(*args)
    assert_close("o", o2, o, 1e-5)
    assert_close("state", h2, h, 1e-5)
    grads = jax.jit(jax.grad(lambda *a: jnp.sum(chunk(*a)[0]), argnums=(0, 1, 2, 3)))(*args)
    assert all(np.all(np.isfinite(np.asarray(d))) for d in grads)
