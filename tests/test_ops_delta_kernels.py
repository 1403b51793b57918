"""The Pallas kernels of delta_rule and gated_delta_rule: parity, dispatch, lowering, LASP-2.

As for the diagonal families (``test_ops_kernels``): on CPU the TPU kernels run in the TPU
interpreter with unwritten memory filled with NaN, race detection and out-of-bounds reads
raising, the GPU kernels in the generic interpreter; each is compared with the naive oracle on o,
the final state and every gradient (q, k, v, g, beta, initial_state) at the XLA chunk tests'
tolerances.  ``jax.export`` for ``tpu`` and ``cuda`` proves the kernels lower and are in the
program.  Checks of the compiled kernels on a GPU are marked ``gpu``.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export
from test_ops_kernels import BACKENDS, TOL

from lolax.ops import chunk_delta_rule, chunk_gated_delta_rule
from lolax.ops.common.delta import chunk_delta
from lolax.ops.common.delta_kernel_math import unit_tril_inverse
from lolax.ops.common.delta_kernels import run_delta_kernels
from lolax.ops.common.diagonal_kernels import interpret_kernels, kernel_tuning
from lolax.ops.common.prepare import prepare
from lolax.ops.testing import assert_close, assert_forms_match, family_inputs, family_op

LENGTHS = (1, 0, 15, 63)          # a single token, an empty sequence, odd lengths across chunks
FAMILIES = ("delta_rule", "gated_delta_rule")
MODES = {"delta_rule": None, "gated_delta_rule": "head"}


def check_kernels(family, backend, *, B, T, K=16, V=32, dtype=jnp.float32, strength=0.1, beta_max=2.0,
                  value_heads=None, num_states=None, mutate=None, **kw):
    """Kernels (``implementation="pallas"`` on ``backend``'s interpreter) against the naive oracle;
    steps up to 2 (``allow_neg_eigval``) unless ``beta_max`` says otherwise."""
    args, do, dht = family_inputs(family, 0, B, T, 2, K, V, strength=strength, beta_max=beta_max,
                                  value_heads=value_heads, num_states=num_states, dtype=dtype)
    if mutate is not None:
        args = mutate(args)
    kw = {"allow_neg_eigval": True, **kw}
    oracle_kw = {n: x for n, x in kw.items() if n in ("cu_seqlens", "allow_neg_eigval")}
    with interpret_kernels(backend, BACKENDS[backend]):
        return assert_forms_match(family_op(family, "naive", **oracle_kw),
                                  {backend: family_op(family, "chunk", implementation="pallas", **kw)},
                                  args, do, dht, TOL[dtype])


@pytest.mark.parametrize("family,backend", [
    ("delta_rule", "tpu"), pytest.param("delta_rule", "gpu", marks=pytest.mark.slow),
    ("gated_delta_rule", "tpu"), ("gated_delta_rule", "gpu")])
def test_packed_strong_gates_match_naive(family, backend):
    """Packed sequences of lengths 1, 0, 15 and 63, an initial state each, strong gates, steps in
    [0, 2]; Gated DeltaNet with 4 value heads on 2 key heads; on GPU two value blocks."""
    cu = np.concatenate([[0], np.cumsum(LENGTHS)]).astype(np.int32)
    heads = 4 if family == "gated_delta_rule" else None
    with kernel_tuning("gpu", block_v=16):
        check_kernels(family, backend, B=1, T=int(cu[-1]), num_states=len(LENGTHS), value_heads=heads,
                      cu_seqlens=cu, chunk_size=32)


@pytest.mark.slow                  # the default suite runs the GPU default schedule (two-phase)
@pytest.mark.parametrize("family", ["gated_delta_rule", "delta_rule"])
def test_gpu_fused_schedule_matches_naive(family):
    """The GPU kernels' other schedule: one sequential pass per head computes everything."""
    cu = np.concatenate([[0], np.cumsum(LENGTHS)]).astype(np.int32)
    with kernel_tuning("gpu", schedule="fused", block_v=16):
        check_kernels(family, "gpu", B=1, T=int(cu[-1]), num_states=len(LENGTHS), cu_seqlens=cu, chunk_size=32)


@pytest.mark.parametrize("family,backend", [("gated_delta_rule", "tpu"),
                                            pytest.param("gated_delta_rule", "gpu", marks=pytest.mark.slow),
                                            pytest.param("delta_rule", "tpu", marks=pytest.mark.slow)])
def test_bf16_matches_naive(family, backend):
    check_kernels(family, backend, B=1, T=40, dtype=jnp.bfloat16, chunk_size=16, strength=1.0, beta_max=1.0)


def test_minus_infinity_gates_reset_exactly():
    def resets(args):
        return {**args, "g": args["g"].at[0, 10].set(-jnp.inf).at[0, 33].set(-1e30).at[0, 34].set(-jnp.inf)}
    errors = check_kernels("gated_delta_rule", "tpu", B=1, T=50, mutate=resets, chunk_size=16)
    assert all(np.isfinite(e) for e in errors["tpu"].values())


def test_in_kernel_options_match_xla():
    """``use_qk_l2norm_in_kernel``, ``use_beta_sigmoid_in_kernel`` with ``allow_neg_eigval``, GDN's
    in-kernel gate (``A_log``, ``dt_bias``) and ``state_v_first``: kernels equal the XLA chunk
    form, forward and every gradient (the logits, ``A_log`` and ``dt_bias`` included)."""
    B, T, H, HV, K, V = 1, 37, 1, 2, 16, 16
    ks = jax.random.split(jax.random.key(5), 7)
    q, k = jax.random.normal(ks[0], (2, B, T, H, K))
    v = jax.random.normal(ks[1], (B, T, HV, V))
    g_raw, logits = jax.random.normal(ks[2], (2, B, T, HV))
    A_log, dt_bias = jax.random.normal(ks[3], (2, HV)) * 0.5
    h0 = jax.random.normal(ks[4], (B, HV, V, K))

    def loss(impl):
        def f(q, k, v, g_raw, logits, A_log, dt_bias, h0):
            o, S = chunk_gated_delta_rule(q, k, v, g_raw, logits, initial_state=h0, output_final_state=True,
                                          use_qk_l2norm_in_kernel=True, use_beta_sigmoid_in_kernel=True,
                                          allow_neg_eigval=True, state_v_first=True, use_gate_in_kernel=True,
                                          A_log=A_log, dt_bias=dt_bias, chunk_size=16, implementation=impl)
            return jnp.sum(jnp.sin(o)) + jnp.sum(jnp.cos(S)), (o, S)
        return jax.jit(jax.value_and_grad(f, argnums=tuple(range(8)), has_aux=True))(
            q, k, v, g_raw, logits, A_log, dt_bias, h0)

    (_, ref), ref_grads = loss("xla")
    with interpret_kernels("tpu", BACKENDS["tpu"]):
        (_, out), out_grads = loss("pallas")
    for name, a, b in zip(("o", "S"), ref, out):
        assert_close(name, a, b, 1e-5)
    for name, a, b in zip(("dq", "dk", "dv", "dg", "dlogits", "dA_log", "ddt_bias", "dh0"), ref_grads, out_grads):
        assert_close(name, a, b, 3e-5)


def test_kernel_triangular_inverse():
    """The kernels' block-doubling ``(I + A)^{-1}`` against a dense inverse, steps up to 2."""
    C = 64
    k = jax.random.normal(jax.random.key(0), (C, 16))
    k = k / jnp.linalg.norm(k, axis=1, keepdims=True)
    beta = jax.random.uniform(jax.random.key(1), (C, 1), maxval=2.0)
    A = jnp.tril(beta * jnp.matmul(k, k.T, precision="highest"), -1)
    ref = jnp.linalg.inv(jnp.eye(C) + A)
    assert_close("inverse", ref, unit_tril_inverse(A, "f32"), 1e-5)


@pytest.mark.slow                 # the packed GPU case runs two value blocks in the default suite
@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_value_blocks_split_the_state(backend):
    """``block_v`` < V: dq, dk, dβ and dG are sums over the value blocks' programs."""
    B, T, H, K, V = 1, 40, 2, 16, 64
    ks = jax.random.split(jax.random.key(1), 5)
    q, k = jax.random.normal(ks[0], (2, B, T, H, K))
    v = jax.random.normal(ks[1], (B, T, H, V))
    g = jax.nn.log_sigmoid(jax.random.normal(ks[2], (B, T, H)))
    beta = jax.random.uniform(ks[3], (B, T, H))
    h0 = jax.random.normal(ks[4], (B, H, K, V))

    def loss(run):
        def f(q, k, v, g, beta, h0):
            x = prepare(q, k, v, g=g, beta=beta, initial_state=h0, output_final_state=True, qk_l2norm=True)
            o, final = run(x)
            return jnp.sum(jnp.sin(o)) + jnp.sum(jnp.cos(final))
        return jax.grad(f, argnums=tuple(range(6)))(q, k, v, g, beta, h0)

    ref = loss(lambda x: chunk_delta(x, 16))
    out = loss(lambda x: run_delta_kernels(x, "head", 16, 16, backend, interpret=BACKENDS[backend], block_v=16))
    for name, a, b in zip(("dq", "dk", "dv", "dg", "dbeta", "dh0"), ref, out):
        assert_close(name, a, b, 3e-5)


@pytest.mark.parametrize("backend,K,V", [
    ("gpu", 64, 128), *(pytest.param(b, K, V, marks=pytest.mark.slow) for b, K, V in [
        ("gpu", 128, 128), ("gpu", 256, 64), ("tpu", 64, 256), ("tpu", 128, 128), ("tpu", 256, 256)])])
def test_production_head_sizes_match_naive(backend, K, V):
    """Head sizes of real models (K and V of 64, 128, 256; value blocks of 64 on GPU, 128 on TPU)."""
    check_kernels("gated_delta_rule", backend, B=1, T=70, K=K, V=V, strength=1.0, beta_max=1.0)


@pytest.mark.slow
@pytest.mark.parametrize("T", [1, 15, 63, 200])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("backend", sorted(BACKENDS))
@pytest.mark.parametrize("family", FAMILIES)
def test_kernels_match_naive_full(family, backend, dtype, T):
    check_kernels(family, backend, B=2, T=T, dtype=dtype, chunk_size=64 if T > 100 else 16,
                  beta_max=2.0 if dtype == jnp.float32 else 1.0)


@pytest.mark.slow
def test_64k_strong_gates_finite():
    """T = 65536 with strong gates, steps up to 2 and a reset: the kernels' loss and gradients are
    finite (GPU kernels, interpreted: the sequential loop compiles to one XLA loop)."""
    T = 65536
    args, do, _ = family_inputs("gated_delta_rule", 11, 1, T, 1, 16, 16, strength=0.02, beta_max=2.0)
    args["g"] = args["g"].at[0, T // 2].set(-1e4)
    op = family_op("gated_delta_rule", "chunk", allow_neg_eigval=True, implementation="pallas")
    with interpret_kernels("gpu"):
        loss, grads = jax.jit(jax.value_and_grad(lambda a: jnp.sum(op(**a)[0] * do)))(args)
    assert np.isfinite(float(loss)) and all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(grads))


def test_dispatch_choices_and_errors():
    q, k, v = jax.random.normal(jax.random.key(0), (3, 1, 20, 2, 12))
    beta = jnp.full((1, 20, 2), 0.5)
    g = jnp.full((1, 20, 2), -0.1)
    ref, _ = chunk_gated_delta_rule(q, k, v, g, beta, implementation="xla")
    out, _ = chunk_gated_delta_rule(q, k, v, g, beta)              # None: K = 12 has no kernel, XLA runs
    np.testing.assert_array_equal(ref, out)
    with pytest.raises(ValueError, match="implementation='pallas' does not support q/k with key dimension K = 12"):
        chunk_delta_rule(q, k, v, beta, implementation="pallas")
    with pytest.raises(ValueError, match="implementation must be None, 'xla' or 'pallas', got 'cuda'"):
        chunk_delta_rule(q, k, v, beta, implementation="cuda")
    q16 = q[..., :8].repeat(2, -1)
    with pytest.raises(ValueError, match="chunk_size = 256"):
        chunk_delta_rule(q16, q16, q16, beta, chunk_size=256, implementation="pallas")


def test_cpu_default_runs_xla():
    q, k, v = jax.random.normal(jax.random.key(0), (3, 1, 20, 2, 16))
    beta = jnp.full((1, 20, 2), 0.5)
    hlo = jax.jit(lambda q: chunk_delta_rule(q, k, v, beta)[0]).lower(q).as_text()
    assert "tpu_custom_call" not in hlo and "triton" not in hlo


def _export(fn, platform, *shapes):
    disabled = [export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")] if platform == "cuda" else []
    args = [jax.ShapeDtypeStruct(s, d) for s, d in shapes]
    return export.export(jax.jit(fn), platforms=[platform], disabled_checks=disabled)(*args).mlir_module()


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
@pytest.mark.parametrize("family", FAMILIES)
def test_forward_and_gradient_lower_to_kernels(family, platform):
    """``implementation=None`` exported for TPU / CUDA from this CPU machine carries the kernels,
    packed bf16 inputs with initial states (grouped value heads for Gated DeltaNet)."""
    B, T, H, K, V = 1, 100, 2, 64, 128
    HV = 4 if family == "gated_delta_rule" else H
    cu = jnp.array([0, 30, 100], jnp.int32)

    def f(q, k, v, beta, h0, *g):
        o, final = family_op(family, "chunk", cu_seqlens=cu, use_qk_l2norm_in_kernel=True)(
            q, k, v, *g, beta=beta, initial_state=h0)
        return jnp.sum(o.astype(jnp.float32)) + jnp.sum(final)

    shapes = [((B, T, H, K), jnp.bfloat16), ((B, T, H, K), jnp.bfloat16), ((B, T, HV, V), jnp.bfloat16),
              ((B, T, HV), jnp.float32), ((2, HV, K, V), jnp.float32)]
    shapes += [((B, T, HV), jnp.float32)] if family == "gated_delta_rule" else []
    marker = {"tpu": "tpu_custom_call", "cuda": "__gpu$xla.gpu.triton"}[platform]
    assert _export(f, platform, *shapes).count(marker) >= 1
    text = _export(jax.grad(f, argnums=tuple(range(len(shapes)))), platform, *shapes)
    mode = MODES[family] or "none"
    for name in ("fwd", "bwd"):
        assert f"lolax_delta_{mode}_{name}" in text
    assert text.count(marker) >= 2


def test_models_pass_their_implementation_down():
    """``model.implementation`` reaches the delta-rule mixers' ops."""
    from flax import nnx

    from lolax.models import LanguageModel, ModelConfig
    cfg = ModelConfig(vocab_size=64, d_model=64, num_heads=2, num_layers=2, pattern="DN", mlp_hidden=64,
                      chunk_size=16)
    tokens = jax.random.randint(jax.random.key(0), (1, 16), 0, 64)
    with interpret_kernels("gpu"):
        logits = {impl: LanguageModel(dataclasses.replace(cfg, implementation=impl), nnx.Rngs(0))(tokens)
                  for impl in ("xla", "pallas")}
    assert_close("logits", logits["xla"], logits["pallas"], 1e-5)


@pytest.mark.parametrize("family,V", [("gated_delta_rule", 32), pytest.param("delta_rule", 16,
                                                                             marks=pytest.mark.slow)])
def test_lasp2_runs_the_kernels_on_every_shard(family, V):
    """LASP-2 over 8 simulated devices with interpreted TPU kernels on each device's share equals
    the unsharded op, forward and every gradient.  The transition comes from a second call on zero
    values when V + K (here 48) is no kernel size, from ``[v, 0]`` in one call when it is (32)."""
    from lolax.parallelism.lasp2 import lasp2
    auto = (jax.sharding.AxisType.Auto,) * 2
    mesh = jax.make_mesh((1, 8), ("data", "sequence"), axis_types=auto)
    B, T, H, K = 1, 64, 2, 16
    args, _, _ = family_inputs(family, 3, B, T, H, K, V, strength=0.5)
    args.pop("initial_state")
    op = family_op(family, "chunk")

    def loss(f):
        return jax.jit(jax.value_and_grad(lambda a: jnp.sum(jnp.sin(f(a)[0])) + jnp.sum(f(a)[1])))

    ref = loss(lambda a: op(**a))(args)
    gates = lambda a: {n: a[n] for n in ("g", "beta") if n in a}
    with interpret_kernels("tpu"):
        out = loss(lambda a: lasp2(family, a["q"], a["k"], a["v"], mesh=mesh, **gates(a), output_final_state=True,
                                   chunk_size=16, implementation="pallas"))(args)
    assert_close("loss", ref[0], out[0], 1e-5)
    for name in ref[1]:
        assert_close("d" + name, ref[1][name], out[1][name], 3e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_compiled_kernels_on_gpu(family, dtype):
    """On the device: the compiled kernels against the naive oracle and the XLA chunk form."""
    cu = np.concatenate([[0], np.cumsum((1, 0, 15, 63, 200, 64))]).astype(np.int32)
    heads = 8 if family == "gated_delta_rule" else None
    args, do, dht = family_inputs(family, 0, 1, int(cu[-1]), 4, 64, 128, strength=0.5, num_states=6, dtype=dtype,
                                  beta_max=1.0, value_heads=heads)
    fns = {impl: family_op(family, "chunk", implementation=impl, cu_seqlens=cu) for impl in ("pallas", "xla")}
    assert_forms_match(family_op(family, "naive", cu_seqlens=cu), fns, args, do, dht, TOL[dtype])


def _avals(jaxpr):
    """Every intermediate's shape in a jaxpr and the jaxprs nested in it."""
    for eqn in jaxpr.eqns:
        yield from (tuple(v.aval.shape) for v in eqn.outvars if hasattr(v.aval, "shape"))
        for param in eqn.params.values():
            for sub in param if isinstance(param, (tuple, list)) else (param,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    yield from _avals(inner)


def test_grouped_values_do_not_repeat_q_and_k():
    """With 4 value heads on 1 key head the kernels read q and k unrepeated: no array of q's
    shape widened to the value heads is ever formed."""
    B, T, H, HV, K, V = 1, 20, 1, 4, 16, 32
    q, k = jax.random.normal(jax.random.key(0), (2, B, T, H, K))
    v = jax.random.normal(jax.random.key(1), (B, T, HV, V))
    g, beta = jnp.full((B, T, HV), -0.1), jnp.full((B, T, HV), 0.5)
    with interpret_kernels("tpu"):
        jaxpr = jax.make_jaxpr(lambda q, k: chunk_gated_delta_rule(q, k, v, g, beta, implementation="pallas")[0])(q, k)
        xla = jax.make_jaxpr(lambda q, k: chunk_gated_delta_rule(q, k, v, g, beta, implementation="xla")[0])(q, k)
    assert (B, T, HV, K) in set(_avals(xla.jaxpr))            # the XLA form repeats: the check can fail
    assert (B, T, HV, K) not in set(_avals(jaxpr.jaxpr))
