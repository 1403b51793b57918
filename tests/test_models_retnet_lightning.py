"""RetNet and Lightning layers against their published designs: decay values per head and layer,
the output paths by hand (RetNet's per-head group norm and swish gate, TransNormerLLM's SRMSNorm
over all heads and linear gate), the options that rebuild the earlier layers, shapes, decoding
against the full forward, and config errors."""

import math
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from test_models import assert_chunk_equals_prefill_then_steps, tiny_config

from lolax.models import LanguageModel, ModelConfig
from lolax.models.layers import rms_normalize
from lolax.models.mixers import Lightning, RetNet

X = jax.random.normal(jax.random.key(1), (2, 7, 16), jnp.float32)


def run_and_capture_o(layer, x):
    """The layer's output and the op's output ``o [B, T, H, V]`` before the output path."""
    cls = type(layer)
    original = cls._output
    graphdef, state = nnx.split(layer)

    @jax.jit
    def run(state, x):
        seen = {}

        def spy(self, o, x, extras):
            seen["o"] = o
            return original(self, o, x, extras)

        with mock.patch.object(cls, "_output", spy):
            y = nnx.merge(graphdef, state)(x)
        return y, seen["o"]

    return run(state, x)


def param_paths(layer) -> set[str]:
    return {"/".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(layer, nnx.Param))}


def flat(z):
    return z.reshape(z.shape[:2] + (-1,))


# ------------------------------------------------------------------------------------------------
# Decay schedules
# ------------------------------------------------------------------------------------------------

def test_retnet_decays_are_one_minus_two_to_the_minus_five_minus_h():
    layer = RetNet(tiny_config("R", d_model=32, num_heads=4), nnx.Rngs(0))
    expected = [math.log(31 / 32), math.log(63 / 64), math.log(127 / 128), math.log(255 / 256)]
    np.testing.assert_allclose(layer.g_gamma, expected, rtol=1e-6)


def test_lightning_decays_follow_the_release_across_heads_and_layers():
    # ALiBi slopes 2^(-8(h+1)/H) for H = 4, scaled by 1 - l/(L-1) + 1e-5 for layer l of L = 3;
    # every layer counts, the softmax one of the hybrid too
    model = LanguageModel(tiny_config("NSN", d_model=32, num_heads=4), nnx.Rngs(0))
    slopes = np.array([2.0 ** -2, 2.0 ** -4, 2.0 ** -6, 2.0 ** -8])
    for layer in (0, 2):
        np.testing.assert_allclose(model.layers[layer].attn.g_gamma, -slopes * (1 - layer / 2 + 1e-5), rtol=1e-6)
    assert abs(model.layers[2].attn.g_gamma[0]) < 1e-5          # the last layer hardly decays
    fla = LanguageModel(tiny_config("NNN", d_model=32, num_heads=4, lightning_decay="fla_linear"), nnx.Rngs(0))
    for layer in range(3):
        np.testing.assert_allclose(fla.layers[layer].attn.g_gamma, -(8 / 4) * (1 - layer / 3) * np.arange(4),
                                   rtol=1e-6, atol=1e-7)


# ------------------------------------------------------------------------------------------------
# RetNet's output path
# ------------------------------------------------------------------------------------------------

def test_retnet_group_norm_and_swish_gate_by_hand():
    layer = RetNet(tiny_config("R"), nnx.Rngs(0))
    assert param_paths(layer) == {f"{p}_proj/kernel" for p in "qkvgo"}        # no norm parameter
    y, o = run_and_capture_o(layer, X)
    mean = o.mean(-1, keepdims=True)
    normed = (o - mean) / np.sqrt(((o - mean) ** 2).mean(-1, keepdims=True) + 1e-6)   # each head on its own
    gate = jax.nn.silu((X @ layer.g_proj.kernel[...]).reshape(o.shape))
    np.testing.assert_allclose(y, flat(normed * gate) @ layer.o_proj.kernel[...], rtol=1e-4, atol=1e-5)


def test_retnet_rms_option_is_flas_gated_rmsnorm_and_the_earlier_layer():
    layer = RetNet(tiny_config("R", retnet_norm="rms"), nnx.Rngs(0))
    assert "o_norm/scale" in param_paths(layer)
    layer.o_norm.scale[...] = jnp.linspace(0.5, 1.5, 8)
    y, o = run_and_capture_o(layer, X)
    gate = jax.nn.silu((X @ layer.g_proj.kernel[...]).reshape(o.shape))
    expected = flat(rms_normalize(o, 1e-6) * layer.o_norm.scale[...] * gate) @ layer.o_proj.kernel[...]
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-6)
    group = RetNet(tiny_config("R"), nnx.Rngs(0))
    assert float(jnp.max(jnp.abs(group(X) - y))) > 1e-2


def test_retnet_papers_value_width_doubles_value_gate_and_state():
    cfg = tiny_config("R", retnet_expand_v=2)                  # H = 2 heads of K = 8, V = 16
    layer = RetNet(cfg, nnx.Rngs(0))
    assert layer.v_proj.kernel.shape == layer.g_proj.kernel.shape == (16, 32)
    assert layer.o_proj.kernel.shape == (32, 16) and layer.q_proj.kernel.shape == (16, 16)
    y, cache = layer.prefill(X, max_len=7)
    assert y.shape == X.shape and cache["state"].shape == (2, 2, 8, 16)


# ------------------------------------------------------------------------------------------------
# Lightning's output path
# ------------------------------------------------------------------------------------------------

def test_lightning_srms_over_all_heads_times_a_linear_gate_by_hand():
    layer = Lightning(tiny_config("N"), nnx.Rngs(0))
    assert param_paths(layer) == {f"{p}_proj/kernel" for p in "qkvuo"}        # no norm scale, no g_proj
    y, o = run_and_capture_o(layer, X)
    z = flat(o)                                                                 # both heads together
    srms = z / np.sqrt((z ** 2).mean(-1, keepdims=True) + 1e-6)
    np.testing.assert_allclose(y, (srms * (X @ layer.u_proj.kernel[...])) @ layer.o_proj.kernel[...],
                               rtol=1e-4, atol=1e-5)


def test_lightning_rms_and_swish_rebuild_the_earlier_gated_rmsnorm_layer():
    layer = Lightning(tiny_config("N", lightning_norm="rms", lightning_gate="swish"), nnx.Rngs(0))
    assert param_paths(layer) == {f"{p}_proj/kernel" for p in "qkvgo"} | {"o_norm/scale"}
    layer.o_norm.scale[...] = jnp.linspace(0.5, 1.5, 8)
    y, o = run_and_capture_o(layer, X)
    gate = jax.nn.silu((X @ layer.g_proj.kernel[...]).reshape(o.shape))       # per head, as before
    expected = flat(rms_normalize(o, 1e-6) * layer.o_norm.scale[...] * gate) @ layer.o_proj.kernel[...]
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-6)


def test_lightning_srms_with_a_swish_gate_mixes_the_options():
    layer = Lightning(tiny_config("N", lightning_gate="swish"), nnx.Rngs(0))
    y, o = run_and_capture_o(layer, X)
    z = flat(o)
    srms = z / np.sqrt((z ** 2).mean(-1, keepdims=True) + 1e-6)
    expected = (srms * jax.nn.silu(X @ layer.g_proj.kernel[...])) @ layer.o_proj.kernel[...]
    np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------------------
# Decoding, config errors
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind,options", [
    ("R", {}), ("R", {"retnet_norm": "rms"}), ("R", {"retnet_expand_v": 2}),
    ("N", {}), ("N", {"lightning_norm": "rms", "lightning_gate": "swish"}),
])
def test_decoding_equals_the_full_forward(kind, options):
    cfg = tiny_config(kind, **options)
    layer = (RetNet if kind == "R" else Lightning)(cfg, nnx.Rngs(0))
    assert_chunk_equals_prefill_then_steps(layer, cfg, f"{kind} {options}")


@pytest.mark.parametrize("values,match", [
    ({"retnet_norm": "layer"}, r"model\.retnet_norm must be one of \('group', 'rms'\), got 'layer'"),
    ({"retnet_expand_v": 0}, r"model\.retnet_expand_v must be a positive int, got 0"),
    ({"lightning_norm": "simple"}, r"model\.lightning_norm must be one of \('srms', 'rms'\), got 'simple'"),
    ({"lightning_gate": "silu"}, r"model\.lightning_gate must be one of \('identity', 'swish'\), got 'silu'"),
])
def test_bad_settings_raise_errors_naming_the_key(values, match):
    with pytest.raises(ValueError, match=match):
        ModelConfig(**values)
