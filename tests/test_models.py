"""Mixer layers and language models: chunk vs recurrent forms, cached generation, padding and
packing, parameter counts, logical axis names, config errors, the sequence-parallel hook."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lolax.models import LanguageModel, ModelConfig, count_params, generate
from lolax.models.config import MIXER_LETTERS
from lolax.models.mixers import MIXERS
from lolax.ops.testing import rel_rms_error

ALL_KINDS = sorted(MIXERS)
TINY = dict(d_model=16, num_heads=2, chunk_size=4, window=3, based_feature_dim=4, gla_gate_rank=4,
            mom_num_memories=3, mom_topk=2, vocab_size=64, mlp_hidden=32)


def tiny_config(pattern, **kw):
    values = dict(TINY, num_layers=len(pattern), pattern=pattern)
    values.update(kw)
    return ModelConfig(**values)


def jit_method(module, name, **static):
    """``jax.jit`` of ``module.<name>(*args, **static)`` with the module's state as an argument."""
    graphdef, state = nnx.split(module)

    @jax.jit
    def run(state, *args):
        return getattr(nnx.merge(graphdef, state), name)(*args, **static)

    return lambda *args: run(state, *args)


# ------------------------------------------------------------------------------------------------
# Layers: chunk form vs prefill + recurrent steps
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ALL_KINDS)
def test_layer_chunk_equals_prefill_then_recurrent_steps(kind):
    cfg = tiny_config("S", num_kv_heads=1, allow_neg_eigval=kind == "deltanet")
    assert_chunk_equals_prefill_then_steps(MIXERS[kind](cfg, nnx.Rngs(0), layer_idx=0), cfg, kind)


def test_gdn_with_more_value_heads_than_key_heads():
    cfg = tiny_config("E", gdn_num_v_heads=4, gdn_expand_v=2)          # 2 key heads, 4 value heads
    layer = MIXERS["gated_deltanet"](cfg, nnx.Rngs(0))
    assert_chunk_equals_prefill_then_steps(layer, cfg, "gdn, HV = 4")
    _, cache = layer.prefill(jnp.ones((3, 5, cfg.d_model)), max_len=5)
    assert cache["state"].shape == (3, 4, 8, 16)                       # [B, HV, K, V = expand_v * K]
    d, h, hv, k, dv, conv = 16, 2, 4, 8, 16, 4
    expected = (d * h * k * 2 + d * hv * dv * 2 + d * hv * 2 + hv * 2 + (h * k * 2 + hv * dv) * conv
                + dv + hv * dv * d)                                    # q k | v g | a b | A dt | convs | norm | o
    assert count_params(layer) == expected


def prefill_then_steps(layer, x, P, max_len):
    """``(outputs [B, T, ...], final cache)``: ``layer.prefill`` on the first ``P`` positions of
    ``x``, then one ``layer.step`` per remaining position, jitted."""
    B, T, _ = x.shape
    graphdef, state = nnx.split(layer)

    @jax.jit
    def run(state, x):
        layer = nnx.merge(graphdef, state)
        y0, cache = layer.prefill(x[:, :P], max_len=max_len)

        def body(cache, i):
            xt = jax.lax.dynamic_slice_in_dim(x, i, 1, axis=1)
            y, cache = layer.step(xt, cache, positions=jnp.full((B, 1), i), index=i)
            return cache, y[:, 0]

        cache, ys = jax.lax.scan(body, cache, jnp.arange(P, T))
        return jnp.concatenate([y0, jnp.moveaxis(ys, 0, 1)], axis=1), cache

    return run(state, x)


def assert_chunk_equals_prefill_then_steps(layer, cfg, name):
    B, T, P = 2, 11, 5
    x = jax.random.normal(jax.random.key(1), (B, T, cfg.d_model), jnp.float32)
    full = jit_method(layer, "__call__")(x)
    inc, _ = prefill_then_steps(layer, x, P, max_len=T)
    assert full.shape == (B, T, cfg.d_model) and np.all(np.isfinite(full))
    assert rel_rms_error(full, inc) < 1e-4, name


def test_short_conv_step_matches_full_and_respects_segments():
    from lolax.models.layers import ShortConv
    conv = ShortConv(3, 4, nnx.Rngs(0))
    u = jax.random.normal(jax.random.key(0), (1, 9, 3))
    full = conv(u)
    state = conv.init_state(1, 3)
    steps = []
    for t in range(9):
        y, state = conv.step(u[:, t:t + 1], state)
        steps.append(y)
    np.testing.assert_allclose(full, jnp.concatenate(steps, 1), rtol=1e-5, atol=1e-6)
    seg = jnp.array([[0, 0, 0, 0, 1, 1, 1, 1, 1]])
    packed = conv(u, segment_ids=seg)
    np.testing.assert_allclose(packed[:, 4:], conv(u[:, 4:]), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------------
# Language models: cached generation, padded and packed batches
# ------------------------------------------------------------------------------------------------

# One hybrid covers the distinct masking / caching paths (normalised linear attention, constant
# decay, GLA gates, short convs + delta rule, MoM routing, KV cache, ring buffer); every mixer
# kind is checked on its own above.  References are per-sequence runs placed at the start of a
# row (causality makes trailing filler irrelevant), so every forward pass shares one shape.
HYBRID = "BREGMSW"
B, T = 3, 11


@pytest.fixture(scope="module")
def hybrid():
    return LanguageModel(tiny_config(HYBRID, num_kv_heads=1), nnx.Rngs(0))


@pytest.fixture(scope="module")
def forward(hybrid):
    graphdef, state = nnx.split(hybrid)
    run = jax.jit(lambda s, t, m, c: nnx.merge(graphdef, s)(t, mask=m, cu_seqlens=c))
    return lambda tokens, mask=None, cu_seqlens=None: run(state, tokens, mask, cu_seqlens)


def _at_row_starts(rows, length=T, seed=0):
    """Stacks token rows at the start of ``[len(rows), length]`` rows of random filler."""
    out = np.array(jax.random.randint(jax.random.key(seed), (len(rows), length), 0, 64))
    for i, r in enumerate(rows):
        out[i, :len(r)] = np.asarray(r)
    return jnp.asarray(out)


def test_cached_generation_logits_equal_full_forward(hybrid, forward):
    prompt = jax.random.randint(jax.random.key(1), (B, 6), 0, 64)
    tokens, logits = generate(hybrid, prompt, T - 6, temperature=0.0, return_logits=True)
    assert tokens.shape == (B, 5) and logits.shape == (B, 5, 64)
    ref = forward(jnp.concatenate([prompt, tokens], 1))[:, 5:10]
    assert rel_rms_error(ref, logits) < 2e-3
    np.testing.assert_array_equal(tokens, jnp.argmax(logits, -1))


def test_generation_with_prompts_of_different_lengths(hybrid, forward):
    lengths = [6, 2, 4]
    prompt = jax.random.randint(jax.random.key(2), (B, 6), 0, 64)
    tokens, logits = generate(hybrid, prompt, 5, temperature=0.0, return_logits=True, prompt_lengths=lengths)
    ref = forward(_at_row_starts([np.concatenate([prompt[b, :n], tokens[b]]) for b, n in enumerate(lengths)]))
    for b, n in enumerate(lengths):
        assert rel_rms_error(ref[b, n - 1:n + 4], logits[b]) < 2e-3, b


def test_padded_batch_equals_per_sequence_runs(forward):
    lengths = [T, 4, 6]
    seqs = [np.asarray(jax.random.randint(jax.random.key(10 + i), (n,), 0, 64)) for i, n in enumerate(lengths)]
    ref = forward(_at_row_starts(seqs))
    idx = np.arange(T)
    for side in ("left", "right"):
        mask = np.stack([(idx >= T - n) if side == "left" else (idx < n) for n in lengths])
        tokens = np.zeros((B, T), np.int32)
        tokens[mask] = np.concatenate(seqs)
        out = forward(jnp.asarray(tokens), jnp.asarray(mask))
        for b, n in enumerate(lengths):
            assert rel_rms_error(ref[b, :n], out[b][mask[b]]) < 1e-3, (side, b)


def test_packed_batch_equals_per_sequence_runs(forward):
    lengths = [4, 1, 6]
    cu = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    packed = jax.random.randint(jax.random.key(6), (1, T), 0, 64)
    out = forward(packed, None, jnp.asarray(cu))
    ref = forward(_at_row_starts([packed[0, cu[n]:cu[n + 1]] for n in range(B)]))
    for n in range(B):
        assert rel_rms_error(ref[n, :lengths[n]], out[0, cu[n]:cu[n + 1]]) < 1e-3, n


def test_sampling_is_seeded_and_reuses_the_compiled_loop(hybrid):
    from lolax.models.sampling import _generate
    prompt = jax.random.randint(jax.random.key(1), (B, 6), 0, 64)       # same shapes as above
    a = generate(hybrid, prompt, 5, temperature=1.0, rng=jax.random.key(3), return_logits=True)[0]
    before = _generate._cache_size()
    b = generate(hybrid, prompt, 5, temperature=1.0, rng=jax.random.key(3), return_logits=True)[0]
    c = generate(hybrid, prompt, 5, temperature=0.5, rng=jax.random.key(4), return_logits=True)[0]
    np.testing.assert_array_equal(a, b)
    assert _generate._cache_size() == before          # new key / temperature: no recompilation
    assert c.shape == (B, 5)
    assert _generate._cache_size() == before


@pytest.mark.slow
def test_top_k_one_is_greedy():
    model = LanguageModel(tiny_config("ES"), nnx.Rngs(0))
    prompt = jnp.zeros((2, 3), jnp.int32)
    greedy = generate(model, prompt, 4, temperature=0.0)
    np.testing.assert_array_equal(greedy, generate(model, prompt, 4, temperature=0.7, top_k=1,
                                                   rng=jax.random.key(4)))
    np.testing.assert_array_equal(greedy, generate(model, prompt, 4, temperature=0.7, top_p=1e-6,
                                                   rng=jax.random.key(5)))


@pytest.mark.slow
def test_cached_generation_every_mixer_in_one_model():
    model = LanguageModel(tiny_config("LHBRNGDEMSWC", num_kv_heads=1), nnx.Rngs(0))
    prompt = jax.random.randint(jax.random.key(1), (2, 7), 0, 64)
    tokens, logits = generate(model, prompt, 6, temperature=0.0, return_logits=True, prompt_lengths=[7, 3])
    for b, n in enumerate([7, 3]):
        ref = model(jnp.concatenate([prompt[b:b + 1, :n], tokens[b:b + 1]], 1))[0, n - 1:n + 5]
        assert rel_rms_error(ref, logits[b]) < 2e-3, b


# ------------------------------------------------------------------------------------------------
# Parameters: logical names, hand counts, aux loss
# ------------------------------------------------------------------------------------------------

def test_every_parameter_has_logical_axis_names():
    model = LanguageModel(tiny_config("LHBRNGDEMSWC", num_kv_heads=1), nnx.Rngs(0))
    flat = list(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    assert len(flat) > 50
    for path, var in flat:
        names = var.get_metadata().get("out_sharding")
        assert names is not None and len(names) == var[...].ndim, (path, names)
        assert all(isinstance(n, str) for n in names), (path, names)
    paths = {"/".join(map(str, path)) for path, _ in flat}
    for i, kind in enumerate(model.config.layer_kinds):          # optimizer masks rely on these paths
        assert any(p.startswith(f"layers/{i}/attn/") and p.endswith("_proj/kernel") for p in paths), kind
        assert f"layers/{i}/mlp/down_proj/kernel" in paths


def _hand_count(cfg: ModelConfig, kind: str) -> int:
    d, h, hd, f = cfg.d_model, cfg.num_heads, cfg.head_size, cfg.hidden_size
    mixer = {
        "linear_attn": 4 * d * h * hd + hd,                                # q,k,v,o + per-head norm
        "softmax": 2 * d * h * hd + 2 * d * cfg.kv_heads * hd,
        "gla": (2 * d * h * hd // 2 + d * h * hd) + (d * 16 + 16 * h * hd // 2 + h * hd // 2)
               + d * h * hd + hd + h * hd * d,                           # qkv, gate W1 W2 b, g, norm, o
        "gated_deltanet": 3 * d * h * hd + 2 * d * h + 2 * h + 3 * 4 * h * hd + d * h * hd + hd + h * hd * d,
        "conv": 3 * d * d + cfg.conv_size * d,                           # in, gate, o + depthwise taps
    }[kind]
    block = mixer + 2 * d + 3 * d * f
    head = 0 if cfg.tie_embeddings else d * cfg.vocab_size
    return cfg.vocab_size * d + cfg.num_layers * block + d + head


@pytest.mark.parametrize("kind,letter,extra", [("linear_attn", "L", {}), ("softmax", "S", {"num_kv_heads": 2}),
                                               ("gla", "G", {}), ("gated_deltanet", "E", {"tie_embeddings": True}),
                                               ("conv", "C", {"conv_size": 3})])
def test_parameter_counts_match_hand_count(kind, letter, extra):
    cfg = ModelConfig(vocab_size=50, d_model=32, num_layers=2, pattern=letter, num_heads=2, **extra)
    model = LanguageModel(cfg, nnx.Rngs(0))
    assert count_params(model) == _hand_count(cfg, kind)


def test_tied_embeddings_share_the_table():
    untied = LanguageModel(tiny_config("LS"), nnx.Rngs(0))
    tied = LanguageModel(tiny_config("LS", tie_embeddings=True), nnx.Rngs(0))
    assert count_params(untied) - count_params(tied) == 16 * 64 and tied.lm_head is None


def test_mom_aux_loss_is_returned_and_trains_the_router():
    model = LanguageModel(tiny_config("M"), nnx.Rngs(0))
    tokens = jax.random.randint(jax.random.key(0), (2, 8), 0, 64)
    graphdef, params = nnx.split(model, nnx.Param)

    @jax.jit
    def run(params):
        def aux_fn(p):
            logits, aux = nnx.merge(graphdef, p)(tokens, return_aux=True)
            return aux, logits
        return jax.value_and_grad(aux_fn, has_aux=True)(params)

    (aux, logits), grads = run(params)
    assert logits.shape == (2, 8, 64) and 0 < float(aux) < 0.1        # weight 0.01 * M * sum f P ~ 0.01
    router = grads["layers"][0]["attn"]["router"]["kernel"][...]
    assert float(jnp.abs(router).sum()) > 0
    plain = LanguageModel(tiny_config("LS"), nnx.Rngs(0))
    assert isinstance(plain.layers[0].attn.forward(jnp.zeros((1, 2, 16)))[1], jax.Array)


# ------------------------------------------------------------------------------------------------
# Config errors, presets, dispatch hook
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("values,field", [
    ({"pattern": "LX"}, "model.pattern"),
    ({"pattern": "gdn,mamba9"}, "model.pattern"),
    ({"d_model": 30, "num_heads": 4}, "model.num_heads"),
    ({"window": 0}, "model.window"),
    ({"num_layers": 3, "pattern": "LS"}, "model.num_layers"),
    ({"num_kv_heads": 3}, "model.num_kv_heads"),
    ({"feature_map": "cosine"}, "model.feature_map"),
    ({"conv_size": -1}, "model.conv_size"),
    ({"gdn_num_v_heads": 3}, "model.gdn_num_v_heads"),
    ({"pattern": "CL", "num_layers": 2, "conv_size": 0}, "model.conv_size"),
    ({"mom_topk": 9}, "model.mom_topk"),
    ({"lightning_decay": "linear"}, "model.lightning_decay"),
    ({"implementation": "triton"}, "model.implementation"),
    ({"head_dim": 7, "pattern": "S", "num_layers": 1}, "model.head_dim"),
])
def test_bad_config_values_raise_errors_naming_the_field(values, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        ModelConfig(**values)


def test_config_round_trip_and_named_patterns():
    cfg = ModelConfig(pattern="gdn, gdn,softmax", num_layers=6)
    assert cfg.layer_kinds == ("gated_deltanet", "gated_deltanet", "softmax") * 2
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    assert set(MIXER_LETTERS.values()) == set(MIXERS)
    with pytest.raises(ValueError, match="unknown model config key"):
        ModelConfig.from_dict({"pattern": "L", "bogus": 1})


def test_every_preset_builds_and_traces():
    from experiments.configs.presets import PRESETS, apply_preset
    tokens = jax.ShapeDtypeStruct((1, 5), jnp.int32)
    for name in PRESETS:
        values = apply_preset(dict(TINY, num_layers=4, preset=name))
        assert "preset" not in values
        model = nnx.eval_shape(lambda: LanguageModel(ModelConfig(**values), nnx.Rngs(0)))
        assert nnx.eval_shape(lambda m, t: m(t), model, tokens).shape == (1, 5, 64), name
    base = {"pattern": "LLLS", "window": 64, "d_model": 16}
    assert apply_preset({"pattern": "LLLS", "window": 8, "preset": "based"}, base)["window"] == 8
    assert apply_preset({"pattern": "LLLS", "window": 64, "preset": "based"}, base)["pattern"] == "BW"
    with pytest.raises(ValueError, match="model.preset"):
        apply_preset({"preset": "nope"})


def test_a_mesh_with_a_sequence_axis_routes_ops_to_parallelism(monkeypatch):
    """Traced under ``jax.set_mesh`` with a ``sequence`` axis larger than 1, the layers call LASP-2
    and sequence-parallel attention (in the layer's ``sequence_attention`` mode); outside, they do not."""
    from lolax.models import dispatch
    calls = []

    def lasp2(family, q, k, v, *, mesh, axis_name, **kw):
        calls.append(("lasp2", family, axis_name, tuple(sorted(kw))))
        return jnp.zeros(q.shape[:3] + v.shape[3:], v.dtype), None

    def ring(q, k, v, *, mesh, axis_name, mode, window=None, scale=None):
        calls.append(("ring", mode, axis_name, window))
        return jnp.zeros(q.shape[:3] + v.shape[3:], v.dtype)

    monkeypatch.setattr(dispatch, "lasp2", lasp2)
    monkeypatch.setattr(dispatch, "sequence_parallel_attention", ring)
    model = LanguageModel(tiny_config("EGW", sequence_attention="ulysses"), nnx.Rngs(0))
    trace = lambda: jax.eval_shape(lambda t: model(t), jax.ShapeDtypeStruct((1, 8), jnp.int32))  # tracing decides
    auto = (jax.sharding.AxisType.Auto,) * 2
    trace()
    with jax.set_mesh(jax.make_mesh((2, 4), ("data", "sequence"), axis_types=auto)):
        trace()
    with jax.set_mesh(jax.make_mesh((8, 1), ("data", "sequence"), axis_types=auto)):
        trace()
    assert calls == [("lasp2", "gated_delta_rule", "sequence", ("allow_neg_eigval", "beta", "chunk_size", "g")),
                     ("lasp2", "gla", "sequence", ("chunk_size", "g")),
                     ("ring", "ulysses", "sequence", 3)]
