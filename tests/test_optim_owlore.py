"""OwLore (optim.owlore) and the two LISA options it rests on: outlier ratios by hand, sampling
that follows the probabilities, frozen layers, per-slot GaLore equal to GaLore on the layer
alone, state memory, per_slot with elementwise optimizers, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lolax import optim
from lolax.optim.lisa import _update_per_slot


def arr(rng, *shape, scale=1.0):
    return jnp.asarray(scale * rng.normal(size=shape), jnp.float32)


def model(num_layers=4, seed=0, outliers=(0, 3, 9, 0)):
    """Layers with attention and MLP matrices, a norm, and ``outliers[l]`` planted entries of 30."""
    rng = np.random.default_rng(seed)
    layers = {}
    for i in range(num_layers):
        q = np.array(arr(rng, 8, 8))
        q.reshape(-1)[:outliers[i]] = 30.0
        layers[i] = {"attn": {"q_proj": {"kernel": jnp.asarray(q)}, "o_proj": {"kernel": arr(rng, 8, 8)}},
                     "mlp": {"up_proj": {"kernel": arr(rng, 8, 16)}, "down_proj": {"kernel": arr(rng, 16, 8)}},
                     "attn_norm": {"scale": jnp.ones(8)}}
    return {"embed": {"embedding": arr(rng, 20, 8)}, "layers": layers, "lm_head": {"kernel": arr(rng, 8, 20)}}


def grads_like(params, rng):
    return jax.tree.map(lambda x: arr(rng, *x.shape), params)


def test_outlier_ratios_by_hand():
    w0 = np.ones((4, 6), np.float32)
    w0[1, 2], w0[3, 5] = 12.0, -20.0                   # mean |w| over both matrices: (46 + 30) / 48
    params = {"embed": jnp.full((5, 4), 100.0),        # outside the layers: never counted
              "layers": {0: {"a": jnp.asarray(w0), "b": jnp.ones((6, 4)), "norm": jnp.full((4,), 50.0)},
                         1: {"a": jnp.ones((4, 6)), "b": jnp.ones((6, 4)), "norm": jnp.ones(4)}}}
    mean0 = (w0.sum() + 24) / 48
    tau = 5.0
    assert 12.0 > tau * mean0 and 1.0 < tau * mean0
    np.testing.assert_allclose(optim.outlier_ratios(params, tau=tau), [2 / 48, 0.0])
    assert float(optim.outlier_ratios(params, tau=20 / mean0 + 0.01)[0]) == 0.0   # 20 itself not above

    # Wanda score |W_ij| * n_j with the input axis 0 of [in, out] kernels: damping the input row of the
    # 12 (row 1) leaves only the 20 as an outlier; a large norm on a plain row makes that row the outliers.
    n_a = np.ones(4, np.float32)
    n_a[1] = 0.01
    norms = {"layers": {i: {"a": jnp.asarray(n_a), "b": jnp.ones(6)} for i in (0, 1)}}
    s0 = np.concatenate([(np.abs(w0) * n_a[:, None]).ravel(), np.ones(24)])
    expect = np.mean(s0 > tau * s0.mean())
    got = optim.outlier_ratios(params, tau=tau, activation_norms=norms)
    np.testing.assert_allclose(got, [expect, 0.0])
    assert expect == 1 / 48
    n_b = np.ones(6, np.float32)
    n_b[0] = 40.0
    norms = {"layers": {i: {"a": jnp.ones(4), "b": jnp.asarray(n_b)} for i in (0, 1)}}
    s1 = np.concatenate([np.ones(24), (np.ones((6, 4)) * n_b[:, None]).ravel()])
    got = optim.outlier_ratios(params, tau=tau, activation_norms=norms)
    np.testing.assert_allclose(got[1], np.mean(s1 > tau * s1.mean()))
    assert float(got[1]) == pytest.approx(4 / 48)                    # row 0 of "b": 4 entries of score 40

    # PyTorch layout [out, in]: the norms scale columns
    torch_norms = {"layers": {i: {"a": jnp.ones(6), "b": jnp.asarray(np.r_[40.0, 1, 1, 1])} for i in (0, 1)}}
    got = optim.outlier_ratios(params, tau=tau, activation_norms=torch_norms, input_axis=1)
    assert float(got[1]) == pytest.approx(6 / 48)


def test_outlier_ratios_of_an_nnx_model_take_plain_dict_norms():
    from flax import nnx

    from lolax.models import LanguageModel, ModelConfig
    from lolax.optim.lisa import default_layer_of

    m = LanguageModel(ModelConfig(d_model=16, num_layers=2, pattern="S", num_heads=2), nnx.Rngs(0))
    _, params = nnx.split(m, nnx.Param)
    ratios = optim.outlier_ratios(params, tau=3.0)
    assert ratios.shape == (2,) and bool(jnp.all(ratios > 0)) and bool(jnp.all(ratios < 0.05))
    norms = {}                                           # {"layers": {i: {"attn": {"q_proj": {"kernel": [d_in]}}}}}
    for path, x in jax.tree_util.tree_flatten_with_path(params)[0]:
        where = default_layer_of(path)
        if where is not None and x.ndim == 2:
            node = norms.setdefault("layers", {}).setdefault(where[0], {})
            for name in where[1][:-2]:                   # the path ends in kernel/value
                node = node.setdefault(name, {})
            node["kernel"] = jnp.ones(x.shape[0])
    np.testing.assert_allclose(optim.outlier_ratios(params, tau=3.0, activation_norms=norms), ratios)


def _active_counts(tx, params, steps):
    state = tx.init(params)
    zeros = jax.tree.map(jnp.zeros_like, params)

    def step(state, _):
        _, state = tx.update(zeros, state, params)
        return state, state.active[0]

    _, active = jax.jit(lambda s: jax.lax.scan(step, s, None, length=steps))(state)
    return np.asarray(active)


def test_sampling_follows_the_probabilities():
    params = {"layers": {i: {"w": jnp.zeros(2)} for i in range(5)}}
    weights = np.array([1.0, 0.0, 2.0, 3.0, 4.0])
    p = weights / weights.sum()
    steps = 2000
    tx = optim.lisa(optax.sgd(1.0), num_active=1, interval=1, probabilities=lambda _: weights)
    active = _active_counts(tx, params, steps)[:, 0]
    freq = np.bincount(active, minlength=5) / steps
    assert freq[1] == 0
    np.testing.assert_array_less(np.abs(freq - p), 4 * np.sqrt(p * (1 - p) / steps) + 1e-12)

    # two draws without replacement, one after another: P(l in pick) = p_l + sum_{j != l} p_j p_l / (1 - p_j)
    tx = optim.lisa(optax.sgd(1.0), num_active=2, interval=1, probabilities=lambda _: {i: w for i, w in
                                                                                         enumerate(weights)})
    picks = _active_counts(tx, params, steps)
    assert all(len(set(row)) == 2 for row in picks.tolist())
    inclusion = np.array([p[l] + sum(p[j] * p[l] / (1 - p[j]) for j in range(5) if j != l) for l in range(5)])
    freq = np.bincount(picks.ravel(), minlength=5) / steps
    assert freq[1] == 0
    np.testing.assert_array_less(np.abs(freq - inclusion), 4 * np.sqrt(inclusion * (1 - inclusion) / steps) + 1e-12)


def test_uniform_default_draws_as_before():
    params = {"layers": {i: {"w": jnp.zeros(2)} for i in range(6)}}
    a = _active_counts(optim.lisa(optax.sgd(1.0), num_active=2, interval=1), params, 20)
    key = jax.random.key(0)
    expect = [np.sort(np.asarray(jax.random.choice(jax.random.fold_in(jax.random.fold_in(key, t), 0), 6, (2,),
                                                   replace=False))) for t in range(20)]
    np.testing.assert_array_equal(a, np.stack(expect))


def test_owlore_probabilities_are_the_normalised_outlier_ratios():
    params = model()
    ratios = np.asarray(optim.outlier_ratios(params, tau=6.0))
    assert ratios[0] == ratios[3] == 0 and 0 < ratios[1] < ratios[2]
    state = optim.owlore(1e-2, num_active=2, rank=4, tau=6.0).init(params)
    np.testing.assert_allclose(state.probabilities[0], ratios / ratios.sum(), rtol=1e-6)


def _owlore_run(params, steps, **kw):
    tx = optim.owlore(1e-2, **{"rank": 4, "tau": 6.0, **kw})
    rng = np.random.default_rng(1)
    state, update = tx.init(params), jax.jit(tx.update)
    for _ in range(steps):
        grads = grads_like(params, rng)
        updates, state = update(grads, state, params)
        yield grads, updates, state
        params = optax.apply_updates(params, updates)


def test_frozen_layers_do_not_move_and_the_outer_parameters_always_do():
    params = model(outliers=(2, 3, 9, 4))
    seen = set()
    for _, updates, state in _owlore_run(params, 6, num_active=2, interval=2):
        (active,) = np.asarray(state.active).tolist()
        seen.add(tuple(active))
        for i in range(4):
            moved = [bool(jnp.any(u != 0)) for u in jax.tree.leaves(updates["layers"][i])]
            assert all(moved) if i in active else not any(moved), (i, active)
        assert all(bool(jnp.all(u != 0)) for u in jax.tree.leaves({k: updates[k] for k in ("embed", "lm_head")}))
    assert len(seen) > 1


def test_active_layers_get_galore_on_the_layer_alone_including_after_a_resample():
    params = model(outliers=(2, 3, 9, 4))
    kw = dict(rank=4, update_proj_gap=2, scale=0.5, weight_decay=0.1)
    ref_tx = optim.galore(1e-2, **kw)
    ref_update = jax.jit(ref_tx.update)
    ref_state, ref_outer = {}, None
    for step, (grads, updates, state) in enumerate(_owlore_run(params, 6, num_active=2, interval=3, **kw)):
        (active,) = np.asarray(state.active).tolist()
        if step % 3 == 0:                                  # resample: the active layers start afresh
            ref_state = {i: ref_tx.init(params["layers"][i]) for i in active}
        for i in active:
            u, ref_state[i] = ref_update(grads["layers"][i], ref_state[i], params["layers"][i])
            jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-7), updates["layers"][i], u)
        outer = {k: params[k] for k in ("embed", "lm_head")}
        ref_outer = ref_outer or ref_tx.init(outer)
        u, ref_outer = ref_update({k: grads[k] for k in outer}, ref_outer, outer)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-8),
                     {k: updates[k] for k in outer}, u)
        params = optax.apply_updates(params, updates)


def test_state_is_low_rank_for_the_active_slots_only():
    params = model(num_layers=8, outliers=(1, 2, 3, 4, 5, 6, 7, 8))
    ours = optim.state_bytes(optim.owlore(1e-2, num_active=2, rank=4, tau=6.0), params)["total"]["bytes"]
    full = optim.state_bytes(optim.galore(1e-2, rank=4), params)["total"]["bytes"]
    adam = optim.state_bytes(optax.adam(1e-2), params)["total"]["bytes"]
    assert ours < full < adam
    state = optim.owlore(1e-2, num_active=2, rank=4, tau=6.0).init(params)
    lowrank = state.slots[0][0].inner_states["lowrank"].inner_state
    slot = lowrank.mu["slots"][0]
    assert slot["mlp"]["up_proj"]["kernel"].shape == (2, 4, 16)        # [slots, rank, n] for an 8 x 16 kernel
    assert slot["mlp"]["down_proj"]["kernel"].shape == (2, 16, 4)
    assert lowrank.projector["slots"][0]["attn"]["q_proj"]["kernel"].shape == (2, 8, 4)


@pytest.mark.parametrize("inner", [optax.adam(1e-2), optax.adamw(1e-2, weight_decay=0.1)], ids=["adam", "adamw"])
def test_per_slot_is_a_no_op_for_elementwise_optimizers(inner):
    params = model(outliers=(2, 3, 9, 4))
    a, b = (optim.lisa(inner, num_active=2, interval=2, per_slot=ps) for ps in (False, True))
    sa, sb = a.init(params), b.init(params)
    rng = np.random.default_rng(3)
    both = jax.jit(lambda g, sa, sb, p: (a.update(g, sa, p), b.update(g, sb, p)))
    for _ in range(5):
        grads = grads_like(params, rng)
        (ua, sa), (ub, sb) = both(grads, sa, sb, params)
        jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-8), ua, ub)
        params = optax.apply_updates(params, ua)


def test_per_slot_keeps_step_counters_shared_and_falls_back_when_they_depend_on_the_slot():
    tree = {"mlp": {"up_proj": {"kernel": jnp.ones((3, 8, 16))}}}
    galore = optim.galore(1e-2, rank=4, update_proj_gap=10)
    wrap = lambda t: {"outer": {}, "slots": [t]}
    state = jax.vmap(lambda t: galore.init(wrap(t)))(tree)
    jaxpr = str(jax.make_jaxpr(lambda g, s: _update_per_slot(galore, g, s, g))(tree, state))
    assert "cond[" in jaxpr                     # the projector refresh stays a branch (no SVD every step)

    # apply_if_finite counts non-finite steps per slot: its integer scalars differ between slots
    inner = optax.apply_if_finite(optax.adam(1e-2), max_consecutive_errors=5)
    grads = {"w": jnp.asarray([[1.0, 2.0], [jnp.nan, 1.0], [3.0, 4.0]])}
    state = jax.vmap(lambda t: inner.init(wrap(t)))(grads)
    updates, state = _update_per_slot(inner, grads, state, None)
    np.testing.assert_array_equal(state.notfinite_count, [0, 1, 0])
    for k in range(3):
        u, _ = inner.update(wrap({"w": grads["w"][k]}), inner.init(wrap({"w": grads["w"][k]})))
        np.testing.assert_array_equal(updates["w"][k], u["slots"][0]["w"])


def test_owlore_by_name_and_the_training_script():
    import ml_collections

    from experiments.optimizers import _optimizer, check_layer_layout

    assert optim.OPTIMIZERS["owlore"] is optim.owlore
    assert "owlore" in optim.__all__ and "outlier_ratios" in optim.__all__
    params = model(outliers=(2, 3, 9, 4))
    tx = optim.from_config("owlore", 1e-2, num_active=1, rank=4, tau=6.0)
    assert tx.init(params).active[0].shape == (1,)
    cfg = ml_collections.ConfigDict({"name": "owlore", "b1": 0.9, "b2": 0.95, "weight_decay": 0.0, "rank": 4,
                                     "update_proj_gap": 20, "scale": -1.0})
    state = _optimizer(cfg, optax.constant_schedule(1e-3)).init(model(num_layers=6, outliers=(2, 3, 9, 4, 1, 1)))
    assert state.active[0].shape == (5,)                                # the paper's five layers
    assert state.slots[0][0].inner_states["lowrank"].inner_state.projector["slots"][0]["attn"]["q_proj"][
        "kernel"].shape == (5, 8, 4)                                    # the config's rank
    cfg.update({"num_active": 2, "interval": 7, "tau": 6.0})               # the sampling keys reach owlore
    state = _optimizer(cfg, optax.constant_schedule(1e-3)).init(params)
    assert state.active[0].shape == (2,)
    np.testing.assert_allclose(state.probabilities[0], optim.outlier_ratios(params, tau=6.0)
                               / optim.outlier_ratios(params, tau=6.0).sum(), rtol=1e-6)
    check_layer_layout(ml_collections.ConfigDict({"name": "owlore"}), scan_layers=False)
    with pytest.raises(ValueError, match="'owlore' samples layers by their paths"):
        check_layer_layout(ml_collections.ConfigDict({"name": "owlore"}), scan_layers=True)


def test_errors_name_the_argument():
    params = model()
    cases = {
        "tau": lambda: optim.owlore(1e-2, tau=0.0),
        "input_axis": lambda: optim.outlier_ratios(params, input_axis=2),
        "num_active": lambda: optim.owlore(1e-2, num_active=0),
        "per_slot": lambda: optim.lisa(optax.adam(1e-2), per_slot="yes"),
        "probabilities=": lambda: optim.lisa(optax.adam(1e-2), probabilities=[1.0, 2.0]),
    }
    for name, make in cases.items():
        with pytest.raises(ValueError, match=name):
            make()
    for bad in ([1.0, -1.0, 1.0, 1.0], [1.0, np.nan, 1.0, 1.0], [0.0, 0.0, 1.0, 0.0], [1.0, 1.0], {0: 1.0}):
        with pytest.raises(ValueError, match=r"probabilities\(params\)"):
            optim.lisa(optax.adam(1e-2), num_active=2, probabilities=lambda _, w=bad: w).init(params)
    with pytest.raises(ValueError, match=r"tau=6.0: only 2 layers"):        # model(): outliers in layers 1, 2 only
        optim.owlore(1e-2, num_active=3, rank=4, tau=6.0).init(params)
    with pytest.raises(ValueError, match="activation_norms has no entry for the weight layers/0/attn/o_proj/kernel"):
        optim.outlier_ratios(params, activation_norms={"layers": {0: {"attn": {"q_proj": {"kernel": jnp.ones(8)}}}}})
    with pytest.raises(ValueError, match=r"activation_norms\[layers/0/mlp/up_proj/kernel\] has shape \(16,\)"):
        norms = jax.tree.map(lambda x: jnp.ones(x.shape[0]), params)
        norms["layers"][0]["mlp"]["up_proj"]["kernel"] = jnp.ones(16)
        optim.outlier_ratios(params, activation_norms=norms)
    with pytest.raises(ValueError, match="no 2-D weight matrix in the layers"):
        optim.outlier_ratios({"layers": {0: {"w": jnp.ones((3, 3))}, 1: {"norm": jnp.ones(3)}}})
    with pytest.raises(ValueError, match="no repeated layers"):
        optim.outlier_ratios({"w": jnp.ones((3, 3))})


def test_an_nnx_language_model_trains_with_owlore():
    from flax import nnx

    from lolax.models import LanguageModel, ModelConfig

    model_ = LanguageModel(ModelConfig(d_model=32, num_layers=4, pattern="S", num_heads=2), nnx.Rngs(0))
    graphdef, params = nnx.split(model_, nnx.Param)
    tx = optim.owlore(1e-2, num_active=2, interval=3, rank=4, tau=3.0)    # a random init has few outliers
    state = tx.init(params)
    lowrank = state.slots[0][0].inner_states["lowrank"].inner_state.mu["slots"][0]
    assert lowrank["attn"]["q_proj"]["kernel"]["value"].shape == (2, 32, 4)   # projected inside nnx paths
    tokens = jnp.asarray(np.arange(2 * 17).reshape(2, 17) % 200)

    def loss(p):
        logits = nnx.merge(graphdef, p)(tokens[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

    first = float(loss(params))
    step = jax.jit(lambda p, s: tx.update(jax.grad(loss)(p), s, p))
    for _ in range(6):
        updates, state = step(params, state)
        params = optax.apply_updates(params, updates)
    assert float(loss(params)) < first
