"""Scanned layers and remat: the same model as the unrolled one (outputs, gradients, generation),
a traced program whose size does not grow with depth, sharding rules, checkpoints and errors."""

import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from lolax.models import LanguageModel, ModelConfig, generate
from lolax.ops.testing import rel_rms_error
from lolax.parallelism import mesh as pmesh
from lolax.parallelism import rules

SMALL = dict(d_model=32, num_heads=2, chunk_size=8, window=4, vocab_size=64, mom_num_memories=3, mom_topk=2)
PATTERN = "LS"


def config(num_layers=4, pattern=PATTERN, **kw):
    return ModelConfig(**dict(SMALL, **kw), num_layers=num_layers, pattern=pattern)


def loss_fn(tokens):
    def loss(model):
        logits, aux = model(tokens, return_aux=True)
        return jnp.mean(jax.nn.logsumexp(logits, -1) - logits[..., 0]) + aux
    return loss


def unrolled_view(grads, cfg) -> dict:
    """A scanned model's gradient ``stack/blocks/i/...[r]`` -> the unrolled path ``layers/(r P + i)/...``."""
    out, p = {}, cfg.pattern_length
    for path, value in nnx.to_flat_state(grads):
        assert path[:2] == ("stack", "blocks") or path[0] != "stack", path
        if path[0] != "stack":
            out[path] = value[...]
            continue
        for r in range(value[...].shape[0]):
            out[("layers", r * p + path[2]) + path[3:]] = value[...][r]
    return out


@pytest.fixture(scope="module")
def unrolled():
    tokens = jax.random.randint(jax.random.key(0), (2, 21), 0, 64)
    model = LanguageModel(config(), nnx.Rngs(0))
    loss, grads = jax.jit(nnx.value_and_grad(loss_fn(tokens)))(model)
    return tokens, model, loss, {path: v[...] for path, v in nnx.to_flat_state(grads)}


@pytest.mark.parametrize("remat", ["none", pytest.param("dots", marks=pytest.mark.slow), "full"])
def test_scanned_model_equals_unrolled_model(unrolled, remat):
    tokens, model, loss, grads = unrolled
    cfg = config(scan_layers=True, remat=remat)
    scanned = LanguageModel(cfg, nnx.Rngs(0))           # same seed, same parameters, stacked
    assert scanned.stack.blocks[0].attn.q_proj.kernel.shape == (2, 32, 32)   # [repeats, in, out]
    np.testing.assert_allclose(scanned(tokens), model(tokens), rtol=1e-5, atol=1e-5)
    s_loss, s_grads = jax.jit(nnx.value_and_grad(loss_fn(tokens)))(scanned)
    np.testing.assert_allclose(s_loss, loss, rtol=1e-6)
    s_grads = unrolled_view(s_grads, cfg)
    assert s_grads.keys() == grads.keys()
    for path, g in grads.items():
        assert rel_rms_error(g, s_grads[path]) < 1e-4, path


@pytest.mark.slow
def test_scanned_mom_carries_its_auxiliary_loss():
    tokens = jax.random.randint(jax.random.key(0), (2, 21), 0, 64)
    ref_loss, ref = nnx.value_and_grad(loss_fn(tokens))(LanguageModel(config(pattern="MS"), nnx.Rngs(0)))
    cfg = config(pattern="MS", scan_layers=True, remat="full")
    loss, grads = nnx.value_and_grad(loss_fn(tokens))(LanguageModel(cfg, nnx.Rngs(0)))
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
    grads = unrolled_view(grads, cfg)
    for path, g in nnx.to_flat_state(ref):
        assert rel_rms_error(g[...], grads[path]) < 1e-4, path


def test_remat_of_unrolled_layers_keeps_the_gradient(unrolled):
    tokens, _, loss, grads = unrolled
    model = LanguageModel(config(remat="full"), nnx.Rngs(0))
    r_loss, r_grads = jax.jit(nnx.value_and_grad(loss_fn(tokens)))(model)
    np.testing.assert_allclose(r_loss, loss, rtol=1e-6)
    for path, g in nnx.to_flat_state(r_grads):
        assert rel_rms_error(grads[path], g[...]) < 1e-4, path


def _program_size(cfg) -> int:
    model = LanguageModel(cfg, nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    tokens = jnp.zeros((1, 16), jnp.int32)
    step = lambda params: jax.grad(lambda p: jnp.sum(nnx.merge(graphdef, p)(tokens)))(params)
    return len(str(jax.make_jaxpr(step)(params)))


def test_traced_program_does_not_grow_with_depth():
    scanned = [_program_size(config(n, scan_layers=True, remat="dots")) for n in (2, 4, 24)]
    unrolled = [_program_size(config(n, remat="dots")) for n in (2, 4)]
    assert unrolled[1] - unrolled[0] > 0.25 * unrolled[0]   # each repeat adds its layers' equations
    assert scanned[2] - scanned[0] < 0.01 * scanned[0]      # only the stacked shapes' digits change


def test_scanned_generation_equals_unrolled_generation():
    prompt = jax.random.randint(jax.random.key(1), (2, 5), 0, 64)
    a = generate(LanguageModel(config(), nnx.Rngs(0)), prompt, 4, temperature=0.0, return_logits=True)
    b = generate(LanguageModel(config(scan_layers=True), nnx.Rngs(0)), prompt, 4, temperature=0.0,
                 return_logits=True)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_allclose(a[1], b[1], rtol=1e-4, atol=1e-5)


def test_scanned_parameters_shard_by_the_rules():
    from experiments.train_state import init_state, make_train_step
    cfg = config(2, scan_layers=True, d_model=64, num_heads=4)
    tx = optax.adamw(1e-3, eps=1e-4)          # eps keeps the first update a smooth function of the gradient
    mesh = pmesh.make_mesh({"data": 1, "fsdp": 2, "tensor": 4})
    graphdef, state, shardings = rules.create_sharded(lambda: init_state(cfg, tx, 0), mesh)
    q = state.params["stack"]["blocks"][0]["attn"]["q_proj"]["kernel"]
    assert q.shape == (1, 64, 64)
    assert q.sharding.spec == P(None, "fsdp", "tensor")      # the layer axis is replicated
    _, ref = init_state(cfg, tx, 0)
    tokens = jax.random.randint(jax.random.key(3), (2, 17), 0, 64)
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
    ref_state, ref_metrics = make_train_step(graphdef, tx)(ref, batch)
    step = rules.shard_step(make_train_step(graphdef, tx, donate=False), mesh, shardings,
                            rules.batch_sharding(mesh))
    with jax.set_mesh(mesh):
        new, metrics = step(state, jax.device_put(batch, rules.batch_sharding(mesh)))
    np.testing.assert_allclose(metrics["loss"], ref_metrics["loss"], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(new.params), jax.tree.leaves(ref_state.params)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_scanned_state_round_trips_through_the_checkpointer(tmp_path):
    from experiments.checkpoint import Checkpointer, abstract_like
    from experiments.train_state import init_state
    _, state = init_state(config(scan_layers=True), optax.adamw(1e-3), 0)
    checkpointer = Checkpointer(str(tmp_path))
    checkpointer.save(3, state, {"epoch": 0, "index": 5})
    checkpointer.close()
    restored, position = Checkpointer(str(tmp_path)).restore(3, abstract_like(state))
    assert position == {"epoch": 0, "index": 5}
    assert jax.tree.structure(restored) == jax.tree.structure(state)
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.slow
def test_scanned_run_resumes_from_its_checkpoint(tmp_path):
    from experiments.configs.lm_shakespeare import get_config
    from experiments.data import load_corpus
    from experiments.metrics import read_metrics
    from experiments.trainer import train
    text = tmp_path / "plays.txt"
    text.write_bytes(load_corpus().train[:50_000].tobytes())
    c = get_config()
    c.data.path, c.data.seq_len, c.data.batch_size = str(text), 32, 4
    c.model.d_model, c.model.num_layers, c.model.pattern, c.model.num_heads = 32, 4, "ES", 2
    c.model.chunk_size, c.model.scan_layers, c.model.remat = 16, True, "full"
    c.optim.warmup_steps = 2
    c.train.steps, c.train.log_every, c.train.eval_every, c.train.eval_batches = 12, 1, 100, 1
    c.train.checkpoint_every, c.train.sample_tokens = 4, 0
    c.mesh.data = 1
    train(c, str(tmp_path / "run"), show_progress=False)
    first = {r["step"]: r["loss"] for r in read_metrics(str(tmp_path / "run" / "metrics.jsonl"))
             if r["split"] == "train"}
    shutil.rmtree(tmp_path / "run" / "checkpoints" / "12")     # as if killed after step 8's checkpoint
    train(c, str(tmp_path / "run"), show_progress=False)       # restores the stacked state of step 8
    records = read_metrics(str(tmp_path / "run" / "metrics.jsonl"))
    again = {r["step"]: r["loss"] for r in records if r["split"] == "train"}
    assert len([r for r in records if r["split"] == "train"]) == 12 + 4
    for step in range(9, 13):
        np.testing.assert_allclose(again[step], first[step], rtol=1e-6, err_msg=f"step {step}")


def test_scan_errors_name_the_field():
    with pytest.raises(ValueError, match="model.remat"):
        config(remat="some")
    with pytest.raises(ValueError, match="model.scan_layers"):
        ModelConfig(**SMALL, num_layers=2, pattern="NS", scan_layers=True)
    with pytest.raises(ValueError, match="model.scan_layers"):
        ModelConfig(**SMALL, num_layers=2, pattern="ES", scan_layers=1)


def test_training_refuses_low_rank_optimizers_on_stacked_layers(tmp_path):
    from experiments.configs.lm_shakespeare import get_config
    from experiments.trainer import train
    c = get_config()
    c.model.scan_layers, c.optim.name = True, "galore"
    with pytest.raises(ValueError, match="model.scan_layers"):
        train(c, str(tmp_path), show_progress=False)


def test_accelerator_config_traces_one_training_step():
    from experiments.configs.lm_accelerator import get_config
    from experiments.optimizers import make_optimizer
    from experiments.train_state import init_state, make_train_step
    from experiments.trainer import model_config
    c = get_config()
    cfg = model_config(c.model)
    assert (cfg.dtype, cfg.scan_layers, cfg.implementation) == ("bfloat16", True, None)
    tx = make_optimizer(c.optim, c.train.steps)
    graphdef, state = nnx.eval_shape(lambda: init_state(cfg, tx, 0))   # traced only: no 350M arrays
    assert 3.3e8 < sum(x.size for x in jax.tree.leaves(state.params)) < 3.7e8
    tokens = jax.ShapeDtypeStruct((c.data.batch_size, c.data.seq_len), jnp.int32)
    _, metrics = jax.eval_shape(make_train_step(graphdef, tx), state, {"inputs": tokens, "targets": tokens})
    assert metrics["loss"].dtype == jnp.float32 and metrics["loss"].shape == ()
