"""8-bit optimizer states (optim.quantized): the block code, AdamW's step, a short run, accounting."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from experiments.optimizers import make_optimizer
from lolax import optim
from lolax.optim import quantized as qz


def test_code_keeps_small_values_of_a_block_relative_to_its_scale():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(1000,)) * np.logspace(-3, 0, 1000), jnp.float32)   # 3 decades per block
    for code, xs in ((qz.FIRST, x), (qz.SECOND, jnp.abs(x))):
        q = qz.quantize(xs, 256, code)
        assert q.codes.dtype == (jnp.int8 if code[0] else jnp.uint8) and q.scales.shape == (4,)
        back = np.asarray(qz.dequantize(q, xs.shape, 256, code))
        err = np.abs(back - np.asarray(xs))
        scale = np.repeat(np.asarray(q.scales), 256)[:1000]
        assert err.max() <= 0.03 * scale.max()
        # a value a thousandth of its block's scale survives (a linear 8-bit code would store 0)
        small = np.abs(np.asarray(xs)) < 2e-3 * scale
        assert np.all(back[small & (np.abs(np.asarray(xs)) > 1e-3 * scale)] != 0)
    assert np.array_equal(np.asarray(qz.dequantize(qz.quantize(jnp.zeros(7), 4, qz.FIRST), (7,), 4, qz.FIRST)),
                          np.zeros(7))


def test_adamw_8bit_tracks_optax_adamw_and_keeps_small_leaves_exact():
    rng = np.random.default_rng(1)
    params = {"w": jnp.asarray(rng.normal(size=(128, 64)), jnp.float32), "b": jnp.zeros((64,))}
    ref, ours = optax.adamw(1e-2), optim.adamw_8bit(1e-2)
    s_ref, s_ours, p_ref, p_ours = ref.init(params), ours.init(params), params, params
    for i in range(20):
        g = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), jnp.float32), params)
        u_ref, s_ref = ref.update(g, s_ref, p_ref)
        u_ours, s_ours = jax.jit(ours.update)(g, s_ours, p_ours)
        if i == 0:   # first step, by hand: m = (1-b1) g, v = (1-b2) g^2 -> m_hat / sqrt(v_hat) = sign(g)
            lr_wd = -1e-2 * (np.sign(np.asarray(g["w"])) + 1e-4 * np.asarray(params["w"]))
            np.testing.assert_allclose(np.asarray(u_ours["w"]), lr_wd, rtol=0.03, atol=1e-6)
        p_ref, p_ours = optax.apply_updates(p_ref, u_ref), optax.apply_updates(p_ours, u_ours)
        # the 64 bias values keep float32 moments
        np.testing.assert_allclose(np.asarray(u_ours["b"]), np.asarray(u_ref["b"]), rtol=1e-5, atol=1e-9)
        rel = np.linalg.norm(u_ours["w"] - u_ref["w"]) / np.linalg.norm(u_ref["w"])
        assert rel < 0.1, (i, rel)
    assert isinstance(s_ours[0].mu["w"], qz.Quantized) and s_ours[0].mu["b"].dtype == jnp.float32


@pytest.mark.parametrize("name, lr, kw", [("adamw", 3e-3, {}), ("galore", 3e-2, {"rank": 16, "update_proj_gap": 50})])
def test_a_short_language_model_run_tracks_the_float32_run(name, lr, kw):
    from experiments.bench.optim_step import lm_setup

    eight = optim.adamw_8bit(lr) if name == "adamw" else optim.from_config(name, lr, moments_8bit=True, **kw)
    losses = {}
    for name, tx in (("float32", optim.from_config(name, lr, **kw)), ("8bit", eight)):
        params, loss_fn, batches, _, _ = lm_setup(seq=32, batch=8, d_model=64, layers=2)
        state = tx.init(params)

        @jax.jit
        def step(params, state, toks, tx=tx, loss_fn=loss_fn):
            loss, grads = jax.value_and_grad(loss_fn)(params, toks)
            updates, state = tx.update(grads, state, params)
            return optax.apply_updates(params, updates), state, loss

        curve = []
        for toks in batches(150):
            params, state, loss = step(params, state, toks)
            curve.append(float(loss))
        losses[name] = np.asarray(curve)
    late = slice(100, 150)
    assert losses["float32"][late].mean() < losses["float32"][:10].mean() - 1.0     # it learned
    assert abs(losses["8bit"][late].mean() - losses["float32"][late].mean()) < 0.05


def test_state_is_a_quarter_and_the_trainer_builds_it():
    params = {"w": jnp.zeros((512, 512))}
    ratio = (optim.state_bytes(optim.adamw_8bit(1e-3), params)["total"]["bytes"]
             / optim.state_bytes(optim.adamw(1e-3), params)["total"]["bytes"])
    assert 0.25 < ratio < 0.26          # 2 bytes + 8 bytes of scales per 256 values, against 8
    cfg = ml_collections.ConfigDict({"name": "adamw_8bit", "learning_rate": 1e-3, "warmup_steps": 2,
                                     "min_lr_ratio": 0.1, "weight_decay": 0.1, "b1": 0.9, "b2": 0.95,
                                     "grad_clip": 1.0, "rank": -1, "update_proj_gap": -1, "scale": -1.0})
    tx = make_optimizer(cfg, 10)
    assert isinstance(tx.init(params)[1][0], qz.ScaleByAdam8bitState)


@pytest.mark.parametrize("kwargs, message", [({"block_size": 0}, "block_size"), ({"min_size": -1}, "min_size")])
def test_bad_settings_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        optim.adamw_8bit(1e-3, **kwargs)


LOW_RANK = [("galore", {"rank": 8}), ("fira", {"rank": 8}), ("apollo", {"rank": 8}),
            ("frugal", {"rank": 8}), ("natural_galore", {"rank": 8, "history_size": 3, "damping": 1.0})]


def _low_rank_params(rng):
    # leaves of at least 4096 values get 8-bit moments: the (128, 64) embedding's Adam moments and
    # the (512, 8) rank-8 moments of the (512, 96) projected kernel
    return {"attn": {"q_proj": {"kernel": jnp.asarray(rng.normal(size=(512, 96)), jnp.float32)}},
            "embed": {"embedding": jnp.asarray(rng.normal(size=(128, 64)), jnp.float32)}}


@pytest.mark.parametrize("name, kw", LOW_RANK)
def test_low_rank_methods_with_8bit_moments_track_their_float32_steps(name, kw):
    rng = np.random.default_rng(2)
    params = _low_rank_params(rng)
    ref, ours = (optim.from_config(name, 1e-2, update_proj_gap=4, moments_8bit=b, **kw) for b in (False, True))
    s_ref, s_ours = ref.init(params), ours.init(params)
    for i in range(10):           # crosses two refreshes
        g = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), jnp.float32), params)
        u_ref, s_ref = jax.jit(ref.update)(g, s_ref, params)
        u_ours, s_ours = jax.jit(ours.update)(g, s_ours, params)
        for path in (("attn", "q_proj", "kernel"), ("embed", "embedding")):
            a, b = u_ours, u_ref
            for k in path:
                a, b = a[k], b[k]
            rel = float(np.linalg.norm(a - b) / np.linalg.norm(b))
            assert rel < 0.1, (i, path, rel)
    inner = s_ours[0].inner_states
    assert isinstance(inner["lowrank"].inner_state.mu["attn"]["q_proj"]["kernel"], qz.Quantized)
    assert isinstance(inner["adam"].inner_state.nu["embed"]["embedding"], qz.Quantized)
    ratio = optim.state_bytes(ours, params)["total"]["bytes"] / optim.state_bytes(ref, params)["total"]["bytes"]
    assert ratio < 0.5 if name != "natural_galore" else ratio < 1.0      # the history stays float32


def test_8bit_low_rank_state_stays_sharded_and_matches_one_device():
    from jax.sharding import AxisType, NamedSharding
    from jax.sharding import PartitionSpec as P
    assert jax.device_count() == 8, "tests/conftest.py provides 8 simulated devices"
    rng = np.random.default_rng(3)
    params = _low_rank_params(rng)
    grads = [jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), jnp.float32), params) for _ in range(3)]
    tx = optim.galore(1e-2, rank=8, update_proj_gap=2, moments_8bit=True)
    st, ref = tx.init(params), []
    for g in grads:
        u, st = jax.jit(tx.update)(g, st, params)
        ref.append(u)
    mesh = jax.make_mesh((8,), ("fsdp",), axis_types=(AxisType.Explicit,))
    shard = lambda t: jax.tree.map(lambda x: jax.device_put(x, NamedSharding(mesh, P("fsdp", None))), t)
    with jax.set_mesh(mesh):
        sp = shard(params)
        sst = jax.jit(tx.init)(sp)
        types = jax.tree.map(jax.typeof, sst)
        for g, r in zip(grads, ref):
            u, sst = jax.jit(tx.update)(shard(g), sst, sp)
            assert jax.tree.map(jax.typeof, sst) == types
            for a, b in zip(jax.tree.leaves(u), jax.tree.leaves(r)):
                # partial sums round differently and can move a value across a code boundary
                assert float(np.linalg.norm(a - b) / np.linalg.norm(b)) < 1e-3


def test_moments_8bit_is_checked():
    with pytest.raises(ValueError, match="moments_8bit=8"):
        optim.galore(1e-2, moments_8bit=8)
    with pytest.raises(ValueError, match="moments_8bit"):
        optim.apollo(1e-2, moments_8bit="yes")


def test_the_training_config_turns_on_8bit_moments_and_refuses_methods_without_them():
    cfg = ml_collections.ConfigDict({"name": "galore", "learning_rate": 1e-3, "warmup_steps": 2, "min_lr_ratio": 0.1,
                                     "weight_decay": 0.0, "b1": 0.9, "b2": 0.95, "grad_clip": 0.0, "rank": 8,
                                     "update_proj_gap": 5, "scale": -1.0, "moments_8bit": True})
    params = _low_rank_params(np.random.default_rng(0))
    lowrank = make_optimizer(cfg, 10).init(params)[0].inner_states["lowrank"].inner_state
    assert isinstance(lowrank.mu["attn"]["q_proj"]["kernel"], qz.Quantized)
    cfg.name = "adamw"
    with pytest.raises(ValueError, match="optim.moments_8bit"):
        make_optimizer(cfg, 10)
