"""LASP-2 (parallelism.lasp2) equals the unsharded chunk ops: outputs, final states, gradients.

Meshes (8,) ``sequence``, (2, 4) and (4, 2) ``(data, sequence)`` with the batch split over
``data``: a code path that confused the two axes gives wrong numbers on one of the 2-D meshes.
The default suite runs each family on one mesh; ``-m slow`` runs the full matrix.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from lolax.ops import get_op as _op
from lolax.parallelism import hlo
from lolax.parallelism.lasp2 import FAMILIES, lasp2

AUTO = jax.sharding.AxisType.Auto
MESHES = {
    "8": ((8,), ("sequence",)),
    "2x4": ((2, 4), ("data", "sequence")),
    "4x2": ((4, 2), ("data", "sequence")),
}
H, K, V, C = 2, 4, 4, 4


def _mesh(name):
    shape, names = MESHES[name]
    return jax.make_mesh(shape, names, axis_types=(AUTO,) * len(shape))


def _inputs(family, B, T, seed=0, N=None):
    ks = jax.random.split(jax.random.key(seed), 8)
    q = jax.random.normal(ks[0], (B, T, H, K))
    k = jax.random.normal(ks[1], (B, T, H, K)) * 0.5
    v = jax.random.normal(ks[2], (B, T, H, V))
    g = jax.nn.log_sigmoid(jax.random.normal(ks[3], (B, T, H)) + 1.0)
    kw = {
        "linear_attn": {"normalize": False},
        "simple_gla": {"g": g},
        "gla": {"g": jax.nn.log_sigmoid(jax.random.normal(ks[4], (B, T, H, K)) + 1.0)},
        "delta_rule": {"beta": jax.nn.sigmoid(jax.random.normal(ks[5], (B, T, H))),
                       "use_qk_l2norm_in_kernel": True},
        "gated_delta_rule": {"g": g, "beta": jax.nn.sigmoid(jax.random.normal(ks[5], (B, T, H))),
                             "use_qk_l2norm_in_kernel": True, "allow_neg_eigval": True},
    }[family]
    h0 = jax.random.normal(ks[6], (N or B, H, K, V))
    return q, k, v, h0, kw


def _close(a, b, tol=2e-5):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    scale = max(1.0, float(np.max(np.abs(b))))
    np.testing.assert_allclose(a, b, rtol=0, atol=tol * scale)


def _check(family, mesh, B, T, cu=None, N=None, grads=True, final=True):
    q, k, v, h0, kw = _inputs(family, B, T, N=N)
    kw = dict(kw, chunk_size=C, cu_seqlens=cu, output_final_state=final)
    diff = {n: x for n, x in kw.items() if n in ("g", "beta")}
    static = {n: x for n, x in kw.items() if n not in diff}

    def ref(q, k, v, h0, diff):
        return _op(family)(q, k, v, initial_state=h0, **diff, **static)

    def sharded(q, k, v, h0, diff):
        return lasp2(family, q, k, v, mesh=mesh, initial_state=h0, **diff, **static)

    ro, rs = ref(q, k, v, h0, diff)
    so, ss = jax.jit(sharded)(q, k, v, h0, diff)
    _close(so, ro)
    if final:
        _close(ss, rs)
    else:
        assert ss is None
    if not grads:
        return
    w = jax.random.normal(jax.random.key(7), ro.shape)
    ws = None if rs is None else jax.random.normal(jax.random.key(8), rs.shape)

    def loss(fn):
        def f(*args):
            o, s = fn(*args)
            out = jnp.sum(o * w)
            return out + (jnp.sum(s * ws) if s is not None else 0.0)
        return f

    gr = jax.grad(loss(ref), argnums=(0, 1, 2, 3, 4))(q, k, v, h0, diff)
    gs = jax.jit(jax.grad(loss(sharded), argnums=(0, 1, 2, 3, 4)))(q, k, v, h0, diff)
    for a, b in zip(jax.tree.leaves(gs), jax.tree.leaves(gr)):
        _close(a, b, 5e-5)


# family -> mesh of the default (fast) run; the slow run covers every pair
DEFAULT = {"linear_attn": "8", "simple_gla": "2x4", "gla": "4x2", "delta_rule": "2x4",
           "gated_delta_rule": "4x2"}
CASES = [pytest.param(f, m, marks=() if DEFAULT[f] == m else pytest.mark.slow, id=f"{f}-{m}")
         for f in FAMILIES for m in MESHES]


GRADS_DEFAULT = ("simple_gla", "gated_delta_rule")   # one diagonal-decay, one delta-rule family


@pytest.mark.parametrize("family, mesh_name", CASES)
def test_lasp2_equals_unsharded(family, mesh_name, request):
    """Batch 4 (split over data), T = 40 over W ranks: local lengths 5..20, not chunk multiples.

    Gradients (q, k, v, gates, initial state) in the default run for two families, for all in -m slow."""
    mesh = _mesh(mesh_name)
    slow = "slow" in request.node.keywords
    _check(family, mesh, B=4, T=40, grads=slow or family in GRADS_DEFAULT)


PACKED_DEFAULT = {"simple_gla": "2x4", "gated_delta_rule": "4x2"}
PACKED = [pytest.param(f, m, marks=() if PACKED_DEFAULT.get(f) == m else pytest.mark.slow, id=f"{f}-{m}")
          for f in FAMILIES for m in ("8", "2x4", "4x2")]


@pytest.mark.parametrize("family, mesh_name", PACKED)
def test_lasp2_packed_sequences(family, mesh_name, request):
    """Packed batch: sequences straddling ranks, covering whole ranks, starting exactly at a rank
    edge, and an empty one; initial and final states per sequence (gradients in -m slow)."""
    mesh = _mesh(mesh_name)
    cu = jnp.array([0, 3, 8, 8, 19, 29, 40], jnp.int32)
    _check(family, mesh, B=1, T=40, cu=cu, N=6, grads="slow" in request.node.keywords)


@pytest.mark.slow
def test_lasp2_packed_without_final_state():
    _check("delta_rule", _mesh("2x4"), B=1, T=40, cu=jnp.array([0, 13, 40], jnp.int32), N=2,
           grads=False, final=False)


@pytest.mark.parametrize("family", ["linear_attn", pytest.param("gla", marks=pytest.mark.slow)])
def test_lasp2_no_initial_state_no_final(family):
    mesh = _mesh("2x4")
    q, k, v, _, kw = _inputs(family, 2, 32)
    ro, _ = _op(family)(q, k, v, chunk_size=C, **kw)
    so, ss = jax.jit(lambda q, k, v: lasp2(family, q, k, v, mesh=mesh, chunk_size=C, **kw))(q, k, v)
    assert ss is None
    _close(so, ro)


@pytest.mark.slow
def test_lasp2_normalized_linear_attention_and_g_gamma():
    mesh = _mesh("8")
    q, k, v, h0, _ = _inputs("linear_attn", 2, 32)
    q, k = jax.nn.elu(q) + 1, jax.nn.elu(k) + 1
    z0 = jnp.abs(jax.random.normal(jax.random.key(3), (2, 1, H, K)))
    kw = dict(normalize=True, initial_state=(jnp.abs(h0), z0), output_final_state=True, chunk_size=C)
    ro, (rS, rz) = _op("linear_attn")(q, k, v, **kw)
    so, (sS, sz) = jax.jit(lambda q, k, v: lasp2("linear_attn", q, k, v, mesh=mesh, **kw))(q, k, v)
    _close(so, ro)
    _close(sS, rS)
    _close(sz, rz)
    gamma = jnp.log(1 - 2.0 ** (-5 - jnp.arange(H, dtype=jnp.float32)))
    ro, rs = _op("simple_gla")(q, k, v, g_gamma=gamma, output_final_state=True, chunk_size=C)
    so, ss = jax.jit(lambda q, k, v: lasp2("simple_gla", q, k, v, g_gamma=gamma, mesh=mesh,
                                           output_final_state=True, chunk_size=C))(q, k, v)
    _close(so, ro)
    _close(ss, rs)


def test_lasp2_heads_sharded_over_tensor():
    """Mesh (sequence=2, tensor=4): heads split over tensor inside the shard_map."""
    mesh = jax.make_mesh((2, 4), ("sequence", "tensor"), axis_types=(AUTO, AUTO))
    B, T, Hh = 2, 16, 4
    ks = jax.random.split(jax.random.key(1), 4)
    q, k, v = (jax.random.normal(x, (B, T, Hh, K)) for x in ks[:3])
    g = jax.nn.log_sigmoid(jax.random.normal(ks[3], (B, T, Hh)))
    ro, rs = _op("simple_gla")(q, k, v, g=g, output_final_state=True, chunk_size=C)
    so, ss = jax.jit(lambda *a: lasp2("simple_gla", *a[:3], g=a[3], mesh=mesh, output_final_state=True,
                                      chunk_size=C))(q, k, v, g)
    _close(so, ro)
    _close(ss, rs)


@pytest.mark.parametrize("T", [36, 10])
def test_lasp2_rejects_uneven_shards(T):
    mesh = _mesh("8")
    q, k, v, _, kw = _inputs("simple_gla", 1, T)
    with pytest.raises(ValueError, match=rf"T = {T} is not divisible by the 8 devices of mesh axis 'sequence'"):
        lasp2("simple_gla", q, k, v, mesh=mesh, **kw)


def test_lasp2_rejects_bad_arguments():
    mesh = _mesh("8")
    q, k, v, _, kw = _inputs("simple_gla", 2, 16)
    with pytest.raises(ValueError, match="unknown linear family"):
        lasp2("mamba", q, k, v, mesh=mesh)
    with pytest.raises(ValueError, match="not a mesh axis"):
        lasp2("simple_gla", q, k, v, mesh=mesh, axis_name="seq", **kw)
    with pytest.raises(ValueError, match="B == 1"):
        lasp2("simple_gla", q, k, v, mesh=mesh, cu_seqlens=jnp.array([0, 16]), **kw)


@pytest.mark.parametrize("family", ["simple_gla", "delta_rule"])
def test_lasp2_forward_hlo_has_one_all_gather_independent_of_T(family):
    """Compiled forward: exactly one all-gather (no other collective) whose size is the same at
    T = 64 and T = 256; the backward adds only its transpose (a reduce-scatter)."""
    mesh = _mesh("2x4")
    sizes = []
    for T in (64, 256):
        q, k, v, _, kw = _inputs(family, 2, T)
        sh = NamedSharding(mesh, P("data", "sequence"))
        args = jax.device_put((q, k, v), sh)
        gates = jax.device_put({n: x for n, x in kw.items() if n in ("g", "beta")}, sh)
        static = {n: x for n, x in kw.items() if n not in gates}
        f = jax.jit(lambda q, k, v, gates: lasp2(family, q, k, v, mesh=mesh, chunk_size=16, **gates,
                                                 **static)[0])
        ops = hlo.collectives(hlo.compiled_text(f, *args, gates))
        assert [op.kind for op in ops] == ["all-gather"], [op.line[:120] for op in ops]
        sizes.append(ops[0].bytes)
        if T == 64:
            grad = jax.jit(jax.grad(lambda q, k, v, gates: jnp.sum(f(q, k, v, gates) ** 2), argnums=(0, 1, 2)))
            kinds = sorted(op.kind for op in hlo.collectives(hlo.compiled_text(grad, *args, gates)))
            assert kinds == ["all-gather", "reduce-scatter"], kinds
    assert sizes[0] == sizes[1]
    per_seq = H * K * (V + (K if family == "delta_rule" else 0)) + (0 if family == "delta_rule" else H)
    assert sizes[0] == 4 * (2 // 2) * per_seq * 4       # W=4 ranks x local batch 1 x payload x f32
