"""SVFit and LoLDU: factors against NumPy, exact identity at init, gradients, merge, counts, rank check."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lolax.models import LanguageModel, ModelConfig, peft

TOKENS = jnp.array([[1, 5, 9, 2, 7, 3, 4, 8]], jnp.int32)
TARGETS = ("q_proj", "v_proj")


class Tiny(nnx.Module):
    def __init__(self, d_in=6, d_out=5, seed=0):
        self.q_proj = nnx.Linear(d_in, d_out, rngs=nnx.Rngs(seed))

    def __call__(self, x):
        return self.q_proj(x)


def tiny(method, rank, d_in=6, d_out=5):
    model = Tiny(d_in, d_out)
    w0 = np.asarray(model.q_proj.kernel[...], np.float64)
    b = np.asarray(model.q_proj.bias[...], np.float64)
    peft.apply(model, peft.PeftConfig(method, rank=rank, targets=("q_proj",)), nnx.Rngs(1))
    return model, w0, b


def small_lm():
    return LanguageModel(ModelConfig(d_model=32, num_layers=2, pattern="LS", num_heads=2), nnx.Rngs(0))


def x_of(d_in=6, n=3):
    return jax.random.normal(jax.random.key(7), (n, d_in), jnp.float32)


# -- hand-computed examples ------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(6, 5), (5, 6)])
def test_svfit_buffers_are_numpys_top_svd(shape):
    r = 3
    model, w0, b = tiny("svfit", r, *shape)
    layer = model.q_proj
    u, s, vt = np.linalg.svd(w0, full_matrices=False)
    np.testing.assert_allclose(np.asarray(layer.singular_values[...]), s[:r], rtol=1e-5)
    got = np.asarray(layer.svd_u[...]) * np.asarray(layer.singular_values[...]) @ np.asarray(layer.svd_vt[...])
    np.testing.assert_allclose(got, (u[:, :r] * s[:r]) @ vt[:r], atol=1e-5)
    # Each direction on its own (signs of u_i, v_i may flip together, the outer product may not).
    for i in range(r):
        np.testing.assert_allclose(np.outer(layer.svd_u[:, i], layer.svd_vt[i]), np.outer(u[:, i], vt[i]), atol=1e-5)
    np.testing.assert_allclose(np.asarray(layer.svd_u[...]).T @ np.asarray(layer.svd_u[...]), np.eye(r), atol=1e-5)

    d = np.array([0.5, -1.0, 2.0])
    layer.sigma_delta[...] = jnp.asarray(d, jnp.float32)
    x = x_of(shape[0])
    want = np.asarray(x, np.float64) @ (w0 + (u[:, :r] * d) @ vt[:r]) + b
    np.testing.assert_allclose(np.asarray(model(x)), want, atol=1e-5)
    np.testing.assert_allclose(np.asarray(layer.delta()), (u[:, :r] * d) @ vt[:r], atol=1e-5)


@pytest.mark.parametrize("shape", [(6, 5), (5, 6)])
def test_loldu_factors_reconstruct_and_output_matches_numpy(shape):
    k = min(shape)
    model, w0, b = tiny("loldu", k, *shape)                    # full rank: P L D U is W0 itself
    layer = model.q_proj
    lower, upper = np.asarray(layer.ldu_l[...], np.float64), np.asarray(layer.ldu_u[...], np.float64)
    d0 = np.asarray(layer.ldu_diag[...], np.float64)
    np.testing.assert_allclose((lower * d0) @ upper, w0, atol=1e-5)
    np.testing.assert_allclose(np.diag(upper[:, :k]), np.ones(k), atol=1e-6)     # unit upper-triangular
    np.testing.assert_allclose(np.tril(upper[:, :k], -1), 0.0, atol=0)
    assert float(layer.ldu_scale[...]) == 0.0 and layer.ldu_scale[...].shape == ()

    # Against NumPy's own Doolittle elimination with partial pivoting.
    a, perm = w0.copy(), np.arange(shape[0])
    for j in range(k):
        p = j + int(np.argmax(np.abs(a[j:, j])))
        a[[j, p]], perm[[j, p]] = a[[p, j]], perm[[p, j]]
        a[j + 1:, j] /= a[j, j]
        a[j + 1:, j + 1:] -= np.outer(a[j + 1:, j], a[j, j + 1:])
    l_ref = np.tril(a[:, :k], -1) + np.eye(shape[0], k)
    u_full = np.triu(a[:k])
    pl_ref = np.zeros_like(l_ref)
    pl_ref[perm] = l_ref
    np.testing.assert_allclose(d0, np.diag(u_full), rtol=1e-5)
    np.testing.assert_allclose(lower, pl_ref, atol=1e-5)
    np.testing.assert_allclose(upper, u_full / np.diag(u_full)[:, None], atol=1e-5)

    r = 2                                                        # rank r keeps the first r of each factor
    model_r, _, _ = tiny("loldu", r, *shape)
    np.testing.assert_allclose(np.asarray(model_r.q_proj.ldu_l[...]), lower[:, :r], atol=1e-6)
    np.testing.assert_allclose(np.asarray(model_r.q_proj.ldu_u[...]), upper[:r], atol=1e-6)
    z, s = np.array([1.5, -0.25]), 0.3
    model_r.q_proj.ldu_diag[...] = jnp.asarray(z, jnp.float32)
    model_r.q_proj.ldu_scale[...] = jnp.asarray(s, jnp.float32)
    x = x_of(shape[0])
    want = np.asarray(x, np.float64) @ (w0 + s * (lower[:, :r] * z) @ upper[:r]) + b
    np.testing.assert_allclose(np.asarray(model_r(x)), want, atol=1e-5)


def test_loldu_zero_pivot_still_reconstructs():
    from lolax.models.peft.decomposition import ldu
    w = np.array([[1.0, 2.0, 3.0], [2.0, 4.0, 6.0], [1.0, 2.0, 4.0]], np.float32)    # rank 2: a zero pivot
    pl, d, u = (np.asarray(t) for t in ldu(jnp.asarray(w)))
    assert np.all(np.isfinite(u)) and np.all(d != 0)
    np.testing.assert_allclose((pl * d) @ u, w, atol=1e-5)


# -- on a language model ---------------------------------------------------------------------------

class TwoLayer(nnx.Module):
    def __init__(self):
        self.q_proj = nnx.Linear(6, 5, rngs=nnx.Rngs(0))
        self.v_proj = nnx.Linear(5, 4, rngs=nnx.Rngs(1))

    def __call__(self, x):
        return self.v_proj(jnp.tanh(self.q_proj(x)))


@pytest.mark.parametrize("method", ["svfit", "loldu"])
def test_gradients_reach_only_adapters(method):
    model = peft.apply(TwoLayer(), peft.PeftConfig(method, rank=3, targets=TARGETS), nnx.Rngs(1))
    x = x_of()

    def loss(m):
        return jnp.mean(jnp.square(m(x) - 1.0))

    grads = nnx.grad(loss, argnums=nnx.DiffState(0, peft.trainable()))(model)
    flat = {tuple(str(p) for p in path): v for path, v in nnx.to_flat_state(grads)}
    trained = {"sigma_delta"} if method == "svfit" else {"ldu_diag", "ldu_scale"}
    assert set(flat) == {(layer, name) for layer in TARGETS for name in trained}
    assert all(isinstance(v, peft.Adapter) for v in flat.values())      # no kernel, bias or buffer
    if method == "loldu":
        for layer in TARGETS:
            assert float(flat[(layer, "ldu_scale")][...]) != 0.0             # the zero gain still learns at step 0
            assert float(jnp.abs(flat[(layer, "ldu_diag")][...]).max()) == 0.0   # dW/dz = s * ... = 0 at init
    else:
        assert all(float(jnp.abs(v[...]).max()) > 0.0 for v in flat.values())


@pytest.mark.parametrize("method", ["svfit", "loldu"])
def test_exact_at_init_and_merge(method):
    model = small_lm()
    before = model(TOKENS)
    peft.apply(model, peft.PeftConfig(method, rank=4, targets=TARGETS), nnx.Rngs(1))
    assert len(peft.adapted_layers(model)) == 4
    assert bool(jnp.all(model(TOKENS) == before))

    # Perturb the trainable params, then merged forward == adapted forward.
    state = nnx.state(model, peft.trainable())
    keys = iter(jax.random.split(jax.random.key(3), 64))
    nnx.update(model, jax.tree.map(lambda v: v + 0.1 * jax.random.normal(next(keys), v.shape), state))
    adapted = model(TOKENS)
    assert not bool(jnp.allclose(adapted, before, atol=1e-4))
    merged = peft.merge(model)
    assert not peft.adapted_layers(merged)
    np.testing.assert_allclose(np.asarray(merged(TOKENS)), np.asarray(adapted), atol=1e-5)


def test_count():
    d, r, layers = 32, 4, 2 * len(TARGETS)
    base = peft.count(small_lm())["base"]
    svfit = peft.apply(small_lm(), peft.PeftConfig("svfit", rank=r, targets=TARGETS), nnx.Rngs(1))
    assert peft.count(svfit) == {"trainable": layers * r, "buffers": layers * (d * r + r * d + r), "base": base,
                                 "total": base + layers * (r + 2 * d * r + r)}
    loldu = peft.apply(small_lm(), peft.PeftConfig("loldu", rank=r, targets=TARGETS), nnx.Rngs(1))
    assert peft.count(loldu) == {"trainable": layers * (r + 1), "buffers": layers * 2 * d * r, "base": base,
                                 "total": base + layers * (r + 1 + 2 * d * r)}


@pytest.mark.parametrize("method", ["svfit", "loldu"])
def test_rank_above_min_dim_raises(method):
    with pytest.raises(ValueError, match="peft.rank"):
        peft.apply(Tiny(6, 5), peft.PeftConfig(method, rank=6, targets=("q_proj",)), nnx.Rngs(1))
    cls = peft.METHODS[method]                                    # also when built directly
    with pytest.raises(ValueError, match="peft.rank"):
        cls(nnx.Linear(6, 5, rngs=nnx.Rngs(0)), peft.PeftConfig(method, rank=6), nnx.Rngs(1), 0, "q_proj")
