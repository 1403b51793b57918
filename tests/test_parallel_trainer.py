"""Sequence parallelism end to end: a hybrid model's loss and gradients under a (data, sequence)
mesh equal the single-device run; the trainer's mesh section; the long-context example config."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from experiments.train_state import cross_entropy, init_state
from lolax.models import ModelConfig
from lolax.parallelism import mesh as pmesh
from lolax.parallelism import rules


def _loss_and_grads(graphdef):
    def f(params, batch):
        return jax.value_and_grad(
            lambda p: cross_entropy(nnx.merge(graphdef, p)(batch["inputs"]), batch["targets"]))(params)
    return f


@pytest.mark.parametrize("pattern, attention", [
    ("ES", "ring"),                                           # gated DeltaNet + softmax (ring)
    pytest.param("LGS", "ulysses", marks=pytest.mark.slow),
    pytest.param("RDS", "allgather", marks=pytest.mark.slow),
])
def test_hybrid_model_sequence_parallel_equals_single_device(pattern, attention):
    cfg = ModelConfig(vocab_size=256, d_model=32, num_layers=len(pattern), pattern=pattern,
                      num_heads=4, chunk_size=8, sequence_attention=attention)
    tx = optax.adamw(1e-2)
    graphdef, state = init_state(cfg, tx, 0)
    tokens = np.random.default_rng(0).integers(0, 256, (4, 65)).astype(np.int32)
    batch = {"inputs": jnp.asarray(tokens[:, :-1]), "targets": jnp.asarray(tokens[:, 1:])}
    ref_loss, ref_grads = jax.jit(_loss_and_grads(graphdef))(state.params, batch)

    mesh = pmesh.make_mesh({"data": 2, "sequence": 4})
    _, sstate, shardings = rules.create_sharded(lambda: init_state(cfg, tx, 0), mesh)
    bsh = rules.batch_sharding(mesh)
    assert bsh.spec == jax.sharding.PartitionSpec("data", "sequence")
    f = jax.jit(_loss_and_grads(graphdef), in_shardings=(shardings.params, bsh))
    sbatch = jax.device_put(batch, bsh)
    with jax.set_mesh(mesh):                      # the layers read the mesh while they are traced
        loss, grads = f(sstate.params, sbatch)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=2e-6)
    # the traced step really is sequence-parallel: LASP-2's all-gather and the ring's permutes;
    # the same function traced without the mesh is not (the mesh is part of jit's trace context)
    with jax.set_mesh(mesh):
        text = f.lower(sstate.params, sbatch).as_text()
    assert "all_gather" in text and ("collective_permute" in text if attention == "ring" else True)
    assert "all_gather" not in f.lower(sstate.params, sbatch).as_text()


def test_trainer_mesh_section_defaults_and_errors():
    from experiments.configs.lm_shakespeare import get_config
    from experiments.trainer import data_mesh

    c = get_config()
    assert (c.mesh.data, c.mesh.fsdp, c.mesh.sequence, c.mesh.tensor) == (-1, 1, 1, 1)
    mesh = data_mesh(c.mesh, 32, 128)
    assert dict(mesh.shape) == {"data": 8, "fsdp": 1, "sequence": 1, "tensor": 1}
    c.mesh.data, c.mesh.sequence = 2, 4
    assert dict(data_mesh(c.mesh, 32, 128).shape)["sequence"] == 4
    with pytest.raises(ValueError, match="seq_len = 130 must be divisible by the sequence axis size 4"):
        data_mesh(c.mesh, 32, 130)
    with pytest.raises(ValueError, match="batch_size = 3 must be divisible by data x fsdp = 2"):
        data_mesh(c.mesh, 3, 128)


def test_long_context_config_is_consistent():
    from experiments.configs.lm_long_context import get_config

    c = get_config()
    assert c.data.seq_len == 32768 and c.mesh.sequence == 8
    assert c.data.seq_len % (c.mesh.sequence * c.model.chunk_size) == 0
    from experiments.trainer import model_config
    cfg = model_config(c.model)
    assert "softmax" in cfg.layer_kinds and len(set(cfg.layer_kinds)) > 1      # a hybrid
