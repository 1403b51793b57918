"""Data-driven adapters (``lolax.models.peft.data_init``): EVA and LoRA-SB.

Hand-checkable cases use a module with two ``nnx.Linear(6, 5)`` layers fed by the batch; the
tiny language model checks the default loss, early stopping and identity at initialisation.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lolax.models import LanguageModel, ModelConfig, peft
from lolax.models.peft.data_init import allocate_ranks

IN, OUT = 6, 5


class Tiny(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.q_proj = nnx.Linear(IN, OUT, rngs=rngs)
        self.v_proj = nnx.Linear(IN, OUT, rngs=rngs)

    def __call__(self, x, z):
        return self.q_proj(x), self.v_proj(z)


def tiny_loss(model, batch):
    y, w = model(batch["x"], batch["z"])
    return jnp.mean(jnp.square(y - batch["t"])) + jnp.mean(jnp.square(w))


def tiny_batch(seed, x=None, z=None, n=8):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, IN)) if x is None else x
    z = rng.normal(size=(n, IN)) if z is None else z
    return {"x": jnp.asarray(x, jnp.float32), "z": jnp.asarray(z, jnp.float32),
            "t": jnp.asarray(rng.normal(size=np.shape(x)[:-1] + (OUT,)), jnp.float32)}


def apply_tiny(method, data, **kw):
    model = Tiny(nnx.Rngs(0))
    kw.setdefault("targets", ("q_proj",))
    peft.apply(model, peft.PeftConfig(method, **kw), nnx.Rngs(1), data=data, loss_fn=tiny_loss)
    return model


def projector(cols):
    q, _ = np.linalg.qr(np.asarray(cols, np.float64))
    return q @ q.T


def top_right(x, r):
    return np.linalg.svd(np.asarray(x, np.float64), full_matrices=False)[2][:r].T      # [in, r]


def spectrum_batch(seed, sq_singular, n=8):
    """[n, IN] rows with the given squared singular values (so sum of squares = their sum)."""
    rng = np.random.default_rng(seed)
    k = len(sq_singular)
    u = np.linalg.qr(rng.normal(size=(n, k)))[0]
    v = np.linalg.qr(rng.normal(size=(IN, k)))[0]
    return u @ np.diag(np.sqrt(sq_singular)) @ v.T


# -- EVA ---------------------------------------------------------------------------------------

def test_eva_single_batch_is_top_right_singular_vectors():
    x = np.random.default_rng(0).normal(size=(3, 4, IN))           # any leading axes: 12 tokens
    model = apply_tiny("eva", [tiny_batch(0, x=x)], rank=2, init_batches=1)
    layer = model.q_proj
    a = np.asarray(layer.lora_a[...])
    assert layer.rank == 2 and a.shape == (IN, 2) and layer.lora_b.shape == (2, OUT)
    assert not np.any(np.asarray(layer.lora_b[...]))
    np.testing.assert_allclose(a.T @ a, np.eye(2), atol=1e-5)
    np.testing.assert_allclose(projector(a), projector(top_right(x.reshape(-1, IN), 2)), atol=1e-5)
    assert layer.eva_batches == 1 and layer.scaling == 16.0 / 2


def test_eva_incremental_svd_matches_svd_of_all_batches():
    # Inputs in a 4-dim subspace (the 4 components kept carry everything), but each batch
    # stresses it differently, so the leading directions move from batch to batch.
    rng = np.random.default_rng(1)
    basis = np.linalg.qr(rng.normal(size=(IN, 4)))[0].T                 # [4, IN]
    xs = [rng.normal(size=(8, 4)) * scale @ basis
          for scale in ([3.0, 1.0, 0.5, 0.2], [0.5, 4.0, 1.0, 0.3], [1.0, 0.5, 5.0, 2.0])]
    model = apply_tiny("eva", [tiny_batch(i, x=x) for i, x in enumerate(xs)], rank=2, eva_rho=2.0,
                       init_batches=3, eva_threshold=1.0)
    layer = model.q_proj
    assert layer.eva_batches == 3
    a = np.asarray(layer.lora_a[...])
    ref = top_right(np.concatenate(xs), 2)
    np.testing.assert_allclose(np.abs(np.sum(a * ref, axis=0)), 1.0, atol=1e-4)       # each, up to sign
    np.testing.assert_allclose(projector(a), projector(ref), atol=1e-4)


@pytest.mark.parametrize("rho, expected", [(2.0, (1, 3)), (1.5, (1, 3)), (1.0, (2, 2))])
def test_eva_rank_redistribution(rho, expected):
    # q_proj's inputs have explained-variance ratios (0.7, 0.2, 0.1), v_proj's (0.25,) * 4:
    # the budget of 2 * 2 gives each layer its first direction, then the two largest of the
    # rest, both v_proj's (0.25 > 0.2), unless the cap floor(rho * 2) stops v_proj at 2.
    batch = tiny_batch(2, x=spectrum_batch(3, [0.7, 0.2, 0.1]), z=spectrum_batch(4, [0.25] * 4))
    model = apply_tiny("eva", [batch], rank=2, eva_rho=rho, init_batches=1, targets=("q_proj", "v_proj"))
    ranks = (model.q_proj.rank, model.v_proj.rank)
    assert ranks == expected
    assert sum(ranks) == 2 * 2 and max(ranks) <= int(rho * 2)
    for layer, r in zip((model.q_proj, model.v_proj), ranks):
        assert layer.lora_a.shape == (IN, r) and layer.lora_b.shape == (r, OUT)
    assert peft.count(model)["trainable"] == sum(r * (IN + OUT) for r in ranks)
    np.testing.assert_allclose(model.q_proj.eva_explained, 0.7 if ranks[0] == 1 else 0.9, atol=1e-5)


def test_allocate_ranks():
    ratios = [np.array([0.5, 0.3, 0.2]), np.array([0.9, 0.05]), np.array([0.4, 0.35, 0.15, 0.1])]
    assert allocate_ranks(ratios, 6) == [3, 1, 2]       # forced 0.5, 0.9, 0.4; then 0.35, 0.3, 0.2
    assert allocate_ranks(ratios, 3) == [1, 1, 1]
    assert allocate_ranks(ratios, 20) == [3, 2, 4]      # every candidate, fewer than the budget


def test_eva_stops_once_converged():
    pulled = []

    def same_batch():                                  # counts what EVA reads
        while True:
            pulled.append(1)
            yield tiny_batch(5)

    model = apply_tiny("eva", same_batch(), rank=2, init_batches=6, eva_threshold=0.99)
    assert model.q_proj.eva_batches == 2 and len(pulled) == 2


# -- LoRA-SB -----------------------------------------------------------------------------------

def tiny_kernel_grad(model, batches):
    """d tiny_loss / d q_proj.kernel averaged over ``batches``, by hand, in float64."""
    w = np.asarray(model.q_proj.kernel[...], np.float64)
    b = np.asarray(model.q_proj.bias[...], np.float64)
    grads = []
    for batch in batches:
        x, t = np.asarray(batch["x"], np.float64), np.asarray(batch["t"], np.float64)
        grads.append(x.T @ (2.0 * (x @ w + b - t) / t.size))
    return np.mean(grads, axis=0)


def truncate(g, r):
    u, s, vt = np.linalg.svd(g, full_matrices=False)
    return u[:, :r] @ np.diag(s[:r]) @ vt[:r], u[:, :r], vt[:r].T


def test_lora_sb_bases_span_top_gradient_subspace():
    data = [tiny_batch(i) for i in range(3)]
    model = apply_tiny("lora_sb", data, rank=2, init_batches=2)         # reads the first two only
    layer = model.q_proj
    _, u, v = truncate(-tiny_kernel_grad(Tiny(nnx.Rngs(0)), data[:2]), 2)
    b_in, a_out = np.asarray(layer.sb_in[...]), np.asarray(layer.sb_out[...])
    assert b_in.shape == (IN, 2) and a_out.shape == (2, OUT) and layer.sb_batches == 2
    np.testing.assert_allclose(projector(b_in), projector(u), atol=1e-4)
    np.testing.assert_allclose(projector(a_out.T), projector(v), atol=1e-4)
    assert not np.any(np.asarray(layer.sb_core[...]))
    assert peft.count(model) == {"trainable": 4, "buffers": 2 * (IN + OUT),
                                 "base": 2 * (IN * OUT + OUT), "total": 4 + 22 + 70}


def test_lora_sb_init_step_is_truncated_gradient_step():
    data = [tiny_batch(i) for i in range(2)]
    eta = 0.5
    model = apply_tiny("lora_sb", data, rank=3, init_batches=2, lora_sb_init_step=eta)
    g = tiny_kernel_grad(Tiny(nnx.Rngs(0)), data)
    trunc, _, _ = truncate(g, 3)
    np.testing.assert_allclose(np.asarray(model.q_proj.delta()), -eta * trunc, atol=1e-5)
    x = data[0]["x"]
    base = Tiny(nnx.Rngs(0)).q_proj(x)
    np.testing.assert_allclose(model.q_proj(x), base + x @ model.q_proj.delta(), atol=1e-5)


# -- both --------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["eva", "lora_sb"])
def test_identity_gradients_and_merge(method):
    data = [tiny_batch(i) for i in range(2)]
    model = apply_tiny(method, data, rank=2, init_batches=2, targets=("q_proj", "v_proj"))
    base = Tiny(nnx.Rngs(0))
    batch = tiny_batch(9)
    for a, b in zip(model(batch["x"], batch["z"]), base(batch["x"], batch["z"])):
        assert bool(jnp.all(a == b))

    grads = nnx.grad(tiny_loss, argnums=nnx.DiffState(0, peft.trainable()))(model, batch)
    names = {path[-1] for path, _ in nnx.to_flat_state(grads)}
    assert names == ({"lora_a", "lora_b"} if method == "eva" else {"sb_core"})
    assert any(float(jnp.max(jnp.abs(g))) > 0 for g in jax.tree.leaves(grads))

    params = nnx.state(model, peft.trainable())
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(0), len(leaves))
    nnx.update(model, jax.tree.unflatten(treedef, [p + 0.1 * jax.random.normal(k, p.shape)
                                                   for p, k in zip(leaves, keys)]))
    merged = peft.merge(model)
    assert not peft.adapted_layers(merged)
    adapted = model(batch["x"], batch["z"])
    for a, b, c in zip(merged(batch["x"], batch["z"]), adapted, base(batch["x"], batch["z"])):
        np.testing.assert_allclose(a, b, atol=1e-5)
        assert float(jnp.max(jnp.abs(b - c))) > 1e-3                 # the perturbation shows

    layers = [m for _, m in peft.adapted_layers(model)]
    per_layer = [l.rank * (IN + OUT) for l in layers] if method == "eva" else [2 * 2] * 2
    assert peft.count(model)["trainable"] == sum(per_layer)


@pytest.mark.parametrize("method", ["eva", "lora_sb"])
def test_needs_data(method):
    with pytest.raises(ValueError, match="data"):
        apply_tiny(method, None, rank=2)
    with pytest.raises(ValueError, match="no batches"):
        apply_tiny(method, [], rank=2)


# -- the language model ------------------------------------------------------------------------

def lm_batch(seed):
    tokens = jax.random.randint(jax.random.key(seed), (2, 17), 0, 256)
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}


@pytest.fixture(scope="module")
def lm():
    model = LanguageModel(ModelConfig(d_model=32, num_layers=2, pattern="LS", num_heads=2), nnx.Rngs(0))
    tokens = lm_batch(99)["inputs"]
    return model, tokens, model(tokens)


def test_eva_language_model(lm):
    base, tokens, before = lm
    model = nnx.clone(base)
    cfg = peft.PeftConfig("eva", rank=4, targets=("q_proj", "v_proj"), init_batches=5)
    peft.apply(model, cfg, nnx.Rngs(1), data=[lm_batch(0)] * 5)      # the same batch: converges at 2
    assert bool(jnp.all(model(tokens) == before))
    layers = [m for _, m in peft.adapted_layers(model)]
    assert len(layers) == 4 and all(l.eva_batches == 2 for l in layers)
    ranks = [l.rank for l in layers]
    assert sum(ranks) == 4 * 4 and all(1 <= r <= 8 for r in ranks)
    assert peft.count(model)["trainable"] == sum(r * (32 + 32) for r in ranks)


def test_lora_sb_language_model(lm):
    base, tokens, before = lm
    model = nnx.clone(base)
    cfg = peft.PeftConfig("lora_sb", rank=4, targets=("q_proj", "v_proj"), init_batches=2)
    peft.apply(model, cfg, nnx.Rngs(1), data=[lm_batch(0), lm_batch(1)])
    assert bool(jnp.all(model(tokens) == before))
    assert peft.count(model)["trainable"] == 4 * 4 * 4
    layer = model.layers[0].attn.q_proj
    b_in = np.asarray(layer.sb_in[...])
    np.testing.assert_allclose(b_in.T @ b_in, np.eye(4), atol=1e-5)
