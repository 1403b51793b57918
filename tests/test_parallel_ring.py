"""Sequence-parallel softmax attention (ring / Ulysses / all-gather KV) equals unsharded attention.

Reference: ``jax.nn.dot_product_attention`` (GQA by head grouping, ``local_window_size`` for the
sliding window) on the whole sequence.  Meshes (8,), (2, 4), (4, 2) ``(data, sequence)``.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from lolax.parallelism import hlo
from lolax.parallelism.ring import MODES, sequence_parallel_attention

AUTO = jax.sharding.AxisType.Auto
MESHES = {"8": ((8,), ("sequence",)), "2x4": ((2, 4), ("data", "sequence")),
          "4x2": ((4, 2), ("data", "sequence"))}
B, T, H, HKV, D = 4, 32, 8, 2, 8


def _mesh(name):
    shape, names = MESHES[name]
    return jax.make_mesh(shape, names, axis_types=(AUTO,) * len(shape))


def _qkv(seed=0):
    ks = jax.random.split(jax.random.key(seed), 3)
    return (jax.random.normal(ks[0], (B, T, H, D)), jax.random.normal(ks[1], (B, T, HKV, D)),
            jax.random.normal(ks[2], (B, T, HKV, D)))


def _reference(q, k, v, window=None, causal=True):
    return jax.nn.dot_product_attention(q, k, v, is_causal=causal,
                                        local_window_size=None if window is None else (window - 1, 0))


DEFAULT = {("ring", "2x4", 5), ("allgather", "4x2", None), ("ulysses", "8", 11)}
CASES = [pytest.param(m, me, w, marks=() if (m, me, w) in DEFAULT else pytest.mark.slow,
                      id=f"{m}-{me}-w{w}")
         for m in MODES for me in MESHES for w in (None, 5, 11)]


@pytest.mark.parametrize("mode, mesh_name, window", CASES)
def test_sequence_parallel_attention_equals_unsharded(mode, mesh_name, window):
    """GQA (8 query heads, 2 kv heads), outputs and gradients of q, k, v."""
    mesh = _mesh(mesh_name)
    q, k, v = _qkv()
    w = jax.random.normal(jax.random.key(9), (B, T, H, D))
    ref = lambda q, k, v: _reference(q, k, v, window)
    sp = lambda q, k, v: sequence_parallel_attention(q, k, v, mesh=mesh, mode=mode, window=window)
    np.testing.assert_allclose(jax.jit(sp)(q, k, v), ref(q, k, v), atol=2e-6)
    loss = lambda f: lambda q, k, v: jnp.sum(f(q, k, v) * w)
    gr = jax.grad(loss(ref), argnums=(0, 1, 2))(q, k, v)
    gs = jax.jit(jax.grad(loss(sp), argnums=(0, 1, 2)))(q, k, v)
    for a, b in zip(gs, gr):
        np.testing.assert_allclose(a, b, atol=2e-5)


def test_query_tiling(monkeypatch):
    """Long query blocks are split into tiles of _Q_BLOCK queries (score memory O(tile · Tk))."""
    import lolax.parallelism.ring as ring

    monkeypatch.setattr(ring, "_Q_BLOCK", 2)
    mesh = _mesh("2x4")
    q, k, v = _qkv(2)
    sp = lambda q, k, v: ring.sequence_parallel_attention(q, k, v, mesh=mesh, mode="ring", window=6)
    np.testing.assert_allclose(jax.jit(sp)(q, k, v), _reference(q, k, v, 6), atol=2e-6)
    gs = jax.jit(jax.grad(lambda *a: jnp.sum(jnp.sin(sp(*a))), argnums=(0, 1, 2)))(q, k, v)
    gr = jax.grad(lambda *a: jnp.sum(jnp.sin(_reference(*a, 6))), argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(gs, gr):
        np.testing.assert_allclose(a, b, atol=2e-5)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ring", "allgather"])
def test_bidirectional(mode):
    mesh = _mesh("2x4")
    q, k, v = _qkv(1)
    o = jax.jit(lambda q, k, v: sequence_parallel_attention(q, k, v, mesh=mesh, mode=mode, causal=False))(q, k, v)
    np.testing.assert_allclose(o, _reference(q, k, v, causal=False), atol=2e-6)


@pytest.mark.parametrize("window, hops", [(None, 7), (6, 2), (5, 1)])
def test_ring_hlo_rotates_only_needed_blocks(window, hops):
    """Ring: 2 collective-permutes (k, v) per hop; W − 1 = 7 hops, or ceil((w − 1) / (T/W)) with
    a window (a halo exchange); no other collective."""
    mesh = _mesh("8")
    x = jax.ShapeDtypeStruct((1, T, H, D), jnp.float32, sharding=NamedSharding(mesh, P(None, "sequence")))
    kv = jax.ShapeDtypeStruct((1, T, HKV, D), jnp.float32, sharding=NamedSharding(mesh, P(None, "sequence")))
    f = jax.jit(lambda q, k, v: sequence_parallel_attention(q, k, v, mesh=mesh, mode="ring", window=window))
    s = hlo.summary(hlo.collectives(hlo.compiled_text(f, x, kv, kv)))
    assert set(s) == {"collective-permute"}
    assert s["collective-permute"]["count"] == 2 * hops
    assert s["collective-permute"]["bytes"] == 2 * hops * (T // 8) * HKV * D * 4


def test_errors():
    mesh = _mesh("8")
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="mode must be one of"):
        sequence_parallel_attention(q, k, v, mesh=mesh, mode="tree")
    with pytest.raises(ValueError, match="T = 30 is not divisible by the 8 devices"):
        sequence_parallel_attention(q[:, :30], k[:, :30], v[:, :30], mesh=mesh)
    with pytest.raises(ValueError, match="H must be divisible by 8"):
        sequence_parallel_attention(q[:, :, :4], k, v, mesh=mesh, mode="ulysses")
    with pytest.raises(ValueError, match="window must be a positive int"):
        sequence_parallel_attention(q, k, v, mesh=mesh, window=0)


def test_hlo_parser_tuple_all_to_all_and_iota_groups():
    text = ("  %a2a = (f32[1,8,1,16]{3,2,1,0}, f32[1,8,1,16]{3,2,1,0}, /*index=5*/f32[1,8,1,16]{3,2,1,0}) "
            "all-to-all(%a, %b, %c), channel_id=3, replica_groups={{0,1,2,3,4,5,6,7}}, dimensions={2}\n"
            "  %ag = f32[4,130]{1,0} all-gather(%x), channel_id=1, replica_groups=[2,4]<=[8], dimensions={0}\n")
    ops = hlo.collectives(text)
    assert [(o.kind, o.bytes, o.group_size) for o in ops] == [("all-to-all", 1536, 8), ("all-gather", 2080, 4)]
    assert ops[1].traffic == 2080 * 3 / 4
