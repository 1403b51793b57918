"""Gated DeltaNet's output gate: on (swish, FLA's default), sigmoid (Kimi's KDA), or off (no
``g_proj``); hand computations of the output path, decoding against the full forward, config
errors, and the MQAR sweep's per-mixer settings."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from test_models import assert_chunk_equals_prefill_then_steps, tiny_config
from test_models_retnet_lightning import run_and_capture_o

from lolax.models import LanguageModel, ModelConfig, count_params
from lolax.models.layers import rms_normalize
from lolax.models.mixers import GatedDeltaNet

X = jax.random.normal(jax.random.key(1), (2, 7, 16), jnp.float32)


def gdn(**kw) -> GatedDeltaNet:
    return GatedDeltaNet(tiny_config("E", **kw), nnx.Rngs(0))


def normed(layer: GatedDeltaNet, o: jax.Array) -> jax.Array:
    return rms_normalize(o, 1e-6) * layer.o_norm.scale[...]


def project(layer: GatedDeltaNet, z: jax.Array) -> jax.Array:
    return z.reshape(z.shape[:2] + (-1,)) @ layer.o_proj.kernel[...]


def test_gate_off_has_no_gate_parameter_and_is_the_normed_output_projected():
    gated, plain = gdn(), gdn(gdn_use_gate=False)
    paths = {"/".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(plain, nnx.Param))}
    assert not any(p.startswith("g_proj") for p in paths) and "o_norm/scale" in paths
    assert count_params(gated) - count_params(plain) == 16 * 2 * 8        # g_proj [d_model, HV * V]
    y, o = run_and_capture_o(plain, X)
    np.testing.assert_allclose(y, project(plain, normed(plain, o)), rtol=1e-5, atol=1e-6)


def test_sigmoid_gate_matches_a_hand_computation_and_differs_from_swish():
    swish, sigmoid = gdn(), gdn(gdn_gate_activation="sigmoid")
    same = jax.tree.map(jnp.array_equal, nnx.state(swish, nnx.Param), nnx.state(sigmoid, nnx.Param))
    assert all(jax.tree.leaves(same))                                      # same parameters, same seed
    y, o = run_and_capture_o(sigmoid, X)
    gate = (X @ sigmoid.g_proj.kernel[...]).reshape(o.shape)
    np.testing.assert_allclose(y, project(sigmoid, normed(sigmoid, o) * jax.nn.sigmoid(gate)), rtol=1e-5, atol=1e-6)
    y_swish, o_swish = run_and_capture_o(swish, X)
    np.testing.assert_allclose(o_swish, o, rtol=1e-6)                      # the recurrence is untouched
    np.testing.assert_allclose(y_swish, project(swish, normed(swish, o) * jax.nn.silu(gate)), rtol=1e-5, atol=1e-6)
    assert float(jnp.max(jnp.abs(y - y_swish))) > 1e-2


@pytest.mark.parametrize("options", [{}, {"gdn_gate_activation": "sigmoid"}, {"gdn_use_gate": False},
                                     pytest.param({"gdn_use_gate": False, "gdn_num_v_heads": 4, "gdn_expand_v": 2},
                                                  marks=pytest.mark.slow)])
def test_decoding_equals_the_full_forward(options):
    cfg = tiny_config("E", **options)
    assert_chunk_equals_prefill_then_steps(GatedDeltaNet(cfg, nnx.Rngs(0)), cfg, str(options))


@pytest.mark.slow
def test_language_model_without_gate_generates_like_its_forward():
    from lolax.models import generate
    from lolax.ops.testing import rel_rms_error
    model = LanguageModel(tiny_config("ES", gdn_use_gate=False), nnx.Rngs(0))
    prompt = jax.random.randint(jax.random.key(2), (2, 4), 0, 64)
    tokens, logits = generate(model, prompt, 3, temperature=0.0, return_logits=True)
    ref = model(jnp.concatenate([prompt, tokens], 1))[:, 3:6]
    assert rel_rms_error(ref, logits) < 2e-3


@pytest.mark.parametrize("values,match", [
    ({"gdn_gate_activation": "silu"}, r"model\.gdn_gate_activation must be one of \('swish', 'sigmoid'\), got 'silu'"),
    ({"gdn_use_gate": 1}, r"model\.gdn_use_gate must be a bool, got 1"),
])
def test_bad_gate_settings_raise_errors_naming_the_key(values, match):
    with pytest.raises(ValueError, match=match):
        ModelConfig(**values)


def test_mqar_sweep_picks_the_gate_per_mixer():
    from experiments.tasks.runner import task_model_config
    from experiments.tasks.sweeps import MQAR_MIXER_SPECS, mqar_mixer
    assert mqar_mixer("gdn") == ("gdn", {"gdn_use_gate": True, "gdn_gate_activation": "swish"})
    assert mqar_mixer("retnet") == ("retnet", {})                          # a plain preset name
    for name, (preset, extra) in MQAR_MIXER_SPECS.items():
        cfg = task_model_config(preset, 64, 16, **extra)
        assert {k: getattr(cfg, k) for k in extra} == extra, name
    assert MQAR_MIXER_SPECS["gdn_no_gate"][1] == {"gdn_use_gate": False}
    assert MQAR_MIXER_SPECS["gdn_sigmoid_gate"][1] == {"gdn_gate_activation": "sigmoid"}
