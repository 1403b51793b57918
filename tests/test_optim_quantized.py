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


def test_a_short_language_model_run_tracks_the_float32_run():
    from experiments.bench.optim_step import lm_setup

    losses = {}
    for name, tx in (("float32", optax.adamw(3e-3)), ("8bit", optim.adamw_8bit(3e-3))):
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
