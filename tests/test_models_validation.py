"""Bad values a model or ``generate`` must refuse: config fields, token ids outside the vocabulary
(eagerly, and under ``jit`` with ``checkify``), and sampling settings."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.experimental import checkify

from lolax.models import LanguageModel, ModelConfig, generate, lm

VOCAB = 32
TINY = dict(vocab_size=VOCAB, d_model=16, num_layers=2, pattern="LS", num_heads=2, chunk_size=4, mlp_hidden=32)


@pytest.fixture(scope="module")
def model():
    return LanguageModel(ModelConfig(**TINY), nnx.Rngs(0))


# ------------------------------------------------------------------------------------------------
# ModelConfig
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("field, value", [
    ("norm_eps", 0.0), ("norm_eps", -1e-6), ("norm_eps", float("nan")), ("norm_eps", float("inf")),
    ("norm_eps", "1e-6"), ("rope_theta", 0.0), ("rope_theta", -10_000.0), ("rope_theta", True),
    ("aux_loss_weight", -0.01), ("aux_loss_weight", float("nan")),
    ("gla_gate_normalizer", float("nan")), ("gla_expand_k", float("nan")),
    ("rope_scaling_factor", 0.0), ("sltrain_alpha", -1.0),
])
def test_config_rejects_bad_float_fields(field, value):
    with pytest.raises(ValueError, match=rf"model\.{field}") as info:
        ModelConfig(**{**TINY, field: value})
    assert repr(value) in str(info.value)


def test_config_accepts_the_edge_values():
    ModelConfig(**TINY, norm_eps=1e-12, rope_theta=1, aux_loss_weight=0)


# ------------------------------------------------------------------------------------------------
# Token ids: eagerly
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bad, low, high", [(VOCAB, 1, VOCAB), (VOCAB + 5, 1, VOCAB + 5), (-1, -1, 3)])
def test_forward_rejects_concrete_ids_outside_the_vocabulary(model, bad, low, high):
    tokens = jnp.array([[1, 2, 3, bad]], jnp.int32)
    message = rf"tokens must be token ids in \[0, vocab_size\) = \[0, {VOCAB}\), got min {low} and max {high}"
    with pytest.raises(ValueError, match=message):
        model(tokens)
    with pytest.raises(ValueError, match=message):
        model.prefill(tokens, max_len=8)
    with pytest.raises(ValueError, match=r"token must be token ids"):
        _, caches = model.prefill(tokens[:, :3], max_len=8)
        model.decode_step(jnp.array([bad]), caches, positions=jnp.array([3]), index=3)


def test_forward_rejects_float_tokens(model):
    with pytest.raises(ValueError, match="tokens must be an integer array of token ids, got dtype float32"):
        model(jnp.ones((1, 4), jnp.float32))


@pytest.mark.parametrize("bad", [VOCAB, -3])
def test_generate_rejects_prompt_ids_outside_the_vocabulary(model, bad):
    prompt = np.array([[1, 2, bad], [4, 5, 6]], np.int32)
    with pytest.raises(ValueError, match=rf"prompt must be token ids in \[0, vocab_size\) = \[0, {VOCAB}\), "
                                         rf"got min {min(bad, 1)} and max {max(bad, 6)}"):
        generate(model, prompt, 2)


def test_generate_ignores_the_padding_after_prompt_lengths(model):
    prompt = np.array([[1, 2, -100], [4, 5, 6]], np.int32)       # row 0's third slot is padding
    padded = generate(model, prompt, 3, temperature=0.0, prompt_lengths=[2, 3])
    clean = generate(model, np.where(prompt < 0, 0, prompt), 3, temperature=0.0, prompt_lengths=[2, 3])
    np.testing.assert_array_equal(padded, clean)


# ------------------------------------------------------------------------------------------------
# Token ids: under jit, with and without checkify
# ------------------------------------------------------------------------------------------------

def test_checkify_catches_out_of_range_ids_under_jit(model):
    forward = checkify.checkify(jax.jit(lambda model, tokens: model(tokens)))
    err, logits = forward(model, jnp.array([[1, 2, 3]], jnp.int32))
    err.throw()
    assert logits.shape == (1, 3, VOCAB) and bool(jnp.isfinite(logits).all())
    for bad in (VOCAB, -1):
        err, _ = forward(model, jnp.array([[1, bad, 3]], jnp.int32))
        assert err.get() is not None and f"[0, {VOCAB})" in err.get() and f"got min {min(bad, 1)}" in err.get()
        with pytest.raises(checkify.JaxRuntimeError, match="tokens must be token ids"):
            err.throw()


def test_checkify_catches_out_of_range_prompt_ids_in_a_jitted_generate(model):
    graphdef, state = nnx.split(model)

    def run(state, prompt, lengths, temperature=0.0):
        return generate(nnx.merge(graphdef, state), prompt, 2, temperature=temperature, prompt_lengths=lengths)

    checked = checkify.checkify(jax.jit(run))
    prompt = jnp.array([[1, 2, 3], [4, 5, 6]], jnp.int32)
    lengths = jnp.array([3, 2])
    err, _ = checked(state, prompt, lengths)
    err.throw()
    err, _ = checked(state, prompt.at[0, 1].set(VOCAB), lengths)
    assert "prompt must be token ids" in (err.get() or "")
    err, _ = checked(state, prompt.at[1, 2].set(VOCAB), lengths)    # padding: not read
    err.throw()
    err, _ = checked(state, prompt, jnp.array([4, 2]))
    assert "prompt_lengths must lie in [1, P] = [1, 3]" in (err.get() or "")
    err, _ = checked(state, prompt, lengths, jnp.float32(-1.0))
    assert "temperature must be a finite number >= 0" in (err.get() or "")


def _instructions(hlo: str) -> list[str]:
    return sorted(line.split("=", 1)[1].split(", metadata=")[0].split("(")[0].strip()
                  for line in hlo.splitlines() if " = " in line and not line.lstrip().startswith("%constant"))


def test_jit_without_checkify_compiles_and_runs_and_costs_nothing(model, monkeypatch):
    forward = jax.jit(lambda model, tokens: model(tokens))
    tokens = jnp.array([[0, 5, VOCAB - 1]], jnp.int32)
    np.testing.assert_allclose(forward(model, tokens), model(tokens), rtol=1e-5, atol=1e-5)
    grads = nnx.grad(lambda m, t: m(t).sum())(model, tokens)
    assert all(bool(jnp.isfinite(g).all()) for g in jax.tree.leaves(nnx.state(grads, nnx.Param)))
    checked_hlo = forward.lower(model, tokens).compile().as_text()
    monkeypatch.setattr(lm, "check_token_ids", lambda *args, **kwargs: None)
    unchecked_hlo = jax.jit(lambda model, tokens: model(tokens)).lower(model, tokens).compile().as_text()
    assert _instructions(checked_hlo) == _instructions(unchecked_hlo)


# ------------------------------------------------------------------------------------------------
# generate's settings
# ------------------------------------------------------------------------------------------------

PROMPT = np.array([[1, 2, 3, 4]], np.int32)


@pytest.mark.parametrize("kwargs, name", [
    (dict(temperature=-0.5), "temperature"), (dict(temperature=float("nan")), "temperature"),
    (dict(temperature=float("inf")), "temperature"), (dict(temperature=np.ones(2)), "temperature"),
    (dict(top_p=0.0), "top_p"), (dict(top_p=-0.1), "top_p"), (dict(top_p=1.5), "top_p"),
    (dict(top_p=float("nan")), "top_p"),
    (dict(top_k=-1), "top_k"), (dict(top_k=2.5), "top_k"), (dict(top_k=True), "top_k"),
    (dict(prompt_lengths=[5]), "prompt_lengths"), (dict(prompt_lengths=[0]), "prompt_lengths"),
    (dict(prompt_lengths=[2, 2]), "prompt_lengths"), (dict(max_new_tokens=0), "max_new_tokens"),
])
def test_generate_rejects_bad_settings(model, kwargs, name):
    kwargs = {"max_new_tokens": 2, **kwargs}
    with pytest.raises(ValueError, match=rf"^{name} must"):
        generate(model, PROMPT, **kwargs)


@pytest.mark.parametrize("off", [0, VOCAB, VOCAB + 10])
def test_top_k_zero_or_the_whole_vocabulary_is_no_filtering(model, off):
    rng = jax.random.key(3)
    reference = generate(model, PROMPT, 6, temperature=1.0, top_k=None, rng=rng)
    np.testing.assert_array_equal(generate(model, PROMPT, 6, temperature=1.0, top_k=off, rng=rng), reference)
    np.testing.assert_array_equal(generate(model, PROMPT, 6, temperature=1.0, top_p=1.0, rng=rng), reference)


def test_edge_settings_are_accepted(model):
    new = generate(model, PROMPT, 3, temperature=0.0, top_k=1, top_p=1e-6, prompt_lengths=[1])
    assert new.shape == (1, 3)
