"""The linearisation mixers LoLCATs (O) and Liger (I) against quadratic references written here:
outputs and gradients, packed and padded batches, cached decoding in a language model, a decode
cache that does not grow with max_len, strong gates, bf16, scanned layers, the parameter paths."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from test_models import prefill_then_steps

from lolax.models import LanguageModel, ModelConfig, generate
from lolax.models.mixers import MIXERS, SoftmaxAttention
from lolax.ops.testing import rel_rms_error

HI = jax.lax.Precision.HIGHEST
W = 8                                   # window: keys per query, its own included
CFG = dict(d_model=32, num_heads=4, num_kv_heads=2, head_dim=8, window=W, qk_norm=True, qkv_bias=True,
           o_bias=True, chunk_size=16, num_layers=1, vocab_size=64, mlp_hidden=32)
KINDS = ("lolcats", "liger")


def config(pattern="O", **kw) -> ModelConfig:
    return ModelConfig(**{**CFG, "pattern": pattern, **kw})


def make_layer(kind, **kw):
    return MIXERS[kind](config(**kw), nnx.Rngs(0))


def jitted(layer, name="__call__", **static):
    """``jax.jit`` of ``layer.<name>(*args, **static)`` with the layer's state as an argument."""
    graphdef, state = nnx.split(layer)
    run = jax.jit(lambda state, *args: getattr(nnx.merge(graphdef, state), name)(*args, **static))
    return lambda *args: run(state, *args)


# ------------------------------------------------------------------------------------------------
# Quadratic references (float32, products at HIGHEST precision, full T x T masks)
# ------------------------------------------------------------------------------------------------

def _repeat(x, h):
    return jnp.repeat(x, h // x.shape[2], axis=2)


def _hedgehog(x, weight):
    """[softmax(x W), softmax(-x W)] per head, clamped at 1e-12 (the LoLCATs form)."""
    z = jnp.einsum("bthd,hde->bthe", x.astype(jnp.float32), weight, precision=HI)
    return jnp.maximum(jnp.concatenate([jax.nn.softmax(z, -1), jax.nn.softmax(-z, -1)], -1), 1e-12)


def _band(T, window):
    i, j = np.arange(T)[:, None], np.arange(T)[None, :]
    return jnp.asarray((i - j >= 0) & (i - j < window)), jnp.asarray(i - j >= window)


def lolcats_reference(layer, x):
    """One unpadded sequence per row: y_i = (sum_win a_ij v_j + sum_old b_ij v_j) / (sum a + sum b)."""
    B, T, _ = x.shape
    h, d = layer.num_heads, layer.head_dim
    q, k, v = layer._qkv(x, jnp.broadcast_to(jnp.arange(T), (B, T)))
    q, k, v = q.astype(jnp.float32), _repeat(k, h).astype(jnp.float32), _repeat(v, h).astype(jnp.float32)
    win, old = _band(T, layer.window)
    s = jnp.einsum("bihd,bjhd->bhij", q, k, precision=HI) / np.sqrt(d)
    m = jnp.max(jnp.where(win, s, -jnp.inf), axis=-1, keepdims=True)
    gamma = jax.nn.sigmoid(layer.window_factor[...])[:, None, None]
    a = jnp.where(win, gamma * jnp.exp(s - m), 0.0)
    b = jnp.where(old, jnp.einsum("bihf,bjhf->bhij", _hedgehog(q, layer.q_map[...]),
                                  _hedgehog(k, layer.k_map[...]), precision=HI), 0.0)
    weights = a + b
    o = jnp.einsum("bhij,bjhd->bihd", weights / jnp.sum(weights, -1, keepdims=True), v, precision=HI)
    return layer.o_proj(o.astype(x.dtype).reshape(B, T, -1))


def liger_reference(layer, x):
    """One unpadded sequence per row: 0.5 sliding-window softmax + 0.5 quadratic GLA."""
    B, T, _ = x.shape
    h, d = layer.num_heads, layer.head_dim
    q_raw, k_raw, v = layer._heads(x)
    pos = jnp.broadcast_to(jnp.arange(T), (B, T))
    q, k = layer._rotary(q_raw, pos).astype(jnp.float32), _repeat(layer._rotary(k_raw, pos), h).astype(jnp.float32)
    v = _repeat(v, h).astype(jnp.float32)
    win, _ = _band(T, layer.window)
    s = jnp.where(win, jnp.einsum("bihd,bjhd->bhij", q, k, precision=HI) / np.sqrt(d), -jnp.inf)
    swa = jnp.einsum("bhij,bjhd->bihd", jax.nn.softmax(s, -1), v, precision=HI)
    kr = _repeat(k_raw, h).astype(jnp.float32)
    fq, fk = jax.nn.softmax(q_raw.astype(jnp.float32), -1), jax.nn.softmax(kr, -1)
    G = jnp.cumsum(jax.nn.log_sigmoid(kr) / layer.gate_normalizer, axis=1)          # [B, T, H, d]
    causal = jnp.asarray(np.tril(np.ones((T, T), bool)))[None, :, :, None, None]
    decay = jnp.exp(jnp.where(causal, G[:, :, None] - G[:, None, :], -jnp.inf))    # [B, i, j, H, d]
    A = jnp.einsum("bihc,bjhc,bijhc->bhij", fq, fk, decay, precision=HI)
    gla = jnp.einsum("bhij,bjhd->bihd", A, v, precision=HI)
    return layer.o_proj((0.5 * swa + 0.5 * gla).astype(x.dtype).reshape(B, T, -1))


NAIVE = {"lolcats": lolcats_reference, "liger": liger_reference}


# ------------------------------------------------------------------------------------------------
# The layers: outputs, gradients, packing, padding, decoding
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
def test_outputs_and_gradients_match_the_quadratic_reference(kind):
    layer = make_layer(kind)
    if kind == "lolcats":                     # make the window / linear balance matter
        layer.window_factor[...] = jnp.array([-2.0, -0.5, 0.5, 2.0])
    x = jax.random.normal(jax.random.key(1), (2, 37, 32))              # odd length, 5 windows
    cot = jax.random.normal(jax.random.key(2), (2, 37, 32))
    graphdef, state = nnx.split(layer)

    def value_and_grads(fn):
        @jax.jit
        def run(state, x):
            y, vjp = jax.vjp(lambda state, x: fn(nnx.merge(graphdef, state), x), state, x)
            return y, vjp(cot)
        return run(state, x)

    out, (gs_out, gx_out) = value_and_grads(lambda m, x: m(x))
    ref, (gs_ref, gx_ref) = value_and_grads(NAIVE[kind])
    assert np.all(np.isfinite(out))
    assert rel_rms_error(ref, out) < 1e-5
    assert rel_rms_error(gx_ref, gx_out) < 1e-4
    ref_leaves, out_leaves = dict(nnx.to_flat_state(gs_ref)), dict(nnx.to_flat_state(gs_out))
    assert ref_leaves.keys() == out_leaves.keys()
    for path, g in ref_leaves.items():
        assert rel_rms_error(g[...], out_leaves[path][...]) < 1e-4, path
    if kind == "lolcats":
        assert {("q_map",), ("k_map",), ("window_factor",)} <= set(ref_leaves)


@pytest.mark.parametrize("kind", KINDS)
def test_packed_sequences_equal_separate_runs(kind):
    layer = make_layer(kind)
    lengths = [13, 3, 21]                     # longer than the window, shorter, and longer than a chunk
    cu = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    x = jax.random.normal(jax.random.key(3), (1, int(cu[-1]), 32))
    packed = jax.jit(lambda x, cu: layer(x, cu_seqlens=cu))(x, jnp.asarray(cu))
    # each sequence alone, at the start of its own row (causality makes the filler after it irrelevant)
    rows = jnp.stack([jnp.roll(x[0], -int(cu[n]), axis=0) for n in range(len(lengths))])
    alone = jitted(layer)(rows)
    for n in range(len(lengths)):
        assert rel_rms_error(alone[n, :lengths[n]], packed[0, cu[n]:cu[n + 1]]) < 1e-5, n


@pytest.mark.parametrize("kind", KINDS)
def test_padding_is_never_attended(kind):
    layer = make_layer(kind)
    T, lengths = 29, [29, 18]
    x = jax.random.normal(jax.random.key(4), (2, T, 32))
    run = jax.jit(lambda x, m: layer(x, mask=m))
    alone = run(x, None)                       # row b's first n tokens are sequence b on its own
    idx = np.arange(T)
    for side in ("right", "left"):
        mask = np.stack([(idx >= T - n) if side == "left" else (idx < n) for n in lengths])
        xs = np.full(x.shape, 100.0, np.float32)    # loud padding: it must not leak into real tokens
        for b, n in enumerate(lengths):
            xs[b, mask[b]] = np.asarray(x[b, :n])
        out = run(jnp.asarray(xs), jnp.asarray(mask))
        assert np.all(np.isfinite(out))
        for b, n in enumerate(lengths):
            assert rel_rms_error(alone[b, :n], out[b][mask[b]]) < 1e-5, (side, b)
    # left padding leaves queries with no key at all (empty window, nothing older): no NaN anywhere
    grad = jax.jit(jax.grad(lambda x, m: jnp.sum(layer(x, mask=m) ** 2)))(jnp.asarray(xs), jnp.asarray(mask))
    assert np.all(np.isfinite(grad))


@pytest.mark.parametrize("kind", KINDS)
def test_prefill_then_steps_equal_the_full_form_with_a_window_sized_cache(kind):
    layer = make_layer(kind)
    x = jax.random.normal(jax.random.key(5), (2, 37, 32))
    full = jitted(layer)(x)
    inc, cache = prefill_then_steps(layer, x, 13, max_len=37)            # evictions in prefill and steps
    assert rel_rms_error(full, inc) < 1e-5
    shapes = lambda max_len, P=13: jax.tree.map(jnp.shape, jax.eval_shape(
        lambda x: layer.prefill(x, max_len=max_len)[1], x[:, :P]))
    assert shapes(40) == shapes(4000) == shapes(10, P=5)
    assert shapes(40)["k"] == (2, W, 2, 8)    # [B, window, kv heads, head dim]
    if kind == "lolcats":
        assert shapes(40)["S"] == (2, 4, 16, 8) and shapes(40)["z"] == (2, 4, 16)   # [B, H, 2D', d]
    else:
        assert shapes(40)["state"] == (2, 4, 8, 8)


@pytest.mark.slow
def test_a_cache_shorter_than_the_window():
    """max_len below the window: the ring buffer holds max_len slots and no key ever leaves it."""
    for kind in KINDS:
        layer = make_layer(kind, window=16)
        x = jax.random.normal(jax.random.key(6), (1, 12, 32))
        inc, cache = prefill_then_steps(layer, x, 5, max_len=12)
        assert cache["k"].shape[1] == 12
        assert rel_rms_error(jitted(layer)(x), inc) < 1e-5, kind


@pytest.mark.slow
def test_liger_with_strong_gates():
    """Large keys: gates near log(sigmoid(-|k|))/16 of several units per token, chunk and steps alike."""
    layer = make_layer("liger")
    layer.k_norm.scale[...] = jnp.full((8,), 40.0)
    x = jax.random.normal(jax.random.key(7), (2, 37, 32))
    k_raw = layer._heads(x)[1]
    g = jax.nn.log_sigmoid(k_raw) / 16
    assert float(jnp.min(g)) < -3.0 and float(jnp.max(jnp.abs(k_raw))) > 50
    full = jitted(layer)(x)
    assert np.all(np.isfinite(full))
    assert rel_rms_error(liger_reference(layer, x), full) < 1e-5
    inc, _ = prefill_then_steps(layer, x, 13, max_len=37)
    assert rel_rms_error(full, inc) < 1e-5


def test_parameters_are_the_softmax_layers_plus_the_new_ones():
    def paths(module):
        return {"/".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(module, nnx.Param))}

    cfg = config()
    softmax = SoftmaxAttention(cfg, nnx.Rngs(1), window=W)
    base = paths(softmax)
    assert {"q_proj/bias", "o_proj/bias", "q_norm/scale", "k_norm/scale"} <= base
    lolcats, liger = MIXERS["lolcats"](cfg, nnx.Rngs(0)), MIXERS["liger"](cfg, nnx.Rngs(0))
    assert paths(lolcats) == base | {"q_map", "k_map", "window_factor"}
    assert paths(liger) == base
    assert lolcats.q_map[...].shape == lolcats.k_map[...].shape == (4, 8, 8)
    assert not np.allclose(lolcats.q_map[...], lolcats.k_map[...])          # untied
    np.testing.assert_allclose(jax.nn.sigmoid(lolcats.window_factor[...]), 0.1, atol=1e-3)
    assert MIXERS["lolcats"](config(hedgehog_dim=3), nnx.Rngs(0)).q_map[...].shape == (4, 8, 3)
    # a softmax layer's parameters load by path, and then the two layers share their projections
    nnx.update(lolcats, nnx.state(softmax, nnx.Param))
    nnx.update(liger, nnx.state(softmax, nnx.Param))
    x = jax.random.normal(jax.random.key(8), (1, 5, 32))
    np.testing.assert_allclose(lolcats._qkv(x, jnp.arange(5)[None])[0], softmax._qkv(x, jnp.arange(5)[None])[0])
    assert rel_rms_error(softmax(x), liger(x)) > 1e-3         # but the mixers differ


# ------------------------------------------------------------------------------------------------
# Language models: cached generation, bf16, scanned layers
# ------------------------------------------------------------------------------------------------

def lm_config(**kw):
    return config(**{"pattern": "OIS", "num_layers": 3, **kw})


def jitted_model(model):
    graphdef, state = nnx.split(model)
    run = jax.jit(lambda state, tokens: nnx.merge(graphdef, state)(tokens))
    return lambda tokens: run(state, tokens)


def _at_row_starts(rows, length):
    """Token rows placed at the start of ``[len(rows), length]`` zero rows (causality makes the
    filler irrelevant), so per-sequence references share one shape."""
    out = np.zeros((len(rows), length), np.int32)
    for i, r in enumerate(rows):
        out[i, :len(r)] = np.asarray(r)
    return jnp.asarray(out)


@pytest.fixture(scope="module")
def model():
    return LanguageModel(lm_config(), nnx.Rngs(0))


def test_cached_generation_with_left_padded_prompts_reproduces_the_full_forward(model):
    lengths = [11, 4]                          # past the window, and inside it (left-padded)
    prompt = jax.random.randint(jax.random.key(2), (2, 11), 0, 64)
    tokens, logits = generate(model, prompt, 12, temperature=0.0, return_logits=True, prompt_lengths=lengths)
    rows = [np.concatenate([prompt[b, :n], tokens[b]]) for b, n in enumerate(lengths)]
    full = jitted_model(model)(_at_row_starts(rows, 23))
    for b, n in enumerate(lengths):
        assert rel_rms_error(full[b, n - 1:n + 11], logits[b]) < 1e-4, b
        np.testing.assert_array_equal(tokens[b], jnp.argmax(full[b, n - 1:n + 11], -1))


@pytest.mark.slow
def test_cached_generation_of_full_prompts(model):
    prompt = jax.random.randint(jax.random.key(1), (2, 11), 0, 64)
    tokens, logits = generate(model, prompt, 14, temperature=0.0, return_logits=True)
    full = jitted_model(model)(jnp.concatenate([prompt, tokens], 1))[:, 10:24]
    assert rel_rms_error(full, logits) < 1e-4
    np.testing.assert_array_equal(tokens, jnp.argmax(full, -1))


@pytest.mark.slow
def test_bf16_tracks_float32(model):
    tokens = jax.random.randint(jax.random.key(3), (2, 37), 0, 64)
    low = LanguageModel(lm_config(dtype="bfloat16"), nnx.Rngs(0))
    ref, out = jitted_model(model)(tokens), jitted_model(low)(tokens)
    assert out.dtype == jnp.float32 and np.all(np.isfinite(out))
    assert rel_rms_error(ref, out) < 3e-2
    prompt = tokens[:, :11]
    got, logits = generate(low, prompt, 6, temperature=0.0, return_logits=True)
    full = jitted_model(low)(jnp.concatenate([prompt, got], 1))[:, 10:16]
    assert rel_rms_error(full, logits) < 3e-2


@pytest.mark.slow
def test_scanned_layers_equal_the_unrolled_model():
    tokens = jax.random.randint(jax.random.key(4), (2, 21), 0, 64)
    plain = LanguageModel(lm_config(pattern="OI", num_layers=4), nnx.Rngs(0))
    scanned = LanguageModel(lm_config(pattern="OI", num_layers=4, scan_layers=True), nnx.Rngs(0))
    assert scanned.stack.blocks[0].attn.window_factor[...].shape == (2, 4)
    assert rel_rms_error(jitted_model(plain)(tokens), jitted_model(scanned)(tokens)) < 1e-5
    graphdef, params, rest = nnx.split(scanned, nnx.Param, ...)
    loss = lambda p: jnp.mean(nnx.merge(graphdef, p, rest)(tokens) ** 2)
    grads = jax.jit(jax.grad(loss))(params)
    assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
    prompt = tokens[:, :9]
    got, logits = generate(scanned, prompt, 4, temperature=0.0, return_logits=True)
    full = jitted_model(plain)(jnp.concatenate([prompt, got, jnp.zeros((2, 8), jnp.int32)], 1))[:, 8:12]
    assert rel_rms_error(full, logits) < 1e-4
