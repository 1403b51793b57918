"""optim: orbax round-trip mid-period, 8-device FSDP sharding, tiny LM convergence, and the
``adamw`` that ``from_config`` and the training scripts build being ``optax.adamw``."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from lolax import optim

SHAPES = {"attn": {"q_proj": {"kernel": (16, 32)}}, "mlp": {"down_proj": {"kernel": (64, 16)}},
          "embed": {"embedding": (24, 16)}, "norm": {"scale": (16,)}}
_isl = lambda x: isinstance(x, tuple)
CONFIGS = [("galore", dict(rank=4)), ("apollo", dict(rank=4)), ("apollo_mini", {}),
           ("fira", dict(rank=4)), ("frugal", dict(rank=4)),
           # damping 1e3: at the default 1e-3 the float32 Woodbury step cancels two terms ~1e5 times
           # its result, so any change in summation order (sharded partial sums) moves it by 1e-2
           ("natural_galore", dict(rank=4, history_size=3, damping=1e3))]
_slow = lambda c: pytest.param(*c, marks=pytest.mark.slow)
FAST_ORBAX = [CONFIGS[0], CONFIGS[1], _slow(CONFIGS[2]), _slow(CONFIGS[3])]
FAST_SHARD = [CONFIGS[0], _slow(CONFIGS[1]), CONFIGS[2], CONFIGS[3], _slow(CONFIGS[4]),
              _slow(CONFIGS[5])]


def _trees(n, seed=0):
    rng = np.random.default_rng(seed)
    return [jax.tree.map(lambda s: jnp.asarray(rng.normal(size=s), jnp.float32), SHAPES,
                         is_leaf=_isl) for _ in range(n)]


@pytest.mark.parametrize("name,kw", FAST_ORBAX)
def test_orbax_roundtrip_mid_period(tmp_path, name, kw):
    import orbax.checkpoint as ocp
    params, *grads = _trees(8)
    tx = optim.from_config(name, 0.01, update_proj_gap=3, **kw)
    upd = jax.jit(tx.update)
    st = tx.init(params)
    for g in grads[:4]:                        # stop at count 4: mid-way through period [3, 6)
        _, st = upd(g, st, params)
    ckpt = ocp.StandardCheckpointer()
    ckpt.save(tmp_path / "state", st)
    ckpt.wait_until_finished()
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, st)
    restored = ckpt.restore(tmp_path / "state", abstract)
    assert jax.tree.structure(restored) == jax.tree.structure(st)
    a, b = st, restored
    for g in grads[4:]:                        # crosses the refresh at count 6
        ua, a = upd(g, a, params)
        ub, b = upd(g, b, params)
        jax.tree.map(np.testing.assert_array_equal, ua, ub)
    jax.tree.map(np.testing.assert_array_equal, a, b)


@pytest.mark.parametrize("name,kw", FAST_SHARD)
def test_fsdp_sharded_update_equals_unsharded(name, kw):
    assert jax.device_count() == 8, "tests/conftest.py provides 8 simulated devices"
    mesh = jax.make_mesh((8,), ("fsdp",), axis_types=(AxisType.Explicit,))
    params, *grads = _trees(4, seed=1)
    tx = optim.from_config(name, 0.01, update_proj_gap=2, **kw)
    st, ref = tx.init(params), []
    for g in grads:
        u, st = jax.jit(tx.update)(g, st, params)
        ref.append(u)
    spec = lambda x: P("fsdp", *([None] * (x.ndim - 1))) if x.shape[0] % 8 == 0 else P()
    shard = lambda t: jax.tree.map(lambda x: jax.device_put(x, NamedSharding(mesh, spec(x))), t)
    with jax.set_mesh(mesh):
        sp = shard(params)
        sst = jax.jit(tx.init)(sp)
        types0 = jax.tree.map(jax.typeof, sst)
        inner = sst[0].inner_states
        # states follow the parameter shardings
        assert inner["adam"].inner_state.mu["embed"]["embedding"].sharding.spec == P("fsdp", None)
        assert inner["lowrank"].inner_state.mu["mlp"]["down_proj"]["kernel"].sharding.spec == \
            P("fsdp", None)                      # (64, r) moments keep the sharded 64-axis
        step = jax.jit(tx.update)
        for g, r in zip(grads, ref):
            u, sst = step(shard(g), sst, sp)
            assert jax.tree.map(jax.typeof, sst) == types0
            assert u["mlp"]["down_proj"]["kernel"].sharding.spec == P("fsdp", None)
            jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), u, r)



@pytest.mark.parametrize("name", ["galore", "apollo"])
def test_fsdp_step_sends_projected_matrices_and_gathers_only_to_refresh(name):
    """An ordinary step all-reduces the small projected matrices; the gradient is gathered only
    inside the refresh branch (for the SVD), and never by APOLLO, whose projector is random."""
    from lolax.parallelism import hlo
    mesh = jax.make_mesh((8,), ("fsdp",), axis_types=(AxisType.Explicit,))
    params = _trees(1)[0]
    tx = optim.from_config(name, 0.01, rank=4)
    spec = lambda x: P("fsdp", *([None] * (x.ndim - 1))) if x.shape[0] % 8 == 0 else P()
    with jax.set_mesh(mesh):
        sp = jax.tree.map(lambda x: jax.device_put(x, NamedSharding(mesh, spec(x))), params)
        ops = hlo.collectives(hlo.compiled_text(tx.update, sp, jax.jit(tx.init)(sp), sp))
    every = [op for op in ops if not op.conditional]
    assert {op.kind for op in every} == {"all-reduce"} and all(op.group_size == 8 for op in every)
    # q_proj (16, 32) projects its sharded 16-side: R = Q^T G is (4, 32), summed over devices;
    # down_proj (64, 16) projects its unsharded side and needs nothing (APOLLO adds scalar norms)
    assert max(op.bytes for op in every) == 4 * 32 * 4
    gathers = [op for op in ops if op.kind == "all-gather"]
    if name == "galore":
        assert gathers and all(op.conditional for op in gathers)
        # the two gradients, and q_proj's previous (16, 4) projector: subspace iteration starts from it
        assert sum(op.bytes for op in gathers) == 4 * (16 * 32 + 64 * 16) + 4 * 16 * 4
    else:
        assert not gathers


# ----------------------------------------------------------------------------
def _tiny_lm_loss_curve(tx, steps, seed=0):
    """A 1-layer attention+MLP LM (NNX-style names) on a fixed periodic sequence."""
    vocab, d, seq = 16, 16, 12
    k = iter(jax.random.split(jax.random.key(seed), 16))
    init = lambda *s: jax.random.normal(next(k), s) / np.sqrt(s[0])
    params = {
        "embed": {"embedding": jax.random.normal(next(k), (vocab, d))},
        "attn": {n: {"kernel": init(d, d)} for n in ("q_proj", "k_proj", "v_proj", "o_proj")},
        "mlp": {"up_proj": {"kernel": init(d, 32)}, "down_proj": {"kernel": init(32, d)}},
        "norm": {"scale": jnp.ones((d,))},
        "lm_head": {"kernel": init(d, vocab)},
    }
    toks = jnp.asarray((np.arange(64)[None, :] * 3 + np.arange(4)[:, None] * 5) % vocab)

    def loss_fn(p):
        x = p["embed"]["embedding"][toks[:, :seq]]
        a = p["attn"]
        q, kk, v = (x @ a[n]["kernel"] for n in ("q_proj", "k_proj", "v_proj"))
        att = jnp.where(jnp.tril(jnp.ones((seq, seq), bool)), q @ kk.transpose(0, 2, 1) / 4, -1e9)
        x = x + jax.nn.softmax(att) @ v @ a["o_proj"]["kernel"]
        x = x + jax.nn.gelu(x @ p["mlp"]["up_proj"]["kernel"]) @ p["mlp"]["down_proj"]["kernel"]
        x = x * p["norm"]["scale"] / jnp.sqrt(jnp.mean(x * x, -1, keepdims=True) + 1e-6)
        logits = x @ p["lm_head"]["kernel"]
        return optax.softmax_cross_entropy_with_integer_labels(logits, toks[:, 1:seq + 1]).mean()

    def body(c, _):
        p, s = c
        l, g = jax.value_and_grad(loss_fn)(p)
        u, s = tx.update(g, s, p)
        return (optax.apply_updates(p, u), s), l

    _, losses = jax.jit(lambda p, s: jax.lax.scan(body, (p, s), None, length=steps))(
        params, tx.init(params))
    return np.asarray(losses)


@pytest.mark.parametrize("name,kw", [pytest.param("galore", dict(rank=4, scale=1.0),
                                                  marks=pytest.mark.slow),
                                     ("apollo_mini", {})])
def test_tiny_lm_converges(name, kw):
    losses = _tiny_lm_loss_curve(optim.from_config(name, 1e-2, update_proj_gap=20, **kw), 60)
    assert losses[-5:].mean() < 0.5 * losses[0], (name, losses[0], losses[-5:])


@pytest.mark.slow
@pytest.mark.parametrize("name,kw", CONFIGS[2:])
def test_tiny_lm_converges_all(name, kw):
    losses = _tiny_lm_loss_curve(optim.from_config(name, 1e-2, update_proj_gap=20, **kw), 150)
    assert losses[-5:].mean() < 0.5 * losses[0], (name, losses[0], losses[-5:])


# ----------------------------------------------------------------------------
def _run_updates(tx, params, grads):
    upd, st, out = jax.jit(tx.update), tx.init(params), []
    for g in grads:
        u, st = upd(g, st, params)
        params = optax.apply_updates(params, u)
        out.append(u)
    return out


def test_adamw_from_config_and_make_optimizer_equal_optax_adamw():
    """``adamw`` is one thing: ``optim.from_config('adamw', ...)`` and the optimizer that
    ``experiments.optimizers.make_optimizer`` builds for ``optim.name = 'adamw'`` (the
    ``make train`` config) update exactly like ``optax.adamw`` with the same arguments."""
    from experiments.configs.lm_shakespeare import get_config
    from experiments.optimizers import learning_rate_schedule, make_optimizer

    params, *grads = _trees(6, seed=2)
    kw = dict(b1=0.85, b2=0.95, weight_decay=0.1)
    ours = _run_updates(optim.from_config("adamw", 3e-3, **kw), params, grads)
    ref = _run_updates(optax.adamw(3e-3, **kw), params, grads)
    for o, r in zip(ours, ref):
        jax.tree.map(np.testing.assert_array_equal, o, r)

    cfg = get_config().optim
    assert cfg.name == "adamw" and cfg.grad_clip > 0
    total_steps = 4                       # warm-up and decay both happen within the 5 steps
    ours = _run_updates(make_optimizer(cfg, total_steps), params, grads)
    ref_tx = optax.chain(
        optax.clip_by_global_norm(cfg.grad_clip),
        optax.adamw(learning_rate_schedule(cfg, total_steps), b1=cfg.b1, b2=cfg.b2,
                    weight_decay=cfg.weight_decay, mask=optim.default_weight_decay_mask()))
    ref = _run_updates(ref_tx, params, grads)
    for o, r in zip(ours, ref):
        jax.tree.map(np.testing.assert_array_equal, o, r)
