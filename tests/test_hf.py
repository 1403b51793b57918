"""Hugging Face checkpoints: the fixtures load and reproduce transformers, round trips, errors, mesh loading.

The fixtures in ``tests/fixtures/hf`` come from ``tests/fixtures/hf/make_fixtures.py`` (run by hand
with torch and transformers); these tests need neither.
"""

import dataclasses
import json
import pathlib
import shutil

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from lolax.models import LanguageModel, ModelConfig, generate, hf, peft
from lolax.parallelism import make_mesh, rules

FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "hf"
NAMES = ("llama3", "llama_tied", "mistral", "qwen2", "qwen3")
# float32 logits against transformers' (eager attention, CPU): the largest difference measured
# over the five fixtures was 1.2e-5 (logits of magnitude up to ~7; docs/checkpoints.md).
ATOL = 5e-5


@pytest.fixture(scope="module")
def loaded():
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = hf.load(FIXTURES / name)
        return cache[name]

    return get


def expected(name):
    return np.load(FIXTURES / name / "expected.npz")


def stored_tensors(folder: pathlib.Path) -> dict[str, np.ndarray]:
    out = {}
    for file in sorted(folder.glob("*.safetensors")):
        out.update(load_file(file))
    return out


def flat_params(model) -> dict:
    return {p: np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def copy_fixture(name: str, dest: pathlib.Path) -> pathlib.Path:
    out = dest / name
    shutil.copytree(FIXTURES / name, out)
    return out


def edit_config(folder: pathlib.Path, **changes) -> None:
    file = folder / "config.json"
    config = json.loads(file.read_text())
    config.update(changes)
    file.write_text(json.dumps(config))


# ------------------------------------------------------------------ agreement with transformers


@pytest.mark.parametrize("name", NAMES)
def test_logits_match_transformers(name, loaded):
    model, _ = loaded(name)
    exp = expected(name)
    logits = np.asarray(model(jnp.asarray(exp["input_ids"])))
    assert logits.dtype == np.float32 and logits.shape == exp["logits"].shape
    print(f"{name}: max abs logit difference {np.abs(logits - exp['logits']).max():.2g}, "
          f"greedy top-1 margin {float(exp['greedy_margin']):.2g}")
    np.testing.assert_allclose(logits, exp["logits"], rtol=0, atol=ATOL)


@pytest.mark.parametrize("name", NAMES)
def test_greedy_continuation_matches_transformers(name, loaded):
    model, _ = loaded(name)
    exp = expected(name)
    new = generate(model, jnp.asarray(exp["prompt"]), exp["greedy"].shape[1], temperature=0.0)
    np.testing.assert_array_equal(np.asarray(new), exp["greedy"])


def _drop_option(name: str, model: LanguageModel, cfg: ModelConfig) -> None:
    """Switches off (in place) the option the fixture is there to exercise."""
    for block in model.layers:
        attn = block.attn
        if name in ("llama3", "llama_tied"):       # rotary scaling
            attn.inv_freq = tuple(dataclasses.replace(cfg, rope_scaling="none").rope_inv_freq().tolist())
        if name == "llama_tied":                    # and the output bias
            attn.o_proj.bias.set_value(jnp.zeros_like(attn.o_proj.bias.get_value()))
        if name in ("mistral", "qwen2"):            # sliding windows
            attn.window = None
        if name == "qwen3":                         # the q/k norm weights
            attn.q_norm.scale.set_value(jnp.ones_like(attn.q_norm.scale.get_value()))


@pytest.mark.parametrize("name", NAMES)
def test_fixture_depends_on_its_option(name, loaded):
    """Each fixture is sensitive to what it tests: without the option the logits move far."""
    model, cfg = loaded(name)
    model = nnx.clone(model)
    _drop_option(name, model, cfg)
    exp = expected(name)
    diff = np.abs(np.asarray(model(jnp.asarray(exp["input_ids"]))) - exp["logits"]).max()
    assert diff > 1000 * ATOL


def test_fixture_configs_map_to_model_options(loaded):
    cfg = loaded("llama3")[1]
    assert (cfg.rope_scaling, cfg.rope_scaling_factor, cfg.rope_original_max_len) == ("llama3", 8.0, 32)
    assert not cfg.tie_embeddings and cfg.pattern == "S" and cfg.kv_heads == 2 and cfg.mlp_hidden == 128
    cfg = loaded("llama_tied")[1]
    assert cfg.tie_embeddings and cfg.qkv_bias and cfg.o_bias and cfg.rope_scaling == "linear"
    cfg = loaded("mistral")[1]
    assert (cfg.pattern, cfg.window, cfg.qkv_bias, cfg.rope_theta) == ("W", 8, False, 1e6)
    cfg = loaded("qwen2")[1]
    assert (cfg.pattern, cfg.window, cfg.qkv_bias, cfg.o_bias, cfg.tie_embeddings) == ("SW", 8, True, False, True)
    cfg = loaded("qwen3")[1]
    assert cfg.qk_norm and cfg.head_size == 32 and cfg.d_model == 64 and cfg.num_heads == 4
    assert cfg.norm_eps == 1e-5


# ------------------------------------------------------------------ configs


@pytest.mark.parametrize("name", NAMES)
def test_config_round_trip_on_fixture(name):
    original = json.loads((FIXTURES / name / "config.json").read_text())
    cfg = hf.config_from_hf(original)
    written = hf.config_to_hf(cfg)
    assert hf.config_from_hf(written) == cfg
    skip = {"initializer_range", "transformers_version"}
    if not original.get("use_sliding_window", True):
        skip.add("max_window_layers")      # unused without sliding windows
    differ = {k: (original[k], written[k]) for k in original if k not in skip and original[k] != written.get(k)}
    assert not differ


@pytest.mark.parametrize("cfg", [
    ModelConfig(vocab_size=64, d_model=32, num_layers=2, pattern="S", num_heads=4, mlp_hidden=48),
    ModelConfig(vocab_size=64, d_model=32, num_layers=3, pattern="S", num_heads=4, num_kv_heads=2, mlp_hidden=48,
                qkv_bias=True, o_bias=True, tie_embeddings=True, rope_scaling="llama3", rope_scaling_factor=32.0,
                rope_low_freq_factor=2.0, rope_high_freq_factor=8.0, rope_original_max_len=512),
    ModelConfig(vocab_size=64, d_model=32, num_layers=2, pattern="W", num_heads=2, mlp_hidden=48, window=16,
                head_dim=8, rope_scaling="linear", rope_scaling_factor=2.0, norm_eps=1e-5),
    ModelConfig(vocab_size=64, d_model=32, num_layers=4, pattern="SSWS", num_heads=4, mlp_hidden=48, window=5,
                qkv_bias=True),
    ModelConfig(vocab_size=64, d_model=32, num_layers=2, pattern="S", num_heads=4, head_dim=16, mlp_hidden=48,
                qk_norm=True, qkv_bias=True, o_bias=True, rope_theta=1e6),
], ids=["llama", "llama3-rope", "mistral", "qwen2-windows", "qwen3"])
def test_config_round_trip_from_model_config(cfg):
    written = hf.config_to_hf(cfg)
    json.dumps(written)                               # plain JSON
    assert hf.config_from_hf(written) == cfg


def test_config_to_hf_picks_architecture():
    base = dict(vocab_size=64, d_model=32, num_layers=2, num_heads=4, mlp_hidden=48)
    arch = lambda **kw: hf.config_to_hf(ModelConfig(**base, **kw))["architectures"][0]
    assert arch(pattern="S") == "LlamaForCausalLM"
    assert arch(pattern="W") == "MistralForCausalLM"
    assert arch(pattern="SW", qkv_bias=True) == "Qwen2ForCausalLM"
    assert arch(pattern="S", qk_norm=True) == "Qwen3ForCausalLM"
    written = hf.config_to_hf(ModelConfig(**base, pattern="SW", qkv_bias=True, window=4))
    assert written["layer_types"] == ["full_attention", "sliding_attention"]
    assert (written["use_sliding_window"], written["sliding_window"], written["max_window_layers"]) == (True, 4, 1)


def test_qwen_windows_from_max_window_layers():
    config = json.loads((FIXTURES / "qwen2" / "config.json").read_text())
    del config["layer_types"]
    config.update(num_hidden_layers=4, max_window_layers=3)
    assert hf.config_from_hf(config).pattern == "SSSW"
    config["use_sliding_window"] = False
    assert hf.config_from_hf(config).pattern == "S"


def test_legacy_rope_keys():
    config = json.loads((FIXTURES / "llama3" / "config.json").read_text())
    rope = config.pop("rope_parameters")
    config["rope_theta"] = rope.pop("rope_theta")
    config["rope_scaling"] = {**rope, "type": rope.pop("rope_type")}
    assert hf.config_from_hf(config) == hf.config_from_hf(json.loads((FIXTURES / "llama3" / "config.json").read_text()))


@pytest.mark.parametrize("change, match", [
    ({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}, r"src/config\.json: architectures = \['GPT2"),
    ({"hidden_act": "gelu"}, r"src/config\.json: hidden_act = 'gelu'"),
    ({"mlp_bias": True}, r"src/config\.json: mlp_bias = True"),
    ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}},
     r"src/config\.json: rope_parameters\.rope_type = 'yarn'.*linear"),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}},
     r"rope_parameters\.partial_rotary_factor = 0\.5"),
    ({"rope_parameters": {"rope_type": "linear", "rope_theta": 1e4}}, r"rope_parameters\.factor is missing"),
    ({"model_type": "mistral"}, r"model_type = 'mistral' does not match"),
    ({"num_key_value_heads": 3}, r"src/config\.json: model\.num_kv_heads = 3 must divide"),
    ({"hidden_size": None}, r"hidden_size must be a positive int"),
])
def test_config_from_hf_errors_name_file_key_and_value(change, match):
    config = json.loads((FIXTURES / "llama3" / "config.json").read_text())
    config.update(change)
    with pytest.raises(ValueError, match=match):
        hf.config_from_hf(config, source="src/config.json")


# ------------------------------------------------------------------ save / load round trips


@pytest.mark.parametrize("name, shard", [("qwen2", "5GB"), ("llama3", "100KB")])
def test_save_load_round_trip(name, shard, loaded, tmp_path):
    model, cfg = loaded(name)
    files = hf.save(model, tmp_path, max_shard_size=shard)
    sharded = shard == "100KB"
    assert ("model.safetensors.index.json" in files) == sharded
    assert len([f for f in files if f.endswith(".safetensors")]) == (5 if sharded else 1)
    # the files hold exactly what transformers saved
    saved, original = stored_tensors(tmp_path), stored_tensors(FIXTURES / name)
    assert saved.keys() == original.keys()
    for key in original:
        np.testing.assert_array_equal(saved[key], original[key], err_msg=key)
    again, cfg2 = hf.load(tmp_path)
    assert cfg2 == cfg
    a, b = flat_params(model), flat_params(again)
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    tokens = jnp.asarray(expected(name)["input_ids"])
    np.testing.assert_array_equal(np.asarray(again(tokens)), np.asarray(model(tokens)))
    written = json.loads((tmp_path / "config.json").read_text())
    assert written["torch_dtype"] == written["dtype"] == "float32"


def test_save_overwrites_earlier_weights(loaded, tmp_path):
    model, _ = loaded("qwen3")
    hf.save(model, tmp_path, max_shard_size="100KB")
    hf.save(model, tmp_path, extra_config={"eos_token_id": 7})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    assert json.loads((tmp_path / "config.json").read_text())["eos_token_id"] == 7
    assert hf.load(tmp_path)[1] == loaded("qwen3")[1]


def test_bfloat16_load_and_round_trip(loaded, tmp_path):
    model32, _ = loaded("llama_tied")
    model, cfg = hf.load(FIXTURES / "llama_tied", dtype="bfloat16")
    assert cfg.dtype == cfg.param_dtype == "bfloat16"
    p32, p16 = flat_params(model32), flat_params(model)
    for key in p32:
        assert p16[key].dtype == jnp.bfloat16
        np.testing.assert_array_equal(p16[key], p32[key].astype(ml_dtypes.bfloat16))
    exp = expected("llama_tied")
    logits = np.asarray(model(jnp.asarray(exp["input_ids"])))
    assert np.abs(logits - exp["logits"]).max() < 0.5          # bfloat16 compute: loose
    hf.save(model, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert all(t.dtype == ml_dtypes.bfloat16 for t in stored_tensors(tmp_path).values())
    again, _ = hf.load(tmp_path, dtype="bfloat16")
    for key, value in flat_params(again).items():
        np.testing.assert_array_equal(value, p16[key])


@pytest.mark.parametrize("stored", [np.float16, ml_dtypes.bfloat16])
def test_half_precision_files_load_as_float32(stored, loaded, tmp_path):
    folder = tmp_path / "half"
    folder.mkdir()
    shutil.copy(FIXTURES / "llama_tied" / "config.json", folder)
    save_file({k: v.astype(stored) for k, v in stored_tensors(FIXTURES / "llama_tied").items()},
              folder / "model.safetensors")
    model, _ = hf.load(folder)
    reference = flat_params(loaded("llama_tied")[0])
    for key, value in flat_params(model).items():
        assert value.dtype == np.float32
        np.testing.assert_array_equal(value, reference[key].astype(stored).astype(np.float32))


def test_scanned_load_and_save(loaded, tmp_path):
    model, cfg = loaded("llama3")
    scanned, scfg = hf.load(FIXTURES / "llama3", scan_layers=True, remat="full")
    assert scfg.scan_layers and scanned.stack.blocks[0].attn.q_proj.kernel.shape == (2, 64, 64)
    tokens = jnp.asarray(expected("llama3")["input_ids"])
    np.testing.assert_allclose(np.asarray(scanned(tokens)), np.asarray(model(tokens)), rtol=0, atol=1e-5)
    hf.save(scanned, tmp_path)
    again, _ = hf.load(tmp_path)
    reference = flat_params(model)
    for key, value in flat_params(again).items():
        np.testing.assert_array_equal(value, reference[key])


# ------------------------------------------------------------------ errors


def test_missing_config(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"config\.json not found"):
        hf.load(tmp_path)


def test_unsupported_architecture_names_the_file(tmp_path):
    folder = copy_fixture("llama3", tmp_path)
    edit_config(folder, architectures=["GemmaForCausalLM"], model_type="gemma")
    with pytest.raises(ValueError, match=rf"{folder / 'config.json'}: architectures = \['GemmaForCausalLM'\].*"
                                         r"supported.*LlamaForCausalLM"):
        hf.load(folder)


def test_unsupported_rope_type_names_the_file(tmp_path):
    folder = copy_fixture("llama3", tmp_path)
    edit_config(folder, rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4})
    with pytest.raises(ValueError, match=rf"{folder / 'config.json'}: rope_parameters.rope_type = 'dynamic'"):
        hf.load(folder)


def test_missing_shard(tmp_path):
    folder = copy_fixture("qwen3", tmp_path)
    (folder / "model-00003-of-00004.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"shard model-00003-of-00004\.safetensors named by .*index\.json"):
        hf.load(folder)


def test_missing_weights_file(tmp_path):
    folder = copy_fixture("llama3", tmp_path)
    (folder / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"neither model\.safetensors nor model\.safetensors\.index\.json"):
        hf.load(folder)


def test_missing_tensor(tmp_path):
    folder = copy_fixture("llama3", tmp_path)
    tensors = stored_tensors(folder)
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, folder / "model.safetensors")
    with pytest.raises(ValueError, match=r"tensor model\.layers\.1\.mlp\.up_proj\.weight is missing"):
        hf.load(folder)


def test_tensor_listed_in_index_but_not_in_its_shard(tmp_path):
    folder = copy_fixture("qwen3", tmp_path)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.norm.weight"] = "model-00001-of-00004.safetensors"
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=r"model\.norm\.weight is listed in .* model-00001-of-00004\.safetensors"):
        hf.load(folder)


def test_unexpected_tensors(tmp_path):
    folder = copy_fixture("llama3", tmp_path)
    tensors = stored_tensors(folder)
    tensors["model.layers.0.self_attn.q_proj.bias"] = np.zeros(64, np.float32)
    tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = np.zeros(8, np.float32)     # ignored
    save_file(tensors, folder / "model.safetensors")
    with pytest.raises(ValueError, match=r"unexpected tensors .*: model\.layers\.0\.self_attn\.q_proj\.bias$"):
        hf.load(folder)


def test_tied_checkpoint_may_store_its_head(loaded, tmp_path):
    folder = copy_fixture("qwen2", tmp_path)
    tensors = stored_tensors(folder)
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"]        # skipped, as transformers does
    save_file(tensors, folder / "model.safetensors")
    model, cfg = hf.load(folder)
    assert cfg.tie_embeddings and model.lm_head is None


def test_non_float_tensor(tmp_path):
    folder = copy_fixture("llama3", tmp_path)
    tensors = stored_tensors(folder)
    tensors["model.norm.weight"] = np.ones(64, np.int32)
    save_file(tensors, folder / "model.safetensors")
    with pytest.raises(ValueError, match=r"tensor model\.norm\.weight in .*model\.safetensors is stored as I32"):
        hf.load(folder)


def test_wrong_shape(tmp_path):
    folder = copy_fixture("llama3", tmp_path)
    edit_config(folder, intermediate_size=96)
    with pytest.raises(ValueError, match=r"tensor model\.layers\.0\.mlp\.gate_proj\.weight in .*model\.safetensors "
                                         r"has shape \[128, 64\], but .*config\.json implies \[96, 64\]"):
        hf.load(folder)


def test_load_refuses_structural_overrides():
    with pytest.raises(ValueError, match=r"\['d_model'\] are not runtime fields"):
        hf.load(FIXTURES / "llama3", d_model=32)


def _small(**kw) -> LanguageModel:
    values = dict(vocab_size=64, d_model=32, num_layers=2, pattern="S", num_heads=4, mlp_hidden=64)
    return LanguageModel(ModelConfig(**{**values, **kw}), nnx.Rngs(0))


@pytest.mark.parametrize("kw, match", [
    ({"pattern": "LS"}, r"\['linear_attn'\] layers: Hugging Face checkpoints hold softmax"),
    ({"sltrain_rank": 4}, r"model\.sltrain_rank = 4: SLTrain"),
    ({"o_bias": True}, r"model\.o_bias = True with model\.qkv_bias = False"),
    ({"pattern": "SW"}, r"per-layer sliding windows exist only in Qwen2"),
])
def test_save_refuses_inexpressible_models(kw, match, tmp_path):
    model = nnx.eval_shape(lambda: _small(**kw))           # refused before any array is read
    with pytest.raises(ValueError, match=match):
        hf.save(model, tmp_path)


def test_save_refuses_adapters(tmp_path):
    model = _small()
    peft.apply(model, peft.PeftConfig(method="lora", rank=2), nnx.Rngs(1))
    with pytest.raises(ValueError, match=r"layers\.\d\.attn\.[qkvo]_proj is a LoRA adapter.*peft\.merge"):
        hf.save(model, tmp_path)
    hf.save(peft.merge(model), tmp_path)                  # merged: an ordinary model again
    assert hf.load(tmp_path)[1].d_model == 32


def test_is_checkpoint(tmp_path):
    assert all(hf.is_checkpoint(FIXTURES / name) for name in NAMES)
    assert not hf.is_checkpoint(tmp_path)
    assert not hf.is_checkpoint(tmp_path / "absent")
    (tmp_path / "config.json").write_text("{not json")
    assert not hf.is_checkpoint(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 8}))
    assert not hf.is_checkpoint(tmp_path)


# ------------------------------------------------------------------ mesh loading


def test_mesh_load_is_sharded_by_the_rules_and_equal(loaded, monkeypatch):
    mesh = make_mesh({"data": 1, "fsdp": 2, "tensor": 4})
    reference, _ = loaded("qwen3")          # before the recording starts: it reads whole tensors
    reads = []
    read = hf.SafetensorsFolder.read

    def recording_read(self, name, index=None):
        out = read(self, name, index)
        reads.append((name, out.size))
        return out

    monkeypatch.setattr(hf.SafetensorsFolder, "read", recording_read)
    model, _ = hf.load(FIXTURES / "qwen3", mesh=mesh)
    state = nnx.state(model, nnx.Param)
    want = {p: v.get_value() for p, v in nnx.to_flat_state(rules.state_shardings(state, mesh))}
    ref = flat_params(reference)
    for path, var in nnx.to_flat_state(state):
        value = var.get_value()
        assert isinstance(want[path], jax.sharding.NamedSharding)
        assert value.sharding.is_equivalent_to(want[path], value.ndim), path
        np.testing.assert_array_equal(np.asarray(value), ref[path])
    q = model.layers[0].attn.q_proj.kernel.get_value()
    assert q.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
    # each device read its own eighth of q_proj, never the whole tensor
    sizes = [size for name, size in reads if name == "model.layers.0.self_attn.q_proj.weight"]
    assert sizes and max(sizes) == q.size // 8
    tokens = jnp.asarray(expected("qwen3")["input_ids"])
    with jax.set_mesh(mesh):
        logits = model(tokens)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(reference(tokens)), rtol=0, atol=1e-5)
