"""SLTrain layers (models/sltrain.py): the stratified support, the forward pass against NumPy, the
gradients, a tiny language model built with ``model.sltrain_rank`` (dispatch, counts, training,
generation, optimizer memory), config errors and ``optim.accounting``'s abstract SLTrain LLaMA."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from lolax import optim
from lolax.models import LanguageModel, ModelConfig, count_params, generate
from lolax.models.layers import dense, dtypes, sltrain
from lolax.models.sltrain import SLTrainLinear, sltrain_nnz, stratified_support, support_stream
from lolax.optim.accounting import llama_abstract_params

TINY = dict(d_model=32, num_layers=2, pattern="LS", num_heads=2)


def layer(d_in=24, d_out=20, rank=3, density=0.1, alpha=6.0, **kw):
    return SLTrainLinear(d_in, d_out, rank, density, alpha, rngs=nnx.Rngs(kw.pop("rng", 0)), **kw)


@pytest.fixture(scope="module")
def tiny_model():
    return LanguageModel(ModelConfig(**TINY, sltrain_rank=4), nnx.Rngs(0))


# ------------------------------------------------------------------------------------------------
# The support
# ------------------------------------------------------------------------------------------------

def test_support_is_nnz_distinct_indices_one_per_stretch():
    lin = layer()
    idx = np.asarray(lin.support())
    size, nnz = 24 * 20, sltrain_nnz(24, 20, 0.1)
    assert nnz == 48 and idx.shape == (nnz,) and idx.dtype == np.int32
    assert len(set(idx.tolist())) == nnz and np.all(np.diff(idx) > 0)
    assert idx.min() >= 0 and idx.max() < size
    # an uneven split: 100 entries into 7 stretches of lengths 15, 15, 14, ..., 14
    idx = np.asarray(stratified_support(100, 7, support_stream(0, 3)))
    edges = np.cumsum([0, 15, 15] + [14] * 5)
    assert np.all((edges[:-1] <= idx) & (idx < edges[1:])), idx


def test_support_is_fixed_across_calls_and_jit_and_differs_between_layers():
    a, b = layer(layer_id=0), layer(layer_id=1)
    first = np.asarray(a.support())
    assert np.array_equal(first, np.asarray(a.support()))
    assert np.array_equal(first, np.asarray(nnx.jit(lambda m: m.support())(a)))
    assert np.array_equal(first, np.asarray(layer(layer_id=0, rng=7).support()))    # Rngs do not move it
    assert not np.array_equal(first, np.asarray(b.support()))
    assert not np.array_equal(first, np.asarray(layer(layer_id=0, seed=1).support()))


def test_entries_are_drawn_uniformly():
    # 2000 layers' 12-of-60 supports: every entry's frequency is close to 12 / 60, and the offsets
    # inside the stretches of length 5 of one large support are close to uniform.
    draws = np.stack([np.asarray(stratified_support(60, 12, support_stream(0, i))) for i in range(2000)])
    freq = np.bincount(draws.ravel(), minlength=60) / 2000
    assert np.all(np.abs(freq - 0.2) < 0.05), freq
    offsets = np.asarray(stratified_support(500_000, 100_000, support_stream(1, 0))) % 5
    assert np.all(np.abs(np.bincount(offsets, minlength=5) / 100_000 - 0.2) < 0.005)


# ------------------------------------------------------------------------------------------------
# Forward, gradients, dtypes
# ------------------------------------------------------------------------------------------------

def test_forward_matches_numpy():
    lin = layer(use_bias=True)
    lin.bias[...] = jnp.linspace(-1.0, 1.0, 20)
    a, b = np.asarray(lin.lora_a[...], np.float64), np.asarray(lin.lora_b[...], np.float64)
    s = np.zeros(24 * 20)
    s[np.asarray(lin.support())] = np.asarray(lin.sparse_values[...], np.float64)
    w = (6.0 / 3) * a @ b + s.reshape(24, 20)
    x = np.asarray(jax.random.normal(jax.random.key(1), (5, 24)), np.float64)
    np.testing.assert_allclose(np.asarray(lin.dense_kernel()), w, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(lin(jnp.asarray(x, jnp.float32))), x @ w + np.linspace(-1, 1, 20),
                               rtol=1e-5, atol=1e-5)


def test_gradients_reach_every_factor_and_values_get_the_kernel_gradient_at_the_support():
    lin = layer()
    x = jax.random.normal(jax.random.key(2), (7, 24))
    f = lambda y: jnp.sum(jnp.sin(y) * jnp.arange(20.0))
    grads = nnx.grad(lambda m: f(m(x)))(lin)
    for name in ("lora_a", "lora_b", "sparse_values"):
        assert float(jnp.abs(grads[name][...]).max()) > 0, name
    dw = jax.grad(lambda w: f(x @ w))(lin.dense_kernel())
    np.testing.assert_allclose(np.asarray(grads["sparse_values"][...]),
                               np.asarray(dw.reshape(-1)[lin.support()]), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(grads["lora_a"][...]),
                               np.asarray(2.0 * dw @ lin.lora_b[...].T), rtol=1e-4, atol=1e-6)


def test_init_scale_matches_a_dense_projection_and_dtypes_follow_the_scope():
    lin = layer(128, 128, rank=16, density=0.03, alpha=32.0)
    w = np.asarray(lin.dense_kernel())
    assert 0.8 < w.var() * 128 < 1.2, w.var() * 128                # LeCun: variance 1 / fan_in
    with dtypes(jnp.bfloat16, jnp.float32), sltrain(2):
        half = dense(8, 6, ("embed", "mlp"), nnx.Rngs(0))
    assert isinstance(half, SLTrainLinear) and half.lora_a[...].dtype == jnp.float32
    assert half(jnp.ones((3, 8))).dtype == jnp.bfloat16


# ------------------------------------------------------------------------------------------------
# In a language model
# ------------------------------------------------------------------------------------------------

def test_model_dispatch_keeps_embedding_head_and_small_projections_dense(tiny_model):
    layers = [m for _, m in nnx.iter_graph(tiny_model) if isinstance(m, SLTrainLinear)]
    assert len(layers) == 2 * 7                                      # q k v o + gate up down, 2 blocks
    assert sorted(m.layer_id for m in layers) == list(range(14))
    assert isinstance(tiny_model.lm_head, nnx.Linear) and isinstance(tiny_model.embed, nnx.Embed)
    with pytest.raises(AttributeError, match="dense_kernel"):
        tiny_model.layers[0].attn.q_proj.kernel
    with sltrain(4):                # rank >= min(d_in, d_out), e.g. GDN's d_model -> heads gates: dense
        assert type(dense(32, 4, ("embed", "heads"), nnx.Rngs(0))) is nnx.Linear
        assert isinstance(dense(32, 5, ("embed", "heads"), nnx.Rngs(0)), SLTrainLinear)


def test_parameter_count_matches_hand_count(tiny_model):
    d, f, hd, v, r = 32, 96, 16, 256, 4
    sl = lambda m, n: m * r + r * n + round(0.03 * m * n)
    mlp = 2 * sl(d, f) + sl(f, d)
    blocks = (4 * sl(d, d) + hd) + 4 * sl(d, d) + 2 * (mlp + 2 * d)    # L (+ per-head norm), S
    assert count_params(tiny_model) == v * d + blocks + d + d * v == 22480


def test_adamw_state_is_smaller_than_the_dense_models():
    abstract = lambda **kw: nnx.state(nnx.eval_shape(lambda: LanguageModel(ModelConfig(**TINY, **kw),
                                                                            nnx.Rngs(0))), nnx.Param)
    tx = optim.adamw(1e-3)
    dense_b = optim.state_bytes(tx, abstract())["total"]["bytes"]
    slt_b = optim.state_bytes(tx, abstract(sltrain_rank=4))["total"]["bytes"]
    assert slt_b < dense_b
    assert dense_b - slt_b == 2 * 4 * (43184 - 22480)                 # two float32 moments per value


def test_tiny_model_trains_with_adamw(tiny_model):
    graphdef, params = nnx.split(tiny_model, nnx.Param)
    tx = optax.adamw(3e-3)
    tokens = jax.random.randint(jax.random.key(0), (2, 9), 0, 256)

    @jax.jit
    def step(params, opt):
        def loss(p):
            logits = nnx.merge(graphdef, p)(tokens[:, :-1])
            return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()
        value, grads = jax.value_and_grad(loss)(params)
        updates, opt = tx.update(grads, opt, params)
        return optax.apply_updates(params, updates), opt, value

    opt, losses = tx.init(params), []
    for _ in range(6):
        params, opt, value = step(params, opt)
        losses.append(float(value))
    assert all(b < a for a, b in zip(losses, losses[1:])), losses
    assert losses[-1] < losses[0] - 0.1, losses


def test_generation_matches_the_forward_pass(tiny_model):
    prompt = jax.random.randint(jax.random.key(1), (1, 4), 0, 256)
    tokens, logits = generate(tiny_model, prompt, 2, temperature=0.0, return_logits=True)
    ref = tiny_model(jnp.concatenate([prompt, tokens], 1))[0, 3:5]
    np.testing.assert_allclose(np.asarray(logits[0]), np.asarray(ref), rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("values,field", [
    ({"sltrain_rank": -1}, "model.sltrain_rank"),
    ({"sltrain_rank": True}, "model.sltrain_rank"),
    ({"sltrain_rank": 4, "sltrain_density": 0.0}, "model.sltrain_density"),
    ({"sltrain_density": 1.0}, "model.sltrain_density"),
    ({"sltrain_alpha": 0.0}, "model.sltrain_alpha"),
    ({"sltrain_rank": 4, "scan_layers": True}, "model.scan_layers"),
])
def test_config_errors_name_the_field(values, field):
    with pytest.raises(ValueError, match=field):
        ModelConfig(**TINY, **values)


# ------------------------------------------------------------------------------------------------
# Accounting without building a model
# ------------------------------------------------------------------------------------------------

def test_llama_abstract_params_with_sltrain():
    p = llama_abstract_params(hidden=64, ffn=160, layers=2, vocab=100, sltrain_rank=16, sltrain_density=0.05)
    layer0 = p["layers"]["layers_0"]
    shapes = lambda d: {k: v.shape for k, v in d.items()}
    assert shapes(layer0["attn"]["q_proj"]) == {"lora_a": (64, 16), "lora_b": (16, 64), "sparse_values": (205,)}
    assert shapes(layer0["mlp"]["down_proj"]) == {"lora_a": (160, 16), "lora_b": (16, 64),
                                                  "sparse_values": (512,)}
    assert p["lm_head"]["kernel"].shape == (64, 100) and p["embed"]["embedding"].shape == (100, 64)
    assert sltrain_nnz(64, 64, 0.05) == 205 and sltrain_nnz(160, 64, 0.05) == 512
    dense_p = llama_abstract_params(hidden=64, ffn=160, layers=2, vocab=100)
    assert dense_p["layers"]["layers_0"]["attn"]["q_proj"]["kernel"].shape == (64, 64)
    big_rank = llama_abstract_params(hidden=64, ffn=160, layers=1, vocab=100, sltrain_rank=64)
    assert set(big_rank["layers"]["layers_0"]["attn"]["q_proj"]) == {"kernel"}   # rank >= min side: dense
