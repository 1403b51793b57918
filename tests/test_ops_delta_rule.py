"""DeltaNet ops: chunk vs recurrent vs naive (outputs, final states, all gradients), packing,
decoding, options and argument checks.

The harness here (``make_inputs``, ``forward_and_grads``, ``check_family``) is shared with
``test_ops_gated_delta_rule.py``.  Tolerances (relative RMS error, ``ops.testing``):
float32 chunk/recurrent vs naive 2e-5 on outputs/states and 1e-4 on gradients (all float32 maths,
differences are reassociation only); bfloat16 inputs 1e-2: every path computes in float32 from the
same bf16 values, so the gap is the final rounding of o and of the gradients to bf16
(2^-9 relative per element) plus the float32 reassociation amplified by bf16-rounded q/k/v.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ops import delta_rule, gated_delta_rule
from ops.testing import assert_close

TOL = {"float32": dict(o=2e-5, state=2e-5, grad=1e-4), "bfloat16": dict(o=1e-2, state=1e-2, grad=1e-2)}

FAMILIES = {
    "delta": dict(chunk=delta_rule.chunk_delta_rule, recurrent=delta_rule.recurrent_delta_rule,
                  naive=delta_rule.naive_delta_rule, gated=False),
    "gated": dict(chunk=gated_delta_rule.chunk_gated_delta_rule,
                  recurrent=gated_delta_rule.recurrent_gated_delta_rule,
                  naive=gated_delta_rule.naive_gated_delta_rule, gated=True),
}


def make_inputs(B, T, H, K, V, *, gated, dtype=jnp.float32, gate_c=1.0, beta_max=1.0, HV=None, N=None,
                normalize_k=True, seed=42):
    """Random inputs (numpy, fixed seed): q normal, k unit-norm, v normal, g = logsigmoid(u)/c,
    beta in [0, beta_max], h0 normal; plus the cotangents do, dh_T."""
    HV = HV or H
    N = N or B
    rng = np.random.default_rng(seed)
    normal = lambda *shape: rng.standard_normal(shape).astype(np.float32)
    q, k, v = normal(B, T, H, K), normal(B, T, H, K), normal(B, T, HV, V)
    if normalize_k:
        k = k / np.linalg.norm(k, axis=-1, keepdims=True)
    beta = (beta_max * rng.uniform(size=(B, T, HV))).astype(np.float32)
    u = normal(B, T, HV)
    g = (-np.logaddexp(0.0, -u) / gate_c).astype(np.float32)          # logsigmoid(u) / c
    h0, do, dht = normal(N, HV, K, V), normal(B, T, HV, V), normal(N, HV, K, V)
    cast = lambda x: jnp.asarray(x, dtype)
    args = dict(q=cast(q), k=cast(k), v=cast(v), beta=cast(beta), h0=jnp.asarray(h0))
    if gated:
        args["g"] = cast(g)
    return args, (jnp.asarray(do), jnp.asarray(dht))


def call(fn, args, gated, **kw):
    pos = (args["q"], args["k"], args["v"]) + ((args["g"],) if gated else ()) + (args["beta"],)
    return fn(*pos, initial_state=args["h0"], output_final_state=True, **kw)


_NAIVE = (delta_rule.naive_delta_rule, gated_delta_rule.naive_gated_delta_rule)


@functools.lru_cache(maxsize=None)
def _jitted(fn, gated, kw, cu, grads):
    """Jitted forward (or forward + gradients); ``cu`` (a tuple or None) is closed over as a
    concrete constant, so naive ops can loop over packed sequences."""
    cu_seqlens = None if cu is None else np.asarray(cu, np.int32)

    def fwd(a):
        return call(fn, a, gated, cu_seqlens=cu_seqlens, **dict(kw))

    def fwd_grad(a, cot):
        do, dht = cot

        def loss(a):
            o, ht = fwd(a)
            return jnp.sum(o.astype(jnp.float32) * do) + jnp.sum(ht * dht), (o, ht)

        (_, (o, ht)), g = jax.value_and_grad(loss, has_aux=True)(a)
        return o, ht, g

    return jax.jit(fwd_grad if grads else fwd)


def _key(kw, cu_seqlens):
    return tuple(sorted(kw.items())), None if cu_seqlens is None else tuple(np.asarray(cu_seqlens).tolist())


def jcall(fn, args, gated, cu_seqlens=None, **kw):
    """Jitted ``call``: returns ``(o, final_state)``."""
    kw, cu = _key(kw, cu_seqlens)
    return _jitted(fn, gated, kw, cu, False)(args)


def forward_and_grads(fn, args, cot, *, gated, cu_seqlens=None, **kw):
    """``(o, final_state, grads)`` with loss Σ(o⊙do) + Σ(h_T⊙dh_T); grads is a dict over inputs."""
    kw, cu = _key(kw, cu_seqlens)
    return _jitted(fn, gated, kw, cu, True)(args, cot)


def check_family(family, B, T, H, K, V, *, dtype=jnp.float32, chunk_size=64, gate_c=1.0, beta_max=1.0,
                 HV=None, forms=("chunk", "recurrent"), normalize_k=True, **kw):
    fam = FAMILIES[family]
    args, cot = make_inputs(B, T, H, K, V, gated=fam["gated"], dtype=dtype, gate_c=gate_c,
                            beta_max=beta_max, HV=HV, normalize_k=normalize_k)
    tol = TOL[jnp.dtype(dtype).name]
    ref_args = {n: a.astype(jnp.float32) if n != "h0" else a for n, a in args.items()}
    o_ref, h_ref, g_ref = forward_and_grads(fam["naive"], ref_args, cot, gated=fam["gated"], **kw)
    for form in forms:
        extra = dict(kw, chunk_size=chunk_size) if form == "chunk" else kw
        o, h, grads = forward_and_grads(fam[form], args, cot, gated=fam["gated"], **extra)
        assert o.dtype == args["v"].dtype and o.shape == o_ref.shape
        assert h.dtype == jnp.float32
        assert_close(f"{form} o", o_ref, o, tol["o"])
        assert_close(f"{form} final_state", h_ref, h, tol["state"])
        for name in g_ref:
            assert grads[name].dtype == args[name].dtype
            assert_close(f"{form} d{name}", g_ref[name], grads[name], tol["grad"])


# ----------------------------------------------------------------------------------------------
# Default suite (representative); the full product is under `slow`
# ----------------------------------------------------------------------------------------------

# T in {1, 15, 63, 64, 200} and K, V in {16, 64, 100}, paired rather than crossed (see slow).
# (T = 64, K = 64, V = 100 is covered by test_qk_l2norm_gradients.)
SHAPES = [(1, 16, 16, 64), (15, 100, 16, 64), (63, 16, 16, 16), (200, 16, 16, 64)]


@pytest.mark.parametrize("T,K,V,chunk_size", SHAPES)
def test_lengths_and_head_dims(T, K, V, chunk_size):
    check_family("delta", 2, T, 2, K, V, chunk_size=chunk_size)


def test_beta_up_to_two():
    """beta in [0, 2] passed directly (negative eigenvalues, no flag needed)."""
    check_family("delta", 2, 63, 2, 16, 16, chunk_size=16, beta_max=2.0)


def test_bfloat16():
    check_family("delta", 2, 63, 2, 16, 16, dtype=jnp.bfloat16, chunk_size=16)


def test_qk_l2norm_option_and_alias():
    fam = FAMILIES["delta"]
    args, _ = make_inputs(1, 37, 2, 16, 16, gated=False, normalize_k=False)
    qn = args["q"] * jax.lax.rsqrt(jnp.sum(args["q"] ** 2, -1, keepdims=True) + 1e-6)
    kn = args["k"] * jax.lax.rsqrt(jnp.sum(args["k"] ** 2, -1, keepdims=True) + 1e-6)
    o_ref, h_ref = jcall(fam["naive"], dict(args, q=qn, k=kn), False)
    for form in ("naive", "recurrent", "chunk"):
        for kw in (dict(use_qk_l2norm_in_kernel=True), dict(use_qk_l2norm=True)):
            o, h = jcall(fam[form], args, False, **kw)
            assert_close(f"{form} {kw} o", o_ref, o, 2e-5)
            assert_close(f"{form} {kw} state", h_ref, h, 2e-5)
    with pytest.raises(ValueError, match="use_qk_l2norm"):
        call(fam["chunk"], args, False, use_qk_l2norm_in_kernel=True, use_qk_l2norm=False)


def test_qk_l2norm_gradients():
    """Unnormalised q, k normalised inside (gradients flow through the normalisation)."""
    check_family("delta", 2, 64, 2, 64, 100, chunk_size=16, use_qk_l2norm_in_kernel=True, normalize_k=False)


@pytest.mark.parametrize("family", ["delta", "gated"])
def test_allow_neg_eigval_doubles_beta(family):
    fam = FAMILIES[family]
    args, _ = make_inputs(1, 40, 2, 16, 16, gated=fam["gated"])
    o_ref, h_ref = jcall(fam["naive"], dict(args, beta=2.0 * args["beta"]), fam["gated"])
    for form in ("naive", "recurrent", "chunk"):
        o, h = jcall(fam[form], args, fam["gated"], allow_neg_eigval=True)
        assert_close(f"{form} o", o_ref, o, 2e-5)
        assert_close(f"{form} state", h_ref, h, 2e-5)
    with pytest.raises(ValueError, match="allow_neg_eigval"):
        call(fam["chunk"], args, fam["gated"], allow_neg_eigval=np.array([0, 1]))


@functools.lru_cache(maxsize=None)
def _per_sequence_loop(fn, gated, lens):
    """Jitted reference with gradients: each packed sequence run alone (unpacked, no cu_seqlens)
    from its own initial state; returns ``(o, final_state, grads)`` like ``forward_and_grads``."""
    cu = np.concatenate([[0], np.cumsum(lens)]).astype(int)

    def loop(args):
        outs, finals = [], []
        for n in range(len(lens)):
            a, b = cu[n], cu[n + 1]
            if a == b:
                finals.append(args["h0"][n])
                continue
            part = {m: (x[:, a:b] if m != "h0" else x[n:n + 1]) for m, x in args.items()}
            o_n, h_n = call(fn, part, gated)
            outs.append(o_n)
            finals.append(h_n[0])
        return jnp.concatenate(outs, 1), jnp.stack(finals)

    def fwd_grad(args, cot):
        def loss(a):
            o, h = loop(a)
            return jnp.sum(o * cot[0]) + jnp.sum(h * cot[1]), (o, h)

        (_, (o, h)), g = jax.value_and_grad(loss, has_aux=True)(args)
        return o, h, g

    return jax.jit(fwd_grad)


def packed_case(family, lens, *, chunk_size, H=2, K=16, V=16, HV=None):
    """Packed chunk and recurrent runs (outputs, final states, all gradients) vs a per-sequence
    loop of unpacked naive runs, each from its own initial state."""
    fam = FAMILIES[family]
    gated = fam["gated"]
    T, N = sum(lens), len(lens)
    args, cot = make_inputs(1, T, H, K, V, gated=gated, N=N, HV=HV)
    cu = np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)
    o_loop, h_loop, g_loop = _per_sequence_loop(fam["naive"], gated, tuple(lens))(args, cot)
    for form in ("recurrent", "chunk"):
        kw = dict(chunk_size=chunk_size) if form == "chunk" else {}
        o, h, dx = forward_and_grads(fam[form], args, cot, gated=gated, cu_seqlens=cu, **kw)
        assert_close(f"packed {form} o", o_loop, o, 2e-5)
        assert_close(f"packed {form} state", h_loop, h, 2e-5)
        for name in g_loop:
            assert_close(f"packed {form} d{name}", g_loop[name], dx[name], 1e-4)


def test_packed():
    # a length-1 sequence, sequences crossing chunk boundaries, an exact multiple, a tail
    packed_case("delta", [1, 15, 37, 16, 2], chunk_size=16)


def test_packed_under_jit_with_traced_offsets():
    """chunk and recurrent with traced cu_seqlens vs the naive op's packed loop (concrete offsets)."""
    fam = FAMILIES["delta"]
    args, _ = make_inputs(1, 30, 1, 16, 16, gated=False, N=3)
    cu = jnp.array([0, 7, 20, 30], jnp.int32)
    ref = jcall(fam["naive"], args, False, cu_seqlens=np.asarray(cu))
    for form in ("recurrent", "chunk"):
        kw = dict(chunk_size=8) if form == "chunk" else {}
        out = jax.jit(lambda a, c: call(fam[form], a, False, cu_seqlens=c, **kw))(args, cu)
        assert_close(f"{form} o", ref[0], out[0], 2e-5)
        assert_close(f"{form} state", ref[1], out[1], 2e-5)


def decode_case(family, T=20, HV=None, H=2):
    """One-token recurrent steps carrying the state reproduce the chunk full forward."""
    fam = FAMILIES[family]
    gated = fam["gated"]
    args, _ = make_inputs(2, T, H, 16, 16, gated=gated, HV=HV)
    o_full, h_full = jcall(fam["chunk"], args, gated, chunk_size=8)
    step = jax.jit(lambda a: call(fam["recurrent"], a, gated))
    state, outs = args["h0"], []
    for t in range(T):
        tok = {n: (x[:, t:t + 1] if n != "h0" else state) for n, x in args.items()}
        o_t, state = step(tok)
        outs.append(o_t)
    assert_close("decode o", o_full, jnp.concatenate(outs, 1), 2e-5)
    assert_close("decode state", h_full, state, 2e-5)


def test_decode():
    decode_case("delta")


def test_transitions_compose_to_final_state():
    args, _ = make_inputs(2, 50, 2, 16, 8, gated=False)
    m, s_ext = jax.jit(functools.partial(delta_rule.chunk_transitions, chunk_size=16))(
        args["k"], args["v"], args["beta"])
    assert m.shape == (2, 4, 2, 16, 16) and s_ext.shape == (2, 4, 2, 16, 8)
    S = args["h0"]
    for c in range(m.shape[1]):
        S = m[:, c] @ S + s_ext[:, c]
    _, h_ref = jcall(delta_rule.naive_delta_rule, args, False)
    assert_close("folded state", h_ref, S, 2e-5)


def test_unit_tril_inverse_and_grad():
    a = jax.random.normal(jax.random.PRNGKey(0), (3, 20, 20)) * 0.3
    y = delta_rule.unit_tril_inverse(a)
    L = jnp.eye(20) + jnp.tril(a, -1)
    np.testing.assert_allclose(np.asarray(y @ L), np.eye(20)[None].repeat(3, 0), atol=1e-5)
    ct = jax.random.normal(jax.random.PRNGKey(1), (3, 20, 20))
    f_ref = lambda a: jnp.sum(jnp.linalg.inv(jnp.eye(20) + jnp.tril(a, -1)) * ct)
    f = lambda a: jnp.sum(delta_rule.unit_tril_inverse(a) * ct)
    assert_close("d(a)", jax.grad(f_ref)(a), jax.grad(f)(a), 1e-5)


def validation_cases(family):
    fam = FAMILIES[family]
    gated = fam["gated"]
    args, _ = make_inputs(2, 8, 2, 4, 4, gated=gated)
    f = lambda **over: call(fam["chunk"], dict(args, **over), gated,
                            **{k[3:]: over.pop(k) for k in list(over) if k.startswith("kw_")})
    cases = [
        ("q", dict(q=args["q"][0])),                                   # rank
        ("k", dict(k=args["k"][:, :, :, :3])),                         # shape
        ("v", dict(v=args["v"][:, :7])),                               # length
        ("v", dict(v=args["v"].astype(jnp.int32))),                    # dtype
        ("beta", dict(beta=args["beta"][..., None])),                  # rank
        ("beta", dict(beta=args["beta"][:, :, :1])),                   # heads
        ("initial_state", dict(h0=args["h0"].astype(jnp.bfloat16))),   # dtype
        ("initial_state", dict(h0=args["h0"][:1])),                    # N
        ("cu_seqlens", dict(kw_cu_seqlens=jnp.array([0, 8], jnp.int32))),  # B != 1
        ("chunk_size", dict(kw_chunk_size=0)),
    ]
    if gated:
        cases += [("g", dict(g=args["g"][:, :4])), ("g", dict(g=None))]
    for name, over in cases:
        with pytest.raises(ValueError, match=name):
            f(**over)


def test_validation():
    validation_cases("delta")
    fam = FAMILIES["delta"]
    args, _ = make_inputs(1, 8, 2, 4, 4, gated=False, HV=4)   # more value heads: GDN only
    with pytest.raises(ValueError, match="v"):
        call(fam["chunk"], args, False)


@pytest.mark.slow
def test_memory_linear_in_length():
    """Compiled temp memory of value_and_grad grows ~linearly in T (no T² or T·K·V per token)."""
    def temp_bytes(T):
        args, cot = make_inputs(1, T, 1, 16, 16, gated=False)
        f = lambda a: jax.grad(lambda a: jnp.sum(call(delta_rule.chunk_delta_rule, a, False)[0]))(a)
        return jax.jit(f).lower(args).compile().memory_analysis().temp_size_in_bytes
    m1, m4 = temp_bytes(1024), temp_bytes(4096)
    assert m4 < 5 * m1, (m1, m4)


# ----------------------------------------------------------------------------------------------
# Exhaustive sweeps (pytest -m slow)
# ----------------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("beta_max", [1.0, 2.0])
@pytest.mark.parametrize("K,V", [(16, 16), (64, 64), (100, 100), (16, 100), (100, 16)])
@pytest.mark.parametrize("T", [1, 15, 63, 64, 200])
def test_full_product(T, K, V, beta_max, dtype):
    check_family("delta", 2, T, 2, K, V, dtype=dtype, beta_max=beta_max, chunk_size=16 if T < 100 else 64)


@pytest.mark.slow
def test_packed_long():
    packed_case("delta", [1, 15, 0, 100, 300, 64, 128], chunk_size=64, H=2, K=32, V=32)
