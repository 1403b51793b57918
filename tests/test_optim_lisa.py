"""LISA (optim.lisa): frozen layers do not move, the sample changes on schedule, state for the
active slots only, equivalence with the inner optimizer when every layer is active, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from lolax import optim
from lolax.models import LanguageModel, ModelConfig


def layered(num_layers=4, seed=0):
    rng = np.random.default_rng(seed)
    arr = lambda *s: jnp.asarray(rng.normal(size=s), jnp.float32)
    return {"embed": arr(10, 4), "layers": {i: {"w": arr(4, 4), "b": arr(4)} for i in range(num_layers)},
            "head": arr(4, 10)}


def run(tx, params, steps, seed=1):
    rng = np.random.default_rng(seed)
    state, history = tx.init(params), []
    update = jax.jit(tx.update)
    for _ in range(steps):
        grads = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), jnp.float32), params)
        updates, state = update(grads, state, params)
        new = optax.apply_updates(params, updates)
        history.append((params, new, [np.asarray(a) for a in state.active]))
        params = new
    return history


def test_only_the_sampled_layers_and_the_outer_parameters_move():
    params = layered()
    history = run(optim.lisa(optax.adam(1e-2), num_active=1, interval=3), params, 9)
    samples = []
    for step, (before, after, active) in enumerate(history):
        moved = [i for i in range(4) if not np.array_equal(before["layers"][i]["w"], after["layers"][i]["w"])]
        (active,) = active
        assert moved == list(active), (step, moved, active)
        assert not np.array_equal(before["embed"], after["embed"]) and not np.array_equal(before["head"], after["head"])
        samples.append(tuple(active))
    assert samples[0] == samples[1] == samples[2] and samples[3] == samples[4] == samples[5]
    assert len({samples[0], samples[3], samples[6]}) > 1       # resampled every 3 steps


def test_every_layer_active_and_no_resample_is_the_inner_optimizer():
    params = layered()
    ours = run(optim.lisa(optax.adamw(1e-2, weight_decay=0.1), num_active=4, interval=1000), params, 5)
    ref_tx, ref_params = optax.adamw(1e-2, weight_decay=0.1), params
    state = ref_tx.init(params)
    rng = np.random.default_rng(1)
    for _, after, _ in ours:
        grads = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), jnp.float32), params)
        updates, state = ref_tx.update(grads, state, ref_params)
        ref_params = optax.apply_updates(ref_params, updates)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), after, ref_params)


def test_state_covers_the_active_slots_only():
    params = {"layers": {i: {"w": jnp.zeros((64, 64))} for i in range(8)}, "embed": jnp.zeros((16, 64))}
    full = optim.state_bytes(optax.adam(1e-3), params)["total"]["bytes"]
    two = optim.state_bytes(optim.lisa(optax.adam(1e-3), num_active=2), params)["total"]["bytes"]
    layers = 8 * 64 * 64 * 8           # adam's two float32 moments over the 8 layers
    assert two == pytest.approx(full - layers * 6 / 8, abs=64)


def test_an_nnx_language_model_trains_with_lisa_adamw():
    model = LanguageModel(ModelConfig(d_model=32, num_layers=4, pattern="LS", num_heads=2), nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)
    tx = optim.from_config("lisa_adamw", 1e-2, num_active=1, interval=2)
    state = tx.init(params)
    tokens = jnp.asarray(np.arange(2 * 17).reshape(2, 17) % 200)

    def loss(p):
        logits = nnx.merge(graphdef, p)(tokens[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

    first = float(loss(params))
    update = jax.jit(tx.update)
    for _ in range(6):
        grads = jax.grad(loss)(params)
        updates, state = update(grads, state, params)
        before = params
        params = optax.apply_updates(params, updates)
        # pattern LS: layers 0, 2 (linear) and 1, 3 (softmax) are two groups, one active layer each
        linear, softmax = (np.asarray(a).tolist() for a in state.active)
        active = {(0, 2)[linear[0]], (1, 3)[softmax[0]]}
        frozen = [i for i in range(4) if i not in active]
        assert len(frozen) == 2
        for i in frozen:
            for a, b in zip(jax.tree.leaves(before["layers"][i]), jax.tree.leaves(params["layers"][i])):
                np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert float(loss(params)) < first


def test_flax_linen_layer_names_are_found_too():
    from lolax.optim.lisa import default_layer_of

    path = jax.tree_util.tree_flatten_with_path({"layers_3": {"mlp": {"w": 0}}})[0][0][0]
    assert default_layer_of(path) == (3, ("mlp", "w"))
    path = jax.tree_util.tree_flatten_with_path({"layers": {2: {"w": 0}}})[0][0][0]
    assert default_layer_of(path) == (2, ("w",))
    assert default_layer_of(jax.tree_util.tree_flatten_with_path({"embed": 0})[0][0][0]) is None


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="no repeated layers"):
        optim.lisa(optax.adam(1e-2)).init({"w": jnp.zeros((3, 3))})
    with pytest.raises(ValueError, match=r"exceeds the model's 3 layers \(in groups of \[2, 1\]\)"):
        optim.lisa(optax.adam(1e-2), num_active=3).init(
            {"layers": {0: {"w": jnp.zeros((3, 3))}, 1: {"w": jnp.zeros((3, 4))}, 2: {"w": jnp.zeros((3, 3))}}})
    with pytest.raises(ValueError, match="exceeds the model's 2 layers"):
        optim.lisa(optax.adam(1e-2), num_active=3).init({"layers": {i: {"w": jnp.zeros(3)} for i in range(2)}})
    with pytest.raises(ValueError, match="num_active"):
        optim.lisa(optax.adam(1e-2), num_active=0)


def test_the_training_script_refuses_scanned_layers_for_path_based_optimizers():
    import ml_collections

    from experiments.optimizers import check_layer_layout

    for name in ("adamw", "adamw_8bit"):
        check_layer_layout(ml_collections.ConfigDict({"name": name}), scan_layers=True)
    with pytest.raises(ValueError, match="'lisa_adamw' samples layers by their paths"):
        check_layer_layout(ml_collections.ConfigDict({"name": "lisa_adamw"}), scan_layers=True)
    with pytest.raises(ValueError, match="'galore' projects each parameter leaf as one matrix"):
        check_layer_layout(ml_collections.ConfigDict({"name": "galore"}), scan_layers=True)
    check_layer_layout(ml_collections.ConfigDict({"name": "galore"}), scan_layers=False)
