"""Meshes and logical-axis rules: sharded training equals the single-device run (8 CPU devices)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from experiments.train_state import cross_entropy, init_state, make_train_step
from lolax.models import ModelConfig
from lolax.parallelism import mesh as pmesh
from lolax.parallelism import rules

CFG = ModelConfig(vocab_size=256, d_model=32, num_layers=2, pattern="LS", num_heads=4, chunk_size=8)
B, T = 8, 16


# ------------------------------------------------------------------ mesh


def test_make_mesh_fill_and_axis_types():
    m = pmesh.make_mesh({"tensor": 2})
    assert m.axis_names == pmesh.AXES
    assert dict(m.shape) == {"data": 4, "fsdp": 1, "sequence": 1, "tensor": 2}
    assert all(t == jax.sharding.AxisType.Auto for t in m.axis_types)
    m = pmesh.make_mesh(pmesh.MeshConfig(data=1, fsdp=-1, sequence=2),
                        axis_type=jax.sharding.AxisType.Explicit)
    assert dict(m.shape) == {"data": 1, "fsdp": 4, "sequence": 2, "tensor": 1}
    assert all(t == jax.sharding.AxisType.Explicit for t in m.axis_types)
    assert pmesh.make_mesh({"data": 2}).size == 2          # first devices only


@pytest.mark.parametrize("cfg, msg", [
    ({"tensor": 3}, r"mesh.data = -1 cannot fill 8 devices.*tensor=3"),
    ({"data": 4, "sequence": 4}, r"needs 16 devices but only 8"),
    ({"data": -1, "fsdp": -1}, r"only one mesh axis may be -1"),
    ({"fsdp": 0}, r"mesh.fsdp = 0 must be a positive int or -1.*8 devices"),
    ({"pipeline": 2}, r"unknown mesh axis name"),
])
def test_make_mesh_errors_name_axis_and_devices(cfg, msg):
    with pytest.raises(ValueError, match=msg):
        pmesh.make_mesh(cfg)


def test_initialize_distributed_single_host_is_noop(monkeypatch):
    called = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: called.append(kw))
    for k in pmesh._DISTRIBUTED_ENV:
        monkeypatch.delenv(k, raising=False)
    assert pmesh.initialize_distributed() is False
    assert pmesh.initialize_distributed(num_processes=1) is False
    assert not called
    assert pmesh.initialize_distributed("10.0.0.1:1234", num_processes=2, process_id=0) is True
    assert called[0]["coordinator_address"] == "10.0.0.1:1234"


# ------------------------------------------------------------------ rules


def test_rule_table_specs():
    m = pmesh.make_mesh({"data": 1, "fsdp": 2, "tensor": 4})
    assert rules.mesh_spec(m, (32, 64), ("embed", "heads")) == P("fsdp", "tensor")
    assert rules.mesh_spec(m, (256, 32), ("vocab", "embed")) == P("tensor", "fsdp")
    assert rules.mesh_spec(m, (8,), ("kv",)) == P()
    assert rules.mesh_spec(m, (31, 64), ("embed", "mlp")) == P(None, "tensor")   # 31 % 2: replicate
    assert rules.mesh_spec(m, (31, 6), ("embed", "mlp")) == P()                   # not divisible: replicate
    m2 = pmesh.make_mesh({"data": 2, "fsdp": 4})
    assert rules.batch_spec(m2) == P(("data", "fsdp"))
    assert rules.mesh_spec(m2, (8, 16), ("batch", "sequence")) == P(("data", "fsdp"))
    assert rules.mesh_spec(m2, (2, 16), ("batch", "sequence")) == P("data")       # 2 % 8: drop fsdp


def _batch(seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, 256, size=(B, T + 1)).astype(np.int32)
    return {"inputs": jnp.asarray(tokens[:, :-1]), "targets": jnp.asarray(tokens[:, 1:])}


def _loss_and_grads(graphdef, params, batch):
    from flax import nnx

    def loss_fn(p):
        return cross_entropy(nnx.merge(graphdef, p)(batch["inputs"]), batch["targets"])

    return jax.value_and_grad(loss_fn)(params)


def _grad_step(graphdef, tx):
    """A train step that also returns the gradients (one compilation checks loss, grads, update)."""

    def step(state, batch):
        loss, grads = _loss_and_grads(graphdef, state.params, batch)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        return state._replace(params=params, opt_state=opt_state, step=state.step + 1), (loss, grads)

    return step


@pytest.fixture(scope="module")
def reference():
    tx = optax.adamw(1e-2, eps=1e-4)   # eps keeps the first update a smooth function of grads
    graphdef, state = init_state(CFG, tx, 0)
    batch = _batch()
    new_state, (loss, grads) = jax.jit(_grad_step(graphdef, tx))(state, batch)
    return tx, state, batch, loss, grads, new_state


MESHES = {
    "data": pytest.param({"data": 8}, marks=pytest.mark.slow),   # data parallel: see shard_step test
    "fsdp": {"data": 1, "fsdp": 8},
    "tensor": pytest.param({"data": 1, "tensor": 8}, marks=pytest.mark.slow),   # also in fsdp2_tensor4
    "fsdp2_tensor4": {"data": 1, "fsdp": 2, "tensor": 4},
    "fsdp4_tensor2": pytest.param({"data": 1, "fsdp": 4, "tensor": 2}, marks=pytest.mark.slow),
    "data2_fsdp2_tensor2": pytest.param({"data": 2, "fsdp": 2, "tensor": 2}, marks=pytest.mark.slow),
}


@pytest.mark.parametrize("mesh_cfg", list(MESHES.values()), ids=list(MESHES))
def test_sharded_training_equals_single_device(mesh_cfg, reference):
    tx, ref_state, batch, ref_loss, ref_grads, ref_new = reference
    mesh = pmesh.make_mesh(mesh_cfg)
    graphdef, state, shardings = rules.create_sharded(lambda: init_state(CFG, tx, 0), mesh)

    # created sharded, equal to the unsharded init
    q = state.params["layers"][0]["attn"]["q_proj"]["kernel"]
    expect = rules.mesh_spec(mesh, q.shape, ("embed", "heads"))
    assert q.sharding.spec == expect
    if mesh_cfg != {"data": 8}:
        assert q.sharding.spec != P() and not q.sharding.is_fully_replicated
        mu = state.opt_state[0].mu["layers"][0]["attn"]["q_proj"]["kernel"]
        assert mu.sharding.spec == expect                      # optimizer state sharded alike
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(ref_state)):   # eager vs jit init: ulps
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-8)

    bsh = rules.batch_sharding(mesh)
    step = jax.jit(_grad_step(graphdef, tx), in_shardings=(shardings, bsh),
                   out_shardings=(shardings, (NamedSharding(mesh, P()), shardings.params)))
    new_state, (loss, grads) = step(state, jax.device_put(batch, bsh))
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    for g, rg in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
        np.testing.assert_allclose(g, rg, rtol=2e-4, atol=2e-6)
    for a, b in zip(jax.tree.leaves(new_state.params), jax.tree.leaves(ref_new.params)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    new_q = new_state.params["layers"][0]["attn"]["q_proj"]["kernel"]
    assert new_q.sharding.spec == expect                       # out_shardings keep the layout


def test_shard_step_runs_the_training_step(reference):
    """rules.shard_step around experiments.train_state.make_train_step (data x tensor)."""
    tx, ref_state, batch, ref_loss, _, ref_new = reference
    mesh = pmesh.make_mesh({"data": 2, "tensor": 4})
    graphdef, state, shardings = rules.create_sharded(lambda: init_state(CFG, tx, 0), mesh)
    step = rules.shard_step(make_train_step(graphdef, tx, donate=False), mesh, shardings)
    new_state, metrics = step(state, jax.device_put(batch, rules.batch_sharding(mesh)))
    np.testing.assert_allclose(metrics["loss"], ref_loss, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(new_state.params), jax.tree.leaves(ref_new.params)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    assert new_state.params["embed"]["embedding"].sharding.spec == P("tensor")
