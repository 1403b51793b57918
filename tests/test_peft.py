"""Adapters (lolax.models.peft): every method against the properties it promises, the LoRA
family's hand-computed examples, and bad input."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lolax.models import LanguageModel, ModelConfig, peft

CFG = ModelConfig(d_model=32, num_layers=2, pattern="LS", num_heads=2, chunk_size=8)
TARGETS = ("q_proj", "v_proj", "down_proj")


def tokens(seed=0, shape=(2, 13)):
    return jax.random.randint(jax.random.key(seed), shape, 0, 256)


def batches(n=3):
    return [{"inputs": t[:, :-1], "targets": t[:, 1:]} for t in (tokens(10 + i, (2, 17)) for i in range(n))]


def adapted(method, rank=4, targets=TARGETS, cfg=CFG, **kw):
    model = LanguageModel(cfg, nnx.Rngs(0))
    before = model(tokens())
    peft.apply(model, peft.PeftConfig(method, rank=rank, targets=targets, **kw), nnx.Rngs(1), data=batches())
    return model, before


def perturb(model, seed=3, scale=0.1):
    state = nnx.state(model, peft.trainable())
    leaves, treedef = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    new = [x + scale * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]
    nnx.update(model, jax.tree.unflatten(treedef, new))


def loss(model):
    return jnp.mean(model(tokens()) ** 2)


class Holder(nnx.Module):
    """One linear layer named like a projection, for hand-computed examples."""

    def __init__(self, d_in=6, d_out=5, bias=True):
        self.q_proj = nnx.Linear(d_in, d_out, use_bias=bias, rngs=nnx.Rngs(7))
        if bias:
            self.q_proj.bias[...] = jnp.arange(d_out, dtype=jnp.float32) / 10

    def __call__(self, x):
        return self.q_proj(x)


def holder_batches():
    return [{"x": jax.random.normal(jax.random.key(i), (8, 6))} for i in range(3)]


def holder_loss(model, batch):
    return jnp.mean(model(batch["x"]) ** 2)


@pytest.mark.parametrize("method", peft.METHOD_NAMES)
def test_exact_at_init_and_only_adapters_train(method):
    model, before = adapted(method)
    np.testing.assert_array_equal(np.asarray(model(tokens())), np.asarray(before))
    grads = nnx.grad(loss, argnums=nnx.DiffState(0, peft.trainable()))(model)
    flat = nnx.to_flat_state(grads)
    assert flat and all(isinstance(v, peft.Adapter) for _, v in flat)
    assert all(p[-1] not in ("kernel", "bias", "embedding", "scale") for p, _ in flat)
    assert sum(float(jnp.sum(jnp.abs(v[...]))) for _, v in flat) > 0


@pytest.mark.parametrize("method", peft.METHOD_NAMES)
def test_merge_equals_adapted_forward(method):
    model, _ = adapted(method)
    perturb(model)
    merged = peft.merge(model)
    assert not peft.adapted_layers(merged)
    assert jax.tree.structure(nnx.state(merged)) == jax.tree.structure(
        nnx.state(LanguageModel(CFG, nnx.Rngs(0))))
    np.testing.assert_allclose(np.asarray(merged(tokens())), np.asarray(model(tokens())), atol=2e-5, rtol=2e-5)
    assert peft.adapted_layers(model), "merge must not change the adapted model"


BF16_DEFAULT = ("lora", "dora", "nola", "svfit")     # the others under -m slow


@pytest.mark.parametrize("method", [m if m in BF16_DEFAULT else pytest.param(m, marks=pytest.mark.slow)
                                    for m in peft.METHOD_NAMES])
def test_bf16_compute_runs(method):
    model, before = adapted(method, cfg=ModelConfig(**{**CFG.to_dict(), "dtype": "bfloat16"}))
    perturb(model)
    out = model(tokens())
    assert out.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(out)))


def test_lora_and_rslora_scaling_by_hand():
    for method, scale in (("lora", 16.0 / 4), ("rslora", 16.0 / 2)):
        model = Holder()
        w0, b0 = np.asarray(model.q_proj.kernel[...]), np.asarray(model.q_proj.bias[...])
        peft.apply(model, peft.PeftConfig(method, rank=4, alpha=16.0, targets=("q_proj",)), nnx.Rngs(0))
        layer = model.q_proj
        assert layer.lora_a.shape == (6, 4) and layer.lora_b.shape == (4, 5)
        assert float(jnp.max(jnp.abs(layer.lora_a[...]))) <= 6 ** -0.5   # Kaiming-uniform bound
        a = np.arange(24, dtype=np.float32).reshape(6, 4) / 50
        b = np.arange(20, dtype=np.float32).reshape(4, 5) / 40 - 0.2
        layer.lora_a[...], layer.lora_b[...] = jnp.asarray(a), jnp.asarray(b)
        x = np.linspace(-1, 1, 12, dtype=np.float32).reshape(2, 6)
        np.testing.assert_allclose(np.asarray(model(jnp.asarray(x))), x @ w0 + b0 + scale * (x @ a @ b),
                                   rtol=1e-5, atol=1e-6)


def test_dora_by_hand_per_output_channel_norm():
    model = Holder()
    w0, b0 = np.asarray(model.q_proj.kernel[...]), np.asarray(model.q_proj.bias[...])
    peft.apply(model, peft.PeftConfig("dora", rank=2, alpha=4.0, targets=("q_proj",)), nnx.Rngs(0))
    layer = model.q_proj
    np.testing.assert_allclose(np.asarray(layer.magnitude[...]), np.linalg.norm(w0, axis=0), rtol=1e-6)
    a = np.full((6, 2), 0.3, np.float32)
    b = np.arange(10, dtype=np.float32).reshape(2, 5) / 10
    m = np.array([1.0, 2.0, 0.5, 1.5, 3.0], np.float32)
    layer.lora_a[...], layer.lora_b[...], layer.magnitude[...] = map(jnp.asarray, (a, b, m))
    v = w0 + 2.0 * a @ b                              # alpha / r = 2
    w = m * v / np.linalg.norm(v, axis=0)             # norm over the input axis, per output column
    x = np.linspace(-1, 1, 18, dtype=np.float32).reshape(3, 6)
    np.testing.assert_allclose(np.asarray(model(jnp.asarray(x))), x @ w + b0, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(peft.merge(model).q_proj.kernel[...]), w, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("detach", [True, False])
def test_dora_norm_gradient_flag(detach):
    """With the norm detached, the direction's gradient misses the norm's term; both differ."""
    model = Holder()
    peft.apply(model, peft.PeftConfig("dora", rank=2, targets=("q_proj",), dora_detach_norm=detach), nnx.Rngs(0))
    model.q_proj.lora_b[...] = jnp.full((2, 5), 0.2)
    x = jnp.linspace(-1, 1, 18).reshape(3, 6)

    def by_hand(a):
        layer = model.q_proj
        v = layer.kernel[...] + layer.scaling * a @ layer.lora_b[...]
        norm = jnp.linalg.norm(v, axis=0)
        norm = jax.lax.stop_gradient(norm) if detach else norm
        return jnp.sum((x @ (layer.magnitude[...] * v / norm) + layer.bias[...]) ** 2)

    got = nnx.grad(lambda m: jnp.sum(m(x) ** 2), argnums=nnx.DiffState(0, peft.trainable()))(model)
    want = jax.grad(by_hand)(model.q_proj.lora_a[...])
    np.testing.assert_allclose(np.asarray(got["q_proj"]["lora_a"][...]), np.asarray(want), rtol=1e-4, atol=1e-6)


def test_dylora_nested_ranks_by_hand():
    model = Holder(bias=False)
    w0 = np.asarray(model.q_proj.kernel[...])
    peft.apply(model, peft.PeftConfig("dylora", rank=4, alpha=8.0, targets=("q_proj",)), nnx.Rngs(0))
    a = np.arange(24, dtype=np.float32).reshape(6, 4) / 30
    b = np.arange(20, dtype=np.float32).reshape(4, 5) / 20
    model.q_proj.lora_a[...], model.q_proj.lora_b[...] = jnp.asarray(a), jnp.asarray(b)
    x = np.linspace(-1, 1, 12, dtype=np.float32).reshape(2, 6)
    for rank in (4, 2, 1):
        peft.set_rank(model, rank)
        want = x @ w0 + (8.0 / rank) * x @ a[:, :rank] @ b[:rank]
        np.testing.assert_allclose(np.asarray(model(jnp.asarray(x))), want, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(np.asarray(peft.merge(model).q_proj.kernel[...]),
                                   w0 + (8.0 / rank) * a[:, :rank] @ b[:rank], rtol=1e-5, atol=1e-6)


def test_dylora_samples_a_rank_per_step_in_training():
    model = Holder(bias=False)
    w0 = np.asarray(model.q_proj.kernel[...])
    peft.apply(model, peft.PeftConfig("dylora", rank=4, alpha=4.0, targets=("q_proj",), dylora_min_rank=2),
               nnx.Rngs(0))
    a = np.arange(24, dtype=np.float32).reshape(6, 4) / 30
    b = np.arange(20, dtype=np.float32).reshape(4, 5) / 20
    model.q_proj.lora_a[...], model.q_proj.lora_b[...] = jnp.asarray(a), jnp.asarray(b)
    x = np.ones((1, 6), np.float32)
    seen = set()
    for seed in range(24):
        with peft.training(jax.random.key(seed)):
            y = np.asarray(model(jnp.asarray(x)))
        matches = [r for r in (2, 3, 4) if np.allclose(y, x @ w0 + (4.0 / r) * x @ a[:, :r] @ b[:r], atol=1e-5)]
        assert len(matches) == 1
        seen.add(matches[0])
    assert seen == {2, 3, 4}
    with pytest.raises(ValueError, match="rank must be an int in"):
        peft.set_rank(model, 5)


def test_dropout_only_in_training_and_on_the_adapter_branch():
    model = Holder(bias=False)
    w0 = np.asarray(model.q_proj.kernel[...])
    peft.apply(model, peft.PeftConfig("lora", rank=2, targets=("q_proj",), dropout=0.5), nnx.Rngs(0))
    model.q_proj.lora_b[...] = jnp.ones((2, 5))
    x = jnp.ones((64, 6))
    eval_out = model(x)
    with peft.training(jax.random.key(0)):
        train_out = model(x)
    base = np.asarray(x) @ w0
    assert not np.allclose(np.asarray(train_out), np.asarray(eval_out))
    branch = np.asarray(train_out) - base          # the base branch never sees dropout
    full = np.asarray(eval_out) - base
    ratio = branch / full
    assert np.all((ratio > -1.5) & (ratio < 3.5))


def test_counts_by_hand():
    model, _ = adapted("lora", rank=4, targets=("q_proj", "o_proj"))
    # per layer: q_proj 32 -> 32 and o_proj 32 -> 32, each r * (in + out) = 4 * 64
    assert peft.count(model)["trainable"] == 2 * 2 * 4 * 64
    model, _ = adapted("dora", rank=4, targets=("q_proj", "o_proj"))
    assert peft.count(model)["trainable"] == 2 * 2 * (4 * 64 + 32)
    base = sum(int(x.size) for x in jax.tree.leaves(nnx.state(LanguageModel(CFG, nnx.Rngs(0)), nnx.Param)))
    assert peft.count(model)["base"] == base


def test_targets_regex_and_names():
    model, _ = adapted("lora", targets=r"layers/0/attn/(q|v)_proj$")
    paths = [p for p, _ in peft.adapted_layers(model)]
    assert paths == [("layers", 0, "attn", "q_proj"), ("layers", 0, "attn", "v_proj")]
    assert peft.PeftConfig.from_dict({"targets": "q_proj, v_proj"}).targets == ("q_proj", "v_proj")
    assert peft.PeftConfig.from_dict({"targets": "re:attn/.*"}).targets == "attn/.*"


def test_training_state_round_trip_and_fingerprint():
    model, _ = adapted("lora")
    perturb(model)
    state = peft.adapter_state(model)
    assert {p[-1] for p, _ in nnx.to_flat_state(state)} == {"lora_a", "lora_b"}
    other, _ = adapted("lora")
    nnx.update(other, state)
    np.testing.assert_array_equal(np.asarray(other(tokens())), np.asarray(model(tokens())))
    fp = peft.fingerprint(peft.base_state(model))
    assert fp == peft.fingerprint(nnx.state(LanguageModel(CFG, nnx.Rngs(0)), nnx.Param))
    assert fp != peft.fingerprint(nnx.state(LanguageModel(CFG, nnx.Rngs(1)), nnx.Param))


def test_nnx_optimizer_trains_adapters_only():
    model, _ = adapted("rslora")
    kernel = np.asarray(model.layers[0].attn.q_proj.kernel[...])
    optimizer = nnx.Optimizer(model, __import__("optax").adam(1e-2), wrt=peft.trainable(model))
    for _ in range(3):
        grads = nnx.grad(loss, argnums=nnx.DiffState(0, peft.trainable()))(model)
        optimizer.update(model, grads)
    np.testing.assert_array_equal(np.asarray(model.layers[0].attn.q_proj.kernel[...]), kernel)
    assert float(jnp.abs(model.layers[0].attn.q_proj.lora_b[...]).max()) > 0


@pytest.mark.parametrize("kwargs, match", [
    ({"method": "qlora"}, "peft.method must be one of"),
    ({"rank": 0}, "peft.rank must be a positive int"),
    ({"alpha": -1.0}, "peft.alpha"),
    ({"targets": ()}, "peft.targets"),
    ({"targets": "("}, "peft.targets .* regular expression"),
    ({"dropout": 1.0}, "peft.dropout"),
    ({"dylora_min_rank": 9}, "peft.dylora_min_rank"),
    ({"eva_rho": 0.5}, "peft.eva_rho"),
])
def test_bad_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        peft.PeftConfig(**kwargs)
    with pytest.raises(ValueError, match="unknown peft config key"):
        peft.PeftConfig.from_dict({"rnak": 4})


def test_bad_apply():
    model = LanguageModel(CFG, nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"peft.targets = \('qproj',\) matches no linear layer.*'q_proj'"):
        peft.apply(model, peft.PeftConfig("lora", targets=("qproj",)), nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"peft.rank = 40 is larger than layer layers/0/attn/q_proj allows.*<= 32"):
        peft.apply(model, peft.PeftConfig("lora", rank=40, targets=("q_proj",)), nnx.Rngs(0))
    scanned = LanguageModel(ModelConfig(**{**CFG.to_dict(), "scan_layers": True}), nnx.Rngs(0))
    with pytest.raises(ValueError, match="scan_layers = False"):
        peft.apply(scanned, peft.PeftConfig("lora", targets=("q_proj",)), nnx.Rngs(0))
    with pytest.raises(ValueError, match="set_rank: the model has no DyLoRA layers"):
        peft.set_rank(model, 2)


def test_scaling_constants():
    assert peft.METHODS["lora"].scale(peft.PeftConfig(rank=4, alpha=8.0)) == 2.0
    assert peft.METHODS["rslora"].scale(peft.PeftConfig(rank=4, alpha=8.0)) == 8.0 / math.sqrt(4)


def test_merge_refuses_a_method_that_cannot_merge():
    class Gated(peft.METHODS["lora"]):
        method, mergeable = "gated_test", False

    model = Holder()
    layer = Gated(model.q_proj, peft.PeftConfig("lora", rank=2), nnx.Rngs(0), 0, "q_proj")
    model.q_proj = layer
    with pytest.raises(ValueError, match="'gated_test' cannot be merged into a kernel \\(layer q_proj\\)"):
        peft.merge(model)
