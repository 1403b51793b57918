"""What the contract allows and what it forbids, for every family and form.

Allowed: a log gate of ``-inf`` (a full reset) gives the recurrence's answer in every form, with
finite gradients.  Forbidden: positive log gates, ``beta`` outside ``[0, 1]`` (``[0, 2]`` with
``allow_neg_eigval``), malformed ``cu_seqlens`` raise a ``ValueError`` naming the argument when
the values are known; under ``jit`` the same checks run with ``jax.experimental.checkify``.
Wrong shapes, ranks, dtypes and Python lists get a clear error naming the argument.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import checkify

from lolax.ops import FAMILIES
from lolax.ops.attention import naive_softmax_attention, sliding_window_attention, softmax_attention
from lolax.ops.testing import DELTA, GATES, assert_close, assert_forms_match, family_inputs, family_op

GATED = [f for f in FAMILIES if GATES[f]]
FORMS = ("chunk", "fused_recurrent", "naive")


@pytest.mark.parametrize("family", GATED)
def test_minus_infinity_gate_resets_in_every_form(family):
    """Gates of -inf and -1e30 (full resets) mid-chunk: the chunk forms equal the recurrence on
    outputs, final states and every gradient, all finite."""
    args, do, dht = family_inputs(family, 0, 1, 50, 2, 8, 8)
    g = args["g"].at[0, 10].set(-jnp.inf).at[0, 33].set(-1e30).at[0, 34].set(-jnp.inf)
    args["g"] = g
    tol = {"o": 1e-5, "final_state": 1e-5, "grad": 1e-5}
    errors = assert_forms_match(family_op(family, "naive"),
                                {f: family_op(family, f, chunk_size=16) for f in ("chunk", "fused_recurrent")},
                                args, do, dht, tol)
    assert all(np.isfinite(e) for form in errors.values() for e in form.values())


def _bad_values(family):
    args, _, _ = family_inputs(family, 1, 1, 12, 1, 4, 4)
    del args["initial_state"]
    cases = {"cu_seqlens": [np.array([1, 5, 12]), np.array([0, 5, 11]), np.array([0, 7, 5, 12])]}
    if GATES[family]:
        cases["g"] = [args["g"].at[0, 3].set(0.5), args["g"].at[0, 4].set(jnp.nan)]
    if family in DELTA:
        cases["beta"] = [args["beta"].at[0, 2].set(1.5), args["beta"].at[0, 2].set(-0.1)]
    return args, cases


@pytest.mark.parametrize("family", FAMILIES)
def test_forbidden_values_raise_when_concrete(family):
    args, cases = _bad_values(family)
    for name, values in cases.items():
        for bad in values:
            for form in FORMS:
                kw = {"cu_seqlens": bad} if name == "cu_seqlens" else {}
                call = {**args, name: bad} if name != "cu_seqlens" else args
                with pytest.raises(ValueError, match=name):
                    family_op(family, form, **kw)(**call)


@pytest.mark.parametrize("family", FAMILIES)
def test_forbidden_values_are_caught_by_checkify_under_jit(family):
    args, cases = _bad_values(family)
    for form in ("chunk", "fused_recurrent"):
        f = jax.jit(lambda a, cu: family_op(family, form, cu_seqlens=cu)(**a))
        checked = checkify.checkify(f)
        err, _ = checked(args, jnp.array([0, 5, 12]))
        assert err.get() is None, err.get()
        for name, values in cases.items():
            bad_args, bad_cu = (args, jnp.asarray(values[0])) if name == "cu_seqlens" else (
                {**args, name: values[0]}, jnp.array([0, 5, 12]))
            err, _ = checked(bad_args, bad_cu)
            assert err.get() is not None and name in err.get(), (form, name, err.get())


def test_steps_up_to_two_are_allowed_with_the_flag():
    args, _, _ = family_inputs("delta_rule", 2, 1, 12, 1, 4, 4, beta_max=2.0)
    family_op("delta_rule", "chunk", allow_neg_eigval=True)(**args)
    with pytest.raises(ValueError, match="beta"):
        family_op("delta_rule", "chunk", allow_neg_eigval=True)(**{**args, "beta": args["beta"] + 2.5})


def _bad_arguments(family):
    args, _, _ = family_inputs(family, 3, 2, 8, 2, 4, 4)
    q, v, h0 = args["q"], args["v"], args["initial_state"]
    cases = [
        ("q", {"q": q[0]}, "rank 4"),
        ("k", {"k": args["k"][..., :3]}, "same shape"),
        ("v", {"v": v[:, :5]}, "v must have shape"),
        ("q", {"q": q.astype(jnp.int32)}, "floating-point"),
        ("q", {"q": np.asarray(q).tolist()}, "list"),
        ("initial_state", {"initial_state": h0[:1]}, r"\[N, "),
        ("initial_state", {"initial_state": h0.astype(jnp.bfloat16)}, "float32"),
        ("cu_seqlens", {"cu_seqlens": jnp.array([0, 8], jnp.int32)}, "B == 1"),
        ("output_final_state", {"output_final_state": None}, "bool"),
    ]
    if GATES[family]:
        cases += [("g", {"g": args["g"][..., None]}, "shape"), ("g", {"g": args["g"].astype(jnp.int32)}, "floating")]
    if family in DELTA:
        cases += [("beta", {"beta": args["beta"][..., :1]}, "shape"), ("beta", {"beta": [0.5] * 8}, "list")]
    return args, cases


@pytest.mark.parametrize("family", FAMILIES)
def test_bad_arguments_name_the_argument(family):
    args, cases = _bad_arguments(family)
    for name, bad, what in cases:
        for form in FORMS:
            call, kw = dict(args), {}
            for key, val in bad.items():
                (kw if key in ("cu_seqlens", "output_final_state") else call)[key] = val
            with pytest.raises(ValueError, match=name) as info:
                family_op(family, form, **kw)(**call)
            assert info.match(what), (form, name, str(info.value))
    with pytest.raises(ValueError, match="chunk_size"):
        family_op(family, "chunk", chunk_size=0)(**args)


def test_attention_propagates_nan_like_the_reference():
    rng = np.random.default_rng(4)
    q, k, v = (jnp.asarray(rng.standard_normal((1, 40, 2, 8)).astype(np.float32)) for _ in range(3))
    q = q.at[0, 17, 1].set(jnp.nan)
    ref = naive_softmax_attention(q, k, v)
    for o in (softmax_attention(q, k, v, block_size=16), sliding_window_attention(q, k, v, 50, block_size=16)):
        nan = np.isnan(np.asarray(o))
        np.testing.assert_array_equal(nan, np.isnan(np.asarray(ref)))
        assert nan[0, 17, 1].all() and nan.sum() == 8
        assert_close("finite rows", np.where(nan, 0, ref), np.where(nan, 0, o), 1e-5)
