"""NOLA and RandLoRA (``lolax.models.peft.random_bases``): frozen random bases regenerated from
the seed, never stored; only coefficients / diagonal scalings train.

The float32 language-model tests share one tiny model with both methods applied (NOLA on
``q_proj``, RandLoRA on ``v_proj``), to compile it once: every adapted layer adds its random
draws (forward and backward) to the compilation.
"""

import math

import jax
import jax.ad_checkpoint
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lolax.models import LanguageModel, ModelConfig, peft
from lolax.models.peft import core, random_bases

TOKENS = jnp.array([[3, 17, 42, 5, 99, 7, 1, 250]], jnp.int32)
TRAINABLE = {"nola": {"coef_a", "coef_b"}, "randlora": {"lambdas", "gammas"}}
TARGETS = {"nola": ("q_proj",), "randlora": ("v_proj",)}
_forward = nnx.jit(lambda model, tokens: model(tokens))


class _Holder(nnx.Module):
    def __init__(self, d_in, d_out, seed=0, pair=False):
        self.q_proj = nnx.Linear(d_in, d_out, rngs=nnx.Rngs(seed))
        self.q_proj.bias[...] = jnp.asarray(np.random.default_rng(seed).normal(size=d_out), jnp.float32)
        if pair:
            self.v_proj = nnx.Linear(d_in, d_out, rngs=nnx.Rngs(seed + 1))

    def __call__(self, x):
        return self.q_proj(x)


def _single(method, d_in=6, d_out=5, **kw):
    holder = _Holder(d_in, d_out)
    w0, b0 = np.asarray(holder.q_proj.kernel[...]), np.asarray(holder.q_proj.bias[...])
    peft.apply(holder, peft.PeftConfig(method, targets=("q_proj",), **kw), nnx.Rngs(1))
    return holder, w0, b0


def _perturb(model, seed=0, scale=0.3):
    """Adds noise to every trainable adapter parameter, in place (NumPy noise: nothing to compile)."""
    rng = np.random.default_rng(seed)
    state = nnx.state(model, peft.trainable())
    nnx.update(model, jax.tree.map(lambda x: x + jnp.asarray(scale * rng.normal(size=x.shape), x.dtype), state))


def _names(state):
    return {str(path[-2].key) for path, _ in jax.tree_util.tree_flatten_with_path(state)[0]}


@pytest.fixture(scope="module")
def lm():
    """The adapted model and the unadapted model's logits."""
    model = LanguageModel(ModelConfig(d_model=32, num_layers=1, pattern="S", num_heads=2), nnx.Rngs(0))
    before = _forward(model, TOKENS)
    for method in ("nola", "randlora"):
        peft.apply(model, peft.PeftConfig(method, rank=4, targets=TARGETS[method]), nnx.Rngs(1))
    return model, before


def _layers(model, method):
    return [m for _, m in peft.adapted_layers(model) if m.method == method]


# -- hand-computed examples ---------------------------------------------------------------------
def test_nola_hand_computed():
    holder, w0, b0 = _single("nola", rank=2, alpha=3.0, num_bases=3, seed=7)
    layer = holder.q_proj
    layer.coef_a[...] = jnp.array([0.5, -1.0, 2.0])
    layer.coef_b[...] = jnp.array([1.0, 0.25, -0.5])
    a_i, b_j = (np.asarray(x) for x in layer.bases())
    assert a_i.shape == (3, 6, 2) and b_j.shape == (3, 2, 5)
    # the documented key derivation, independently of the layer (equal up to float rounding)
    key_a, key_b = core.layer_key(7, 0, "nola_a"), core.layer_key(7, 0, "nola_b")
    np.testing.assert_allclose(a_i, np.asarray(jax.random.normal(key_a, (36,))).reshape(3, 6, 2) / math.sqrt(6),
                               rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(b_j, np.asarray(jax.random.normal(key_b, (30,))).reshape(3, 2, 5) / math.sqrt(2),
                               rtol=1e-6, atol=1e-7)
    a = 0.5 * a_i[0] - 1.0 * a_i[1] + 2.0 * a_i[2]
    b = 1.0 * b_j[0] + 0.25 * b_j[1] - 0.5 * b_j[2]
    x = np.asarray(jax.random.normal(jax.random.key(3), (4, 6)))
    want = x @ w0 + b0 + (3.0 / 2) * (x @ a) @ b
    np.testing.assert_allclose(np.asarray(holder(jnp.asarray(x))), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(layer.delta()), 1.5 * a @ b, rtol=1e-5, atol=1e-6)


def test_randlora_hand_computed():
    holder, w0, b0 = _single("randlora", rank=2, alpha=3.0, seed=7)
    layer = holder.q_proj
    n = layer.num_bases
    assert n == math.ceil(5 / 2)
    lam = np.arange(1, n * 2 + 1, dtype=np.float32).reshape(n, 2) / 4 - 0.7
    gam = np.linspace(-1.0, 1.5, n * 6, dtype=np.float32).reshape(n, 6)
    layer.lambdas[...] = jnp.asarray(lam)
    layer.gammas[...] = jnp.asarray(gam)
    a_t, b_t = (np.asarray(x) for x in layer.bases())
    assert a_t.shape == (6, 2) and b_t.shape == (n, 2, 5)
    key_a, key_b = core.layer_key(7, 0, "randlora_a"), core.layer_key(7, 0, "randlora_b")
    np.testing.assert_allclose(a_t, np.asarray(jax.random.normal(key_a, (12,))).reshape(6, 2) / math.sqrt(6),
                               rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(b_t, np.asarray(jax.random.normal(key_b, (n * 10,))).reshape(n, 2, 5) / math.sqrt(2),
                               rtol=1e-6, atol=1e-7)
    # the paper's layout: W [out, in], dW = s sum_i B_i diag(lambda_i) A diag(gamma_i)
    a_math = a_t.T                                                       # [r, in]
    dw_math = (3.0 / 2) * sum(b_t[i].T @ np.diag(lam[i]) @ a_math @ np.diag(gam[i]) for i in range(n))
    x = np.asarray(jax.random.normal(jax.random.key(3), (4, 6)))
    want = x @ (w0 + dw_math.T) + b0
    np.testing.assert_allclose(np.asarray(holder(jnp.asarray(x))), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(layer.delta()), dw_math.T, rtol=1e-5, atol=1e-6)


# -- bases: deterministic, per layer, not stored -----------------------------------------------
@pytest.mark.parametrize("method", ["nola", "randlora"])
def test_bases_regenerated_not_stored(method, lm):
    model, _ = lm
    (layer,) = _layers(model, method)
    first = layer.bases()
    again = layer.bases()
    jitted = nnx.jit(lambda m: m.bases())(layer)
    for x, y, z in zip(first, again, jitted):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
        np.testing.assert_array_equal(np.asarray(x), np.asarray(z))
    pair = _Holder(6, 5, pair=True)
    peft.apply(pair, peft.PeftConfig(method, rank=2, targets=("q_proj", "v_proj")), nnx.Rngs(1))
    assert (pair.q_proj.layer_id, pair.v_proj.layer_id) == (0, 1)
    for x, y in zip(pair.q_proj.bases(), pair.v_proj.bases()):        # same shapes, other draws
        assert x.shape == y.shape and not np.allclose(np.asarray(x), np.asarray(y))
    # only the trainable coefficients are in the state: no bases, no buffers
    assert _names(nnx.state(model, peft.ADAPTER_STATE)) == TRAINABLE["nola"] | TRAINABLE["randlora"]
    assert isinstance(layer.seed, int) and isinstance(layer.layer_id, int)
    state_shapes = {x.shape for x in jax.tree.leaves(nnx.state(model))}
    if method == "nola":
        assert first[0].shape == (64, 32, 4) and first[1].shape == (64, 4, 32)
    else:
        assert layer.num_bases == 8 and first[1].shape == (8, 4, 32)
    assert not state_shapes & {x.shape for x in first}
    counts = peft.count(model)
    assert counts["trainable"] == 2 * 64 + 8 * (4 + 32)                  # NOLA 2k, RandLoRA n (r + in)
    assert counts["buffers"] == 0


@pytest.mark.parametrize("method", ["nola", "randlora"])
def test_bases_same_eager_and_jit_forward(method):
    holder, _, _ = _single(method, rank=2, num_bases=3 if method == "nola" else 0)
    _perturb(holder, scale=1.0)
    x = jax.random.normal(jax.random.key(3), (4, 6))
    np.testing.assert_allclose(np.asarray(nnx.jit(lambda m, x: m(x))(holder, x)), np.asarray(holder(x)),
                               rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("method", ["nola", "randlora"])
def test_backward_saves_no_bases(method, capsys):
    holder, _, _ = _single(method, rank=2)
    _perturb(holder)
    graphdef, params, rest = nnx.split(holder, peft.trainable(), ...)

    def loss(params, x):
        return jnp.sum(nnx.merge(graphdef, params, rest)(x) ** 2)

    capsys.readouterr()
    jax.ad_checkpoint.print_saved_residuals(loss, params, jnp.ones((4, 6)))
    saved = capsys.readouterr().out
    assert "from the argument x" in saved
    n = holder.q_proj.num_bases
    forbidden = {"nola": [f"f32[{n},6,2]", f"f32[{n},2,5]"],
                 # not even A^T [in, r] or the scaled blocks [n, in, r] / [n, r, out]
                 "randlora": ["f32[6,2]", f"f32[{n},6,2]", f"f32[{n},2,5]"]}[method]
    for shape in forbidden:
        assert shape not in saved, saved


# -- identity, gradients, merge ------------------------------------------------------------------
def test_identity_grads_merge(lm):
    model, before = lm
    model = nnx.clone(model)
    targets = jnp.roll(TOKENS, -1, axis=1)

    def loss(m):
        logits = m(TOKENS)
        logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        return -jnp.mean(jnp.take_along_axis(logp, targets[..., None], axis=-1)), logits

    # one compilation gives the logits (for the identity and after perturbing) and the gradients
    step = nnx.jit(nnx.value_and_grad(loss, argnums=nnx.DiffState(0, peft.trainable()), has_aux=True))
    (_, logits), grads = step(model)
    assert bool(jnp.all(logits == before))                               # exact identity at init
    assert _names(grads) == TRAINABLE["nola"] | TRAINABLE["randlora"]    # no base kernel requested
    flat = jax.tree_util.tree_flatten_with_path(grads)[0]
    assert all(bool(jnp.all(jnp.isfinite(g))) for _, g in flat)
    # at init only the side facing the zero factor moves: NOLA's coef_b, RandLoRA's lambdas
    for path, g in flat:
        moving = str(path[-2].key) in ("coef_b", "lambdas")
        assert (float(jnp.max(jnp.abs(g))) > 0) == moving, jax.tree_util.keystr(path)

    _perturb(model, seed=1)
    adapted = step(model)[0][1]
    assert not np.allclose(np.asarray(adapted), np.asarray(before), atol=1e-3)
    merged = peft.merge(model)
    assert not peft.adapted_layers(merged)
    np.testing.assert_allclose(np.asarray(_forward(merged, TOKENS)), np.asarray(adapted), rtol=1e-5, atol=1e-5)


def test_randlora_default_is_full_rank():
    for d_in, d_out, rank in ((6, 5, 2), (5, 7, 2)):
        holder, _, _ = _single("randlora", d_in=d_in, d_out=d_out, rank=rank)
        layer = holder.q_proj
        assert layer.num_bases == math.ceil(min(d_in, d_out) / rank)
        _perturb(holder, seed=d_in * 10 + d_out, scale=1.0)
        assert np.linalg.matrix_rank(np.asarray(layer.delta())) == min(d_in, d_out)
    holder, _, _ = _single("nola", rank=2, num_bases=3)                   # NOLA stays at rank r
    _perturb(holder, scale=1.0)
    assert np.linalg.matrix_rank(np.asarray(holder.q_proj.delta())) == 2


def test_bf16_compute():
    model = LanguageModel(ModelConfig(d_model=32, num_layers=1, pattern="S", num_heads=2, dtype="bfloat16"),
                          nnx.Rngs(0))
    for method in ("nola", "randlora"):
        peft.apply(model, peft.PeftConfig(method, rank=4, targets=TARGETS[method]), nnx.Rngs(1))
    _perturb(model)
    out = _forward(model, TOKENS)
    assert bool(jnp.all(jnp.isfinite(out.astype(jnp.float32))))
    x = jnp.ones((2, 32), jnp.bfloat16)
    for method in ("nola", "randlora"):
        layer = _layers(model, method)[0]
        assert layer(x).dtype == jnp.bfloat16
        correction = layer.adapter(x)
        assert correction.dtype == jnp.bfloat16 and float(jnp.max(jnp.abs(correction))) > 0
        np.testing.assert_allclose(np.asarray(correction, np.float32), np.asarray(x @ layer.delta()),
                                   rtol=0.05, atol=0.05)
    assert random_bases.NOLA_DEFAULT_BASES == 64
