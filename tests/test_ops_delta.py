"""What is particular to the delta rules (DeltaNet, Gated DeltaNet): in-kernel L2 norm and beta
sigmoid, negative eigenvalues, grouped value heads, GDN's in-kernel gate, the recurrent form's
per-dimension decays, chunk transitions, the triangular inverse, long sequences with strong
gates.  The shared matrix is in test_ops_families.py."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lolax.ops import delta_rule, gated_delta_rule
from lolax.ops.common.solve_tril import unit_tril_inverse
from lolax.ops.testing import assert_close, assert_forms_match, family_inputs, family_op, random_inputs

F32 = {"o": 2e-5, "final_state": 2e-5, "grad": 2e-5}
FAMILY = ["delta_rule", "gated_delta_rule"]


@pytest.mark.parametrize("family", FAMILY)
def test_qk_l2norm_in_kernel_with_gradients(family):
    """Unnormalised q and k, normalised inside the op: gradients flow through the normalisation."""
    args, do, dht = family_inputs(family, 0, 1, 40, 2, 32, 20)
    args["k"] = args["k"] * 3.0
    kw = dict(use_qk_l2norm_in_kernel=True)
    assert_forms_match(family_op(family, "naive", **kw),
                       {f: family_op(family, f, chunk_size=16, **kw) for f in ("chunk", "fused_recurrent")},
                       args, do, dht, F32)


@pytest.mark.parametrize("family", FAMILY)
def test_beta_sigmoid_in_kernel_and_negative_eigenvalues(family):
    """``use_beta_sigmoid_in_kernel`` reads logits (step sigmoid(b), 2 sigmoid(b) with
    ``allow_neg_eigval``) and equals passing that step directly; gradients reach the logits."""
    args, do, dht = family_inputs(family, 1, 1, 40, 2, 16, 16)
    logits = jnp.asarray(np.random.default_rng(1).standard_normal(args["beta"].shape), jnp.float32)
    for neg in (False, True):
        step = (2.0 if neg else 1.0) * jax.nn.sigmoid(logits)
        ref = jax.jit(lambda a: family_op(family, "naive", allow_neg_eigval=neg)(**a))({**args, "beta": step})
        for form in ("chunk", "fused_recurrent", "naive"):
            out = jax.jit(lambda a: family_op(family, form, use_beta_sigmoid_in_kernel=True, allow_neg_eigval=neg)(
                **a))({**args, "beta": logits})
            assert_close(f"{form} o", ref[0], out[0], 2e-5)
            assert_close(f"{form} state", ref[1], out[1], 2e-5)
    if family == "gated_delta_rule":                     # the gradient through the sigmoid, once
        args["beta"] = logits
        kw = dict(use_beta_sigmoid_in_kernel=True, allow_neg_eigval=True)
        assert_forms_match(family_op(family, "naive", **kw), {"chunk": family_op(family, "chunk", chunk_size=16, **kw)},
                           args, do, dht, F32)


@pytest.mark.parametrize("family", FAMILY)
def test_steps_up_to_two_need_the_flag(family):
    check = functools.partial(assert_forms_match, tol=F32)
    args, do, dht = family_inputs(family, 2, 1, 63, 2, 16, 16, beta_max=2.0, strength=0.1)
    check(family_op(family, "naive", allow_neg_eigval=True),
          {f: family_op(family, f, chunk_size=16, allow_neg_eigval=True) for f in ("chunk", "fused_recurrent")},
          args, do, dht)
    with pytest.raises(ValueError, match=r"beta must be in \[0, 1\].*allow_neg_eigval"):
        family_op(family, "chunk")(**args)


def test_grouped_value_heads_read_their_key_head():
    """HV = 2H: value head hv reads q/k head hv // 2, checked against explicitly repeated q and k
    (the naive op then runs with HV == H, so its own grouping plays no part)."""
    args, do, dht = family_inputs("gated_delta_rule", 3, 1, 40, 2, 16, 8, value_heads=4)
    repeated = {**args, "q": jnp.repeat(args["q"], 2, axis=2), "k": jnp.repeat(args["k"], 2, axis=2)}
    o_ref, h_ref = jax.jit(lambda a: family_op("gated_delta_rule", "naive")(**a))(repeated)
    for form in ("chunk", "fused_recurrent", "naive"):
        o, h = jax.jit(lambda a: family_op("gated_delta_rule", form, chunk_size=16)(**a))(args)
        assert o.shape == (1, 40, 4, 8) and h.shape == (1, 4, 16, 8)
        assert_close(f"{form} o", o_ref, o, 2e-5)
        assert_close(f"{form} state", h_ref, h, 2e-5)
    assert_forms_match(family_op("gated_delta_rule", "naive"),
                       {"chunk": family_op("gated_delta_rule", "chunk", chunk_size=16)}, args, do, dht, F32)
    with pytest.raises(ValueError, match="v must have H=2 heads"):
        family_op("delta_rule", "chunk")(**{**args, "g": None})


def test_grouped_values_packed():
    cu = np.array([0, 1, 16, 35, 37], np.int32)
    args, do, dht = family_inputs("gated_delta_rule", 4, 1, 37, 2, 8, 8, value_heads=4, num_states=4)
    assert_forms_match(family_op("gated_delta_rule", "naive", cu_seqlens=cu),
                       {f: family_op("gated_delta_rule", f, cu_seqlens=cu, chunk_size=16)
                        for f in ("chunk", "fused_recurrent")}, args, do, dht, F32)


def test_gate_in_kernel_equals_the_precomputed_gate():
    """``use_gate_in_kernel``: g is the raw input and ``-exp(A_log) softplus(g + dt_bias)`` the
    decay; gradients reach A_log and dt_bias."""
    args, do, dht = family_inputs("gated_delta_rule", 5, 1, 40, 2, 16, 8)
    raw = args.pop("g")
    A_log, dt_bias = jnp.log(jnp.array([1.0, 8.0])), jnp.array([0.5, -1.0])

    def explicit(form):
        return lambda A_log, dt_bias, **a: family_op("gated_delta_rule", form, chunk_size=16)(
            **a, g=-jnp.exp(A_log) * jax.nn.softplus(raw + dt_bias))

    def fused(form):
        return lambda A_log, dt_bias, **a: family_op("gated_delta_rule", form, chunk_size=16, use_gate_in_kernel=True,
                                                     A_log=A_log, dt_bias=dt_bias)(**a, g=raw)

    args.update(A_log=A_log, dt_bias=dt_bias)
    assert_forms_match(explicit("naive"), {f: fused(f) for f in ("chunk", "fused_recurrent", "naive")},
                       args, do, dht, F32)
    with pytest.raises(ValueError, match="A_log"):
        family_op("gated_delta_rule", "chunk", use_gate_in_kernel=True)(
            **{n: x for n, x in args.items() if n not in ("A_log", "dt_bias")}, g=raw)


def test_recurrent_gated_delta_rule_with_key_and_value_decays():
    args, do, dht = family_inputs("gated_delta_rule", 6, 2, 30, 2, 8, 16)
    extra = random_inputs(7, 2, 30, 2, 8, 16, gate="vector")
    args["gk"] = extra["g"]                                                   # [B, T, H, K]
    args["gv"] = random_inputs(8, 2, 30, 2, 16, 8, gate="vector")["g"]        # [B, T, H, V]
    assert_forms_match(family_op("gated_delta_rule", "naive"),
                       {"fused_recurrent": family_op("gated_delta_rule", "fused_recurrent")}, args, do, dht, F32)


@pytest.mark.parametrize("family", FAMILY)
def test_recurrent_beta_none_is_a_unit_step(family):
    args, _, _ = family_inputs(family, 9, 1, 12, 1, 8, 8)
    ones = family_op(family, "fused_recurrent")(**{**args, "beta": jnp.ones_like(args["beta"])})
    default = family_op(family, "fused_recurrent")(**{**args, "beta": None})
    assert_close("o", ones[0], default[0], 0.0)


@pytest.mark.parametrize("family", FAMILY)
def test_chunk_transitions_compose_to_the_final_state(family):
    args, _, _ = family_inputs(family, 10, 2, 50, 2, 16, 8, strength=0.5)
    if family == "delta_rule":
        M, S_ext = jax.jit(functools.partial(delta_rule.chunk_transitions, chunk_size=16))(
            args["k"], args["v"], args["beta"])
    else:
        M, S_ext = jax.jit(functools.partial(gated_delta_rule.chunk_gated_transitions, chunk_size=16))(
            args["k"], args["v"], args["g"], args["beta"])
    assert M.shape == (2, 4, 2, 16, 16) and S_ext.shape == (2, 4, 2, 16, 8)
    S = args["initial_state"]
    for c in range(M.shape[1]):
        S = jnp.matmul(M[:, c], S, precision="highest") + S_ext[:, c]
    _, h_ref = family_op(family, "naive")(**args)
    assert_close("folded state", h_ref, S, 2e-5)


def test_unit_tril_inverse_and_its_gradient():
    a = jax.random.normal(jax.random.key(0), (3, 20, 20)) * 0.3
    y = unit_tril_inverse(a)
    L = jnp.eye(20) + jnp.tril(a, -1)
    np.testing.assert_allclose(np.asarray(jnp.matmul(y, L, precision="highest")), np.eye(20)[None].repeat(3, 0),
                               atol=1e-5)
    ct = jax.random.normal(jax.random.key(1), (3, 20, 20))
    f_ref = lambda a: jnp.sum(jnp.linalg.inv(jnp.eye(20) + jnp.tril(a, -1)) * ct)
    f = lambda a: jnp.sum(unit_tril_inverse(a) * ct)
    assert_close("d(a)", jax.grad(f_ref)(a), jax.grad(f)(a), 1e-5)


def _long_strong_gates(T, check_recurrent):
    args, do, dht = family_inputs("gated_delta_rule", 11, 1, T, 1, 16, 16, strength=0.02, beta_max=2.0)
    args["g"] = args["g"].at[0, T // 2].set(-1e4)                   # a reset in the middle
    kw = dict(allow_neg_eigval=True)
    run = jax.jit(lambda a: jax.value_and_grad(
        lambda a: jnp.sum(family_op("gated_delta_rule", "chunk", **kw)(**a)[0] * do), allow_int=True)(a))
    loss, grads = run(args)
    assert np.isfinite(float(loss)) and all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(grads))
    if check_recurrent:
        o, h = jax.jit(lambda a: family_op("gated_delta_rule", "chunk", **kw)(**a))(args)
        o_r, h_r = jax.jit(lambda a: family_op("gated_delta_rule", "fused_recurrent", **kw)(**a))(args)
        assert_close("o", o_r, o, 1e-4)
        assert_close("state", h_r, h, 1e-4)


def test_long_sequence_with_strong_gates():
    _long_strong_gates(2048, check_recurrent=True)


@pytest.mark.slow
def test_64k_strong_gates_finite():
    _long_strong_gates(65536, check_recurrent=False)


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILY)
def test_memory_linear_in_length(family):
    """Compiled temp memory of value_and_grad grows ~linearly in T (no T² or T·K·V per token)."""
    def temp_bytes(T):
        args, _, _ = family_inputs(family, 0, 1, T, 1, 16, 16)
        f = jax.grad(lambda a: jnp.sum(family_op(family, "chunk")(**a)[0]))
        return jax.jit(f).lower(args).compile().memory_analysis().temp_size_in_bytes
    m1, m4 = temp_bytes(1024), temp_bytes(4096)
    assert m4 < 5 * m1, (m1, m4)
