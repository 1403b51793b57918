"""The Pallas kernels of linear_attn, simple_gla and gla: parity, dispatch and lowering
(the delta rules' kernels: ``test_ops_delta_kernels``).

On CPU the kernels run in Pallas' interpreters: the TPU (Mosaic) kernels in the TPU interpreter
with unwritten memory filled with NaN, race detection and out-of-bounds reads raising, the GPU
(Triton) kernels in the generic interpreter.  Each is compared with the naive oracle on o, the
final state and every gradient (q, k, v, g, initial_state) at the tolerances of
``test_ops_families``.  Lowering is proven with ``jax.export`` for ``tpu`` and ``cuda``: the
exported module must contain the kernels' custom calls, so a silent fall-back to XLA fails.
Device checks (compiled kernels on a GPU) are marked ``gpu``.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export
from jax.experimental.pallas import tpu as pltpu

from lolax.ops import chunk_gla, chunk_linear_attn, chunk_retention, chunk_simple_gla
from lolax.ops.common.diagonal import chunk_diagonal
from lolax.ops.common.diagonal_kernels import interpret_kernels, kernel_tuning, run_kernels
from lolax.ops.common.prepare import prepare
from lolax.ops.testing import assert_close, assert_forms_match, family_inputs, family_op

TOL = {jnp.float32: {"o": 1e-5, "final_state": 1e-5, "grad": 1e-5, "dg": 3e-5, "atol": 0.0},
       jnp.bfloat16: {"o": 1e-2, "final_state": 1e-2, "grad": 1e-2, "atol": 0.0}}
STRICT_TPU = pltpu.InterpretParams(uninitialized_memory="nan", detect_races=True, out_of_bounds_reads="raise")
BACKENDS = {"tpu": STRICT_TPU, "gpu": True}
LENGTHS = (1, 0, 15, 63)          # a single token, an empty sequence, odd lengths across chunks
MODES = {"linear_attn": None, "simple_gla": "head", "gla": "key"}
DIAGONAL = tuple(MODES)


def check_kernels(family, backend, *, B, T, K=16, V=32, dtype=jnp.float32, strength=0.1, num_states=None,
                  mutate=None, **kw):
    args, do, dht = family_inputs(family, 0, B, T, 2, K, V, strength=strength, num_states=num_states, dtype=dtype)
    if mutate is not None:
        args = mutate(args)
    with interpret_kernels(backend, BACKENDS[backend]):
        return assert_forms_match(family_op(family, "naive", **{n: x for n, x in kw.items() if n == "cu_seqlens"}),
                                  {backend: family_op(family, "chunk", implementation="pallas", **kw)},
                                  args, do, dht, TOL[dtype])


@pytest.mark.parametrize("family,backend", [
    ("linear_attn", "tpu"), pytest.param("linear_attn", "gpu", marks=pytest.mark.slow), ("simple_gla", "tpu"),
    ("simple_gla", "gpu"), ("gla", "tpu"), ("gla", "gpu")])
def test_packed_strong_gates_match_naive(family, backend):
    """Packed sequences of lengths 1, 0, 15 and 63, an initial state each, strong gates (on GPU
    in two value blocks, so dq and dk are sums over programs)."""
    cu = np.concatenate([[0], np.cumsum(LENGTHS)]).astype(np.int32)
    with kernel_tuning("gpu", block_v=16):                 # V = 32: two value blocks on GPU
        check_kernels(family, backend, B=1, T=int(cu[-1]), num_states=len(LENGTHS), cu_seqlens=cu, chunk_size=32)


@pytest.mark.parametrize("family", ["gla", pytest.param("simple_gla", marks=pytest.mark.slow),
                                    pytest.param("linear_attn", marks=pytest.mark.slow)])
def test_gpu_fused_schedule_matches_naive(family):
    """The GPU kernels' other schedule (one sequential pass per head, as on TPU)."""
    cu = np.concatenate([[0], np.cumsum(LENGTHS)]).astype(np.int32)
    with kernel_tuning("gpu", schedule="fused", block_v=16):
        check_kernels(family, "gpu", B=1, T=int(cu[-1]), num_states=len(LENGTHS), cu_seqlens=cu, chunk_size=32)


@pytest.mark.parametrize("backend", ["tpu", pytest.param("gpu", marks=pytest.mark.slow)])
def test_bf16_gla_matches_naive(backend):
    check_kernels("gla", backend, B=1, T=40, dtype=jnp.bfloat16, chunk_size=16, strength=1.0)


def test_bf16_single_part_products_stay_within_their_documented_error():
    """``split_bf16=False`` (every operand rounded to one bf16 part, flash-linear-attention's
    choice): outputs within 1e-2 and the gate gradient within 3e-2 relative RMS of the oracle (it
    is ~1.4e-2 here: the reverse sum of q ⊙ dq - k ⊙ dk nearly cancels)."""
    args, do, dht = family_inputs("simple_gla", 0, 2, 200, 2, 16, 32, dtype=jnp.bfloat16)
    with interpret_kernels("gpu"), kernel_tuning("gpu", split_bf16=False):
        assert_forms_match(family_op("simple_gla", "naive"),
                           {"one_part": family_op("simple_gla", "chunk", implementation="pallas")}, args, do, dht,
                           {**TOL[jnp.bfloat16], "dg": 3e-2})


@pytest.mark.parametrize("T,backend", [(1, "gpu"), (200, "tpu")])
def test_single_token_and_several_chunks(T, backend):
    check_kernels("simple_gla", backend, B=2, T=T, strength=1.0)


@pytest.mark.parametrize("family", [pytest.param("simple_gla", marks=pytest.mark.slow), "gla"])
def test_minus_infinity_gates_reset_exactly(family):
    def resets(args):
        return {**args, "g": args["g"].at[0, 10].set(-jnp.inf).at[0, 33].set(-1e30).at[0, 34].set(-jnp.inf)}
    errors = check_kernels(family, "tpu", B=1, T=50, mutate=resets, chunk_size=16)
    assert all(np.isfinite(e) for e in errors["tpu"].values())


def test_normalized_linear_attention_matches_xla():
    """``normalize=True`` with the pair state ``(S, z)``: the kernels plus a segmented key sum."""
    B, T, H, K, V = 1, 30, 1, 16, 16
    kq, kk, kv, ks, kz = jax.random.split(jax.random.key(3), 5)
    q, k = (jax.nn.elu(jax.random.normal(key, (B, T, H, K))) + 1 for key in (kq, kk))
    v = jax.random.normal(kv, (B, T, H, V))
    h0 = (jax.random.normal(ks, (2, H, K, V)), jnp.abs(jax.random.normal(kz, (2, 1, H, K))))
    cu = jnp.array([0, 20, 30])

    def loss(impl):
        def f(q, k, v, h0):
            o, (S, z) = chunk_linear_attn(q, k, v, initial_state=h0, output_final_state=True, cu_seqlens=cu,
                                          chunk_size=16, implementation=impl)
            return jnp.sum(jnp.sin(o)) + jnp.sum(jnp.cos(S)) + jnp.sum(z * z), (o, S, z)
        return jax.value_and_grad(f, argnums=(0, 1, 2, 3), has_aux=True)(q, k, v, h0)

    (_, ref), ref_grads = loss("xla")
    (_, out), out_grads = loss("pallas")
    for name, a, b in zip(("o", "S", "z"), ref, out):
        assert_close(name, a, b, 1e-5)
    for name, a, b in zip(("dq", "dk", "dv", "dS0", "dz0"), jax.tree.leaves(ref_grads), jax.tree.leaves(out_grads)):
        assert_close(name, a, b, 1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_value_blocks_split_the_state(backend):
    """``block_v`` < V: several programs per head, dq and dk summed over value blocks."""
    B, T, H, K, V = 1, 40, 2, 16, 32
    ks = jax.random.split(jax.random.key(1), 4)
    q, k = jax.random.normal(ks[0], (2, B, T, H, K))
    v = jax.random.normal(ks[1], (B, T, H, V))
    g = jax.nn.log_sigmoid(jax.random.normal(ks[2], (B, T, H, K)))
    h0 = jax.random.normal(ks[3], (B, H, K, V))

    def loss(run):
        def f(q, k, v, g, h0):
            x = prepare(q, k, v, gk=g, initial_state=h0, output_final_state=True)
            o, final = run(x)
            return jnp.sum(jnp.sin(o)) + jnp.sum(jnp.cos(final))
        return jax.grad(f, argnums=(0, 1, 2, 3, 4))(q, k, v, g, h0)

    from lolax.ops.gla.chunk import _intra
    ref = loss(lambda x: chunk_diagonal(x, 16, intra=_intra, intra_args=(16,)))
    out = loss(lambda x: run_kernels(x, "key", 16, 16, backend, interpret=BACKENDS[backend], block_v=16))
    for name, a, b in zip(("dq", "dk", "dv", "dg", "dh0"), ref, out):
        assert_close(name, a, b, 1e-5 if name != "dg" else 3e-5)


def test_models_pass_their_implementation_down():
    """``model.implementation`` reaches the kernel families' ops (linear attention, GLA)."""
    import dataclasses

    from flax import nnx

    from lolax.models import LanguageModel, ModelConfig
    cfg = ModelConfig(vocab_size=64, d_model=64, num_heads=2, num_layers=2, pattern="LG", mlp_hidden=64,
                      chunk_size=16)
    tokens = jax.random.randint(jax.random.key(0), (1, 16), 0, 64)
    with interpret_kernels("gpu"):
        logits = {impl: LanguageModel(dataclasses.replace(cfg, implementation=impl), nnx.Rngs(0))(tokens)
                  for impl in ("xla", "pallas")}
    assert_close("logits", logits["xla"], logits["pallas"], 1e-5)
    small = dataclasses.replace(cfg, d_model=32, pattern="G", num_layers=1, implementation="pallas")
    with pytest.raises(ValueError, match="implementation='pallas' does not support"):
        LanguageModel(small, nnx.Rngs(0))(tokens)


def test_dispatch_choices_and_errors():
    q, k, v = jax.random.normal(jax.random.key(0), (3, 1, 20, 2, 12))
    g = jax.nn.log_sigmoid(q)
    ref, _ = chunk_gla(q, k, v, g, implementation="xla")
    out, _ = chunk_gla(q, k, v, g)                          # None: K = 12 has no kernel, XLA runs
    np.testing.assert_array_equal(ref, out)
    with pytest.raises(ValueError, match="implementation='pallas' does not support q/k with key dimension K = 12"):
        chunk_gla(q, k, v, g, implementation="pallas")
    with pytest.raises(ValueError, match="implementation must be None, 'xla' or 'pallas', got 'triton'"):
        chunk_simple_gla(q, k, v, implementation="triton")
    with pytest.raises(ValueError, match="schedule must be one of"):
        with kernel_tuning("gpu", schedule="serial"):
            pass
    with pytest.raises(ValueError, match="sub_chunk_size = 4"):
        chunk_gla(*(x[..., :8].repeat(2, -1) for x in (q, k, v, g)), sub_chunk_size=4, implementation="pallas")
    q16, k16, v16 = (x[..., :8].repeat(2, -1) for x in (q, k, v))
    with pytest.raises(ValueError, match="chunk_size = 256"):
        chunk_linear_attn(q16, k16, v16, chunk_size=256, implementation="pallas")
    with pytest.raises(ValueError, match="inputs of dtype float16"):
        chunk_simple_gla(*(x.astype(jnp.float16) for x in (q16, k16, v16)), implementation="pallas")
    with pytest.raises(ValueError, match="block_v must be one of"):
        with kernel_tuning("gpu", block_v=48):
            pass
    with pytest.raises(ValueError, match="split_bf16 must be a bool"):
        with kernel_tuning("tpu", split_bf16=1):
            pass
    with pytest.raises(ValueError, match="platform must be one of"):
        with kernel_tuning("cuda", block_v=32):
            pass
    with pytest.raises(ValueError, match="backend must be 'tpu' or 'gpu'"):
        with interpret_kernels("cuda"):
            pass


def test_cpu_default_runs_xla():
    """On CPU, ``implementation=None`` lowers the XLA branch (no kernel in the compiled program)."""
    q, k, v = jax.random.normal(jax.random.key(0), (3, 1, 20, 2, 16))
    hlo = jax.jit(lambda q: chunk_retention(q, k, v)[0]).lower(q).as_text()
    assert "tpu_custom_call" not in hlo and "triton" not in hlo
    np.testing.assert_array_equal(chunk_retention(q, k, v)[0], chunk_retention(q, k, v, implementation="xla")[0])


def _export(fn, platform, *shapes):
    disabled = [export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")] if platform == "cuda" else []
    args = [jax.ShapeDtypeStruct(s, d) for s, d in shapes]
    return export.export(jax.jit(fn), platforms=[platform], disabled_checks=disabled)(*args).mlir_module()


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
@pytest.mark.parametrize("family", DIAGONAL)
def test_forward_and_gradient_lower_to_kernels(family, platform):
    """``implementation=None`` exported for TPU / CUDA from this CPU machine carries the kernels:
    the forward one kernel, the gradient the state recomputation and the backward kernel."""
    B, T, H, K, V = 1, 100, 2, 64, 128
    gate = {"linear_attn": None, "simple_gla": (B, T, H), "gla": (B, T, H, K)}[family]
    cu = jnp.array([0, 30, 100], jnp.int32)

    def f(q, k, v, h0, *g):
        o, final = family_op(family, "chunk", cu_seqlens=cu)(q, k, v, *g, initial_state=h0)
        return jnp.sum(o.astype(jnp.float32)) + jnp.sum(final)

    shapes = [((B, T, H, K), jnp.bfloat16), ((B, T, H, K), jnp.bfloat16), ((B, T, H, V), jnp.bfloat16),
              ((2, H, K, V), jnp.float32)] + ([(gate, jnp.float32)] if gate else [])
    marker = {"tpu": "tpu_custom_call", "cuda": "__gpu$xla.gpu.triton"}[platform]
    assert _export(f, platform, *shapes).count(marker) >= 1
    grad = jax.grad(f, argnums=tuple(range(len(shapes))))
    text = _export(grad, platform, *shapes)
    for name in ("fwd", "bwd"):
        assert f"lolax_diag_{MODES[family] or 'none'}_{name}" in text
    assert text.count(marker) >= 2       # without a gate the forward kernel's outputs are unused: removed


@pytest.mark.gpu
@pytest.mark.parametrize("family", DIAGONAL)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_compiled_kernels_on_gpu(family, dtype):
    """On the device: the compiled kernels against the naive oracle and the XLA chunk form."""
    cu = np.concatenate([[0], np.cumsum((1, 0, 15, 63, 200, 64))]).astype(np.int32)
    args, do, dht = family_inputs(family, 0, 1, int(cu[-1]), 4, 64, 128, strength=0.5, num_states=6, dtype=dtype)
    fns = {impl: family_op(family, "chunk", implementation=impl, cu_seqlens=cu) for impl in ("pallas", "xla")}
    assert_forms_match(family_op(family, "naive", cu_seqlens=cu), fns, args, do, dht, TOL[dtype])


@pytest.mark.slow
@pytest.mark.parametrize("T", [1, 15, 63, 200])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("backend", sorted(BACKENDS))
@pytest.mark.parametrize("family", DIAGONAL)
def test_kernels_match_naive_full(family, backend, dtype, T):
    check_kernels(family, backend, B=2, T=T, dtype=dtype, chunk_size=64 if T > 100 else 16)


def test_every_kernel_op_takes_implementation_keyword_only():
    import inspect

    from lolax import ops
    names = [n for n in ops.__all__ if n.startswith("chunk_") and any(f in n for f in
             ("linear_attn", "simple_gla", "retention", "lightning", "gla", "delta_rule"))]
    assert len(names) == 7
    for name in names:
        param = inspect.signature(getattr(ops, name)).parameters["implementation"]
        assert param.kind is inspect.Parameter.KEYWORD_ONLY and param.default is None, name


def test_lasp2_runs_the_kernels_on_every_shard():
    """Sequence parallelism (LASP-2 over 4 simulated devices) with the TPU kernels interpreted on
    each device's share equals the unsharded op, forward and gradient."""
    from lolax.parallelism.lasp2 import lasp2
    auto = (jax.sharding.AxisType.Auto,) * 2
    mesh = jax.make_mesh((1, 4), ("data", "sequence"), axis_types=auto, devices=jax.devices()[:4])
    B, T, H, K = 1, 64, 2, 16
    q, k, v = jax.random.normal(jax.random.key(0), (3, B, T, H, K))
    g = jax.nn.log_sigmoid(jax.random.normal(jax.random.key(1), (B, T, H, K)))

    def loss(f):
        return jax.jit(jax.value_and_grad(lambda *a: jnp.sum(jnp.sin(f(*a)[0])) + jnp.sum(f(*a)[1]),
                                          argnums=(0, 1, 2, 3)))

    ref = loss(lambda q, k, v, g: chunk_gla(q, k, v, g, output_final_state=True))(q, k, v, g)
    with interpret_kernels("tpu"):
        out = loss(lambda q, k, v, g: lasp2("gla", q, k, v, mesh=mesh, g=g, output_final_state=True, chunk_size=16,
                                            implementation="pallas"))(q, k, v, g)
    for name, a, b in zip(("loss", "dq", "dk", "dv", "dg"), jax.tree.leaves(ref), jax.tree.leaves(out)):
        assert_close(name, a, b, 1e-5 if name != "dg" else 3e-5)


@pytest.mark.parametrize("backend,K,V", [
    ("gpu", 128, 256), *(pytest.param(b, K, V, marks=pytest.mark.slow) for b, K, V in [
        ("gpu", 64, 128), ("gpu", 256, 64), ("tpu", 64, 128), ("tpu", 256, 64), ("tpu", 128, 256)])])
def test_production_head_sizes_match_naive(backend, K, V):
    """Head sizes of real models (value blocks of 64 on GPU and 128 on TPU split V)."""
    check_kernels("gla", backend, B=1, T=70, K=K, V=V, strength=1.0)
