"""Feature maps: their defining identities, shapes and positivity."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lolax.ops import feature_maps as fm
from lolax.ops.linear_attn import naive_linear_attn


def _x(shape, seed=0):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape).astype(np.float32))


@pytest.mark.parametrize("compact", [False, True])
def test_taylor_kernel_identity(compact):
    d = 16
    q, k = _x((5, d), 1), _x((7, d), 2)
    phi_q, phi_k = fm.based_taylor(q, compact), fm.based_taylor(k, compact)
    assert phi_q.shape == (5, fm.based_taylor_dim(d, compact))
    assert fm.based_taylor_dim(16) == 273 and fm.based_taylor_dim(16, True) == 153
    dot = q @ k.T
    expected = 1 + dot / math.sqrt(d) + dot ** 2 / (2 * d)
    np.testing.assert_allclose(phi_q @ phi_k.T, expected, rtol=1e-5, atol=1e-5)


def test_taylor_full_and_compact_agree():
    q, k = _x((3, 2, 8), 3), _x((3, 2, 8), 4)
    full = jnp.sum(fm.based_taylor(q) * fm.based_taylor(k), -1)
    compact = jnp.sum(fm.based_taylor(q, True) * fm.based_taylor(k, True), -1)
    np.testing.assert_allclose(full, compact, rtol=1e-5)


def test_elu_plus_one_and_relu():
    x = _x((4, 9))
    np.testing.assert_allclose(fm.elu_plus_one(x), np.where(x > 0, x + 1, np.exp(x)), rtol=1e-6)
    assert np.all(np.asarray(fm.elu_plus_one(x)) > 0)
    np.testing.assert_array_equal(fm.relu(x), np.maximum(x, 0))
    np.testing.assert_array_equal(fm.identity(x), x)
    w, b = _x((9, 5), 5), _x((5,), 6)
    np.testing.assert_allclose(fm.relu(x, w, b, clamp_min=1e-12),
                               np.maximum(np.asarray(x) @ np.asarray(w) + np.asarray(b), 1e-12),
                               rtol=1e-5, atol=1e-6)


def test_hedgehog_lolcats_form():
    x = _x((2, 6, 3, 8))                      # [B, T, H, D]
    w = _x((3, 8, 4), 7)                      # per head [H, D, D']
    phi = fm.hedgehog(x, w, form="lolcats")
    assert phi.shape == (2, 6, 3, 8)
    z = jnp.einsum("bthd,hde->bthe", x, w)
    np.testing.assert_allclose(phi[..., :4], jax.nn.softmax(z, -1), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(phi[..., 4:], jax.nn.softmax(-z, -1), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(jnp.sum(phi, -1), 2.0, rtol=1e-5)   # each half sums to 1
    assert np.all(np.asarray(phi) >= 1e-12)


def test_hedgehog_fla_form_identity_init():
    x = _x((5, 8))
    phi = fm.hedgehog(x, jnp.eye(8), jnp.zeros(8), form="fla")
    np.testing.assert_allclose(phi, jax.nn.softmax(jnp.concatenate([2 * x, -2 * x], -1), -1),
                               rtol=1e-6)
    np.testing.assert_allclose(jnp.sum(phi, -1), 1.0, rtol=1e-5)


def test_hedgehog_gradients_reach_weights():
    x = _x((4, 8))
    grad = jax.grad(lambda w: jnp.sum(fm.hedgehog(x, w, form="fla")[:, :3]))(jnp.eye(8))
    assert np.all(np.isfinite(np.asarray(grad))) and np.any(np.asarray(grad) != 0)


def test_bad_weights_raise():
    x = _x((4, 8))
    with pytest.raises(ValueError, match="weight"):
        fm.hedgehog(x, jnp.zeros((7, 4)))
    with pytest.raises(ValueError, match="form"):
        fm.hedgehog(x, jnp.zeros((8, 4)), form="paper")


def test_taylor_linear_attention_equals_exp_taylor_attention():
    """Normalised linear attention with the Taylor map = causal attention with weights
    1 + s + s²/2 (s = q·k/√d), the second-order Taylor expansion of softmax's exp."""
    T, d = 12, 8
    q, k, v = _x((1, T, 1, d), 8), _x((1, T, 1, d), 9), _x((1, T, 1, 3), 10)
    o, _ = naive_linear_attn(fm.based_taylor(q), fm.based_taylor(k), v, scale=1.0, normalize=True)
    s = jnp.einsum("id,jd->ij", q[0, :, 0], k[0, :, 0]) / math.sqrt(d)
    w = jnp.tril(1 + s + s ** 2 / 2)
    ref = (w @ v[0, :, 0]) / jnp.sum(w, -1, keepdims=True)
    np.testing.assert_allclose(o[0, :, 0], ref, rtol=1e-4, atol=1e-5)
