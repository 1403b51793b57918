"""Every linear-attention family, every form, against its naive oracle.

Outputs, final states and every gradient (q, k, v, g, beta, initial_state) under the loss
``Σ(o ⊙ do) + Σ(h_T ⊙ dh_T)``; odd lengths, head sizes that are not powers of two, gate strengths
``logsigmoid(u) / c`` with c in {0.1, 1, 10}, bf16 inputs, packed sequences against a loop over
the sequences, one-token decoding against the full forward, and the state layout switch.  The
full products run under ``-m slow``.

Tolerances (``rms(out - ref) <= rtol * rms(ref) + atol``, ``lolax.ops.testing``):
float32: every form does float32 arithmetic on the same values and differs from the oracle only
in summation order (observed 1e-7 to 2e-6 relative), so rtol 1e-5 and no absolute floor; the
gate gradient dg, a reverse cumulative sum of ``q ⊙ dq - k ⊙ dk`` whose two terms nearly cancel
under strong decays, gets 3e-5 (GLA at c = 0.1 reaches 1.2e-5).
bfloat16: every form reads the same bf16 values and accumulates in float32; o and the gradients
are then rounded to bf16 (2^-9 relative per element), so rtol 1e-2.
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lolax.ops import FAMILIES
from lolax.ops.testing import GATES, assert_close, assert_forms_match, family_inputs, family_op

TOL = {jnp.float32: {"o": 1e-5, "final_state": 1e-5, "grad": 1e-5, "dg": 3e-5, "atol": 0.0},
       jnp.bfloat16: {"o": 1e-2, "final_state": 1e-2, "grad": 1e-2, "atol": 0.0}}

# (T, K, V, chunk_size, gate strength c, dtype, forms): odd T, T < C, T spanning chunks, head
# sizes that are not powers of two, the three gate strengths, bf16.  The token-by-token form is
# also checked here on packed sequences and decoding; every form runs the full product in slow.
CASES = [
    (1, 16, 16, 64, 1.0, jnp.float32, ("chunk", "fused_recurrent")),
    (63, 16, 100, 16, 0.1, jnp.float32, ("chunk",)),
    (200, 64, 16, 64, 10.0, jnp.float32, ("chunk",)),
    (64, 100, 64, 64, 1.0, jnp.bfloat16, ("chunk",)),
]


def check_forms(family, T, K, V, chunk_size, strength, dtype, forms, *, B=2, H=2, beta_max=1.0, **kw):
    args, do, dht = family_inputs(family, 0, B, T, H, K, V, strength=strength, beta_max=beta_max, dtype=dtype)
    fns = {form: family_op(family, form, chunk_size=chunk_size, **kw) for form in forms}
    return assert_forms_match(family_op(family, "naive", **kw), fns, args, do, dht, TOL[dtype])


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"T{c[0]}-K{c[1]}-V{c[2]}-C{c[3]}-c{c[4]}-{c[5].__name__}")
@pytest.mark.parametrize("family", FAMILIES)
def test_forms_match_naive(family, case):
    check_forms(family, *case)


@pytest.mark.slow
@pytest.mark.parametrize("T,K,V,dtype", list(itertools.product(
    [1, 15, 63, 64, 200], [16, 64, 100], [16, 64, 100], [jnp.float32, jnp.bfloat16])))
@pytest.mark.parametrize("family", FAMILIES)
def test_forms_match_naive_full(family, T, K, V, dtype):
    check_forms(family, T, K, V, 16 if T < 100 else 64, 1.0, dtype, ("chunk", "fused_recurrent"))


@pytest.mark.slow
@pytest.mark.parametrize("T,strength,dtype", list(itertools.product(
    [15, 64, 200], [0.1, 1.0, 10.0], [jnp.float32, jnp.bfloat16])))
@pytest.mark.parametrize("family", [f for f in FAMILIES if GATES[f]])
def test_gate_strength_sweep_full(family, T, strength, dtype):
    check_forms(family, T, 64, 64, 64, strength, dtype, ("chunk", "fused_recurrent"))


# ---------------------------------------------------------------------------------------------
# Packed sequences: one packed row equals each sequence run on its own
# ---------------------------------------------------------------------------------------------

LENGTHS = (0, 1, 39, 60, 17)            # an empty sequence, a single token, chunk-crossing ones


def _per_sequence(family, args, lengths):
    """Runs the naive op on every sequence alone (unpacked, from its own initial state)."""
    naive = family_op(family, "naive")
    cu = np.concatenate([[0], np.cumsum(lengths)])
    outs, finals = [], []
    for n, (a, b) in enumerate(zip(cu[:-1], cu[1:])):
        if a == b:
            finals.append(args["initial_state"][n])
            continue
        part = {m: x[:, a:b] for m, x in args.items() if m != "initial_state"}
        o, h = naive(**part, initial_state=args["initial_state"][n:n + 1])
        outs.append(o)
        finals.append(h[0])
    return jnp.concatenate(outs, 1), jnp.stack(finals)


@pytest.mark.parametrize("family", FAMILIES)
def test_packed_equals_sequences_run_alone(family):
    lengths = LENGTHS
    cu = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    args, do, dht = family_inputs(family, 1, 1, int(cu[-1]), 2, 16, 8, strength=0.5, num_states=len(lengths))
    loop = lambda **a: _per_sequence(family, a, lengths)
    fns = {form: family_op(family, form, cu_seqlens=cu, chunk_size=16) for form in ("chunk", "fused_recurrent")}
    assert_forms_match(loop, fns, args, do, dht, TOL[jnp.float32])


@pytest.mark.parametrize("family", FAMILIES)
def test_packed_offsets_traced_under_jit(family):
    cu = jnp.array([0, 7, 20, 30], jnp.int32)
    args, _, _ = family_inputs(family, 2, 1, 30, 1, 8, 8, num_states=3)
    ref_o, ref_h = family_op(family, "naive", cu_seqlens=np.asarray(cu))(**args)
    for form in ("chunk", "fused_recurrent"):
        o, h = jax.jit(lambda a, c: family_op(family, form, cu_seqlens=c, chunk_size=8)(**a))(args, cu)
        assert_close(f"{form} o", ref_o, o, 1e-5)
        assert_close(f"{form} final_state", ref_h, h, 1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_packed_long(family):
    lengths = (1, 15, 0, 100, 300, 64, 128)
    cu = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    args, do, dht = family_inputs(family, 3, 1, int(cu[-1]), 2, 32, 32, num_states=len(lengths))
    fns = {form: family_op(family, form, cu_seqlens=cu) for form in ("chunk", "fused_recurrent")}
    assert_forms_match(lambda **a: _per_sequence(family, a, lengths), fns, args, do, dht, TOL[jnp.float32])


# ---------------------------------------------------------------------------------------------
# Decoding, layout, defaults
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_decoding_steps_equal_the_full_forward(family):
    args, _, _ = family_inputs(family, 4, 2, 15, 2, 16, 16)
    o_full, h_full = family_op(family, "chunk", chunk_size=8)(**args)
    step = jax.jit(lambda a: family_op(family, "fused_recurrent")(**a))
    state, outs = args["initial_state"], []
    for t in range(15):
        o, state = step({**{n: x[:, t:t + 1] for n, x in args.items() if n != "initial_state"},
                         "initial_state": state})
        outs.append(o)
    assert_close("decoded o", o_full, jnp.concatenate(outs, 1), 1e-5)
    assert_close("decoded state", h_full, state, 1e-5)


@pytest.mark.parametrize("family", [f for f in FAMILIES if f != "linear_attn"])
def test_state_v_first_is_the_transposed_layout(family):
    args, _, _ = family_inputs(family, 5, 1, 20, 2, 8, 4)
    h0_t = jnp.swapaxes(args["initial_state"], -1, -2)
    for form in ("chunk", "fused_recurrent", "naive"):
        o, h = jax.jit(lambda a: family_op(family, form)(**a))(args)
        o_t, h_t = jax.jit(lambda a: family_op(family, form, state_v_first=True)(**a))({**args, "initial_state": h0_t})
        assert h_t.shape == (1, 2, 4, 8)
        assert_close(f"{form} o", o, o_t, 0.0)
        assert_close(f"{form} final_state", jnp.swapaxes(h, -1, -2), h_t, 0.0)


@pytest.mark.parametrize("family", FAMILIES)
def test_defaults_scale_and_dtypes(family):
    args, _, _ = family_inputs(family, 6, 1, 10, 1, 16, 4, dtype=jnp.bfloat16)
    for form in ("chunk", "fused_recurrent", "naive"):
        op = family_op(family, form, output_final_state=False)
        o, h = jax.jit(lambda a: op(**a))(args)
        assert h is None and o.shape == (1, 10, 1, 4) and o.dtype == jnp.bfloat16
        assert_close(f"{form} default scale is K^-0.5", o, jax.jit(lambda a: op(**a, scale=0.25))(args)[0], 0.0)


@pytest.mark.parametrize("family", ["linear_attn", "simple_gla", "gla"])   # as in FLA, the delta rules have none
def test_reverse_runs_every_sequence_backwards(family):
    args, _, _ = family_inputs(family, 7, 1, 20, 2, 8, 8)
    o, h = family_op(family, "fused_recurrent", reverse=True)(**args)
    flip = {n: (x[:, ::-1] if n != "initial_state" else x) for n, x in args.items()}
    o_ref, h_ref = family_op(family, "naive")(**flip)
    assert_close("reverse o", o_ref[:, ::-1], o, 1e-5)
    assert_close("reverse state", h_ref, h, 1e-5)
