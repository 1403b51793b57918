"""python -m experiments.generate: loading a run folder, cached generation, the decode speed line,
and clear errors for what is not a model."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from experiments import generate as gen
from experiments.configs.lm_shakespeare import get_config
from experiments.data import ByteTokenizer
from experiments.trainer import train
from lolax.models import generate

REPO = Path(__file__).resolve().parents[1]


def tiny_config(data_path, steps=2):
    c = get_config()
    c.data.path = str(data_path)
    c.data.seq_len, c.data.batch_size = 32, 8
    c.model.d_model, c.model.num_layers, c.model.pattern = 32, 2, "LS"
    c.model.num_heads, c.model.chunk_size = 2, 16
    c.optim.warmup_steps = 1
    c.train.steps, c.train.log_every, c.train.eval_every = steps, 1, steps
    c.train.eval_batches, c.train.checkpoint_every, c.train.sample_tokens = 1, steps, 0
    c.mesh.data = 1
    return c


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, text_file):
    """A byte-level run folder, two steps trained."""
    workdir = tmp_path_factory.mktemp("run")
    train(tiny_config(text_file), str(workdir), show_progress=False)
    return workdir


def test_greedy_generation_from_a_run_is_deterministic(run_dir):
    loaded = gen.load_model(str(run_dir))
    assert loaded.kind == "lolax" and loaded.tokenizer == "byte" and loaded.context == 32
    tokenizer = gen.resolve_tokenizer(loaded)
    assert isinstance(tokenizer, ByteTokenizer)
    first = gen.generate_text(loaded.model, tokenizer, "ROMEO:", max_new_tokens=12, temperature=0.0)
    again = gen.generate_text(loaded.model, tokenizer, "ROMEO:", max_new_tokens=12, temperature=0.0, seed=5)
    assert np.array_equal(first.new_tokens, again.new_tokens) and first.text == again.text
    assert first.text.startswith("ROMEO:") and first.new_tokens.shape == (12,)
    assert first.continuation == tokenizer.decode(first.new_tokens)
    assert first.tokens_per_s > 0 and first.compile_s > 0
    # the same tokens as the library's generate called directly
    direct = generate(loaded.model, tokenizer.encode("ROMEO:")[None], 12, temperature=0.0)
    assert np.array_equal(np.asarray(direct[0]), first.new_tokens)


def test_sampling_follows_the_seed(run_dir):
    loaded = gen.load_model(str(run_dir))
    tokenizer = gen.resolve_tokenizer(loaded)
    runs = [gen.generate_text(loaded.model, tokenizer, "To be", 24, temperature=1.0, top_k=50, top_p=0.95, seed=s)
            for s in (1, 1, 2)]
    assert np.array_equal(runs[0].new_tokens, runs[1].new_tokens)
    assert not np.array_equal(runs[0].new_tokens, runs[2].new_tokens)


def test_dtype_and_context_note(run_dir):
    loaded = gen.load_model(str(run_dir), dtype="bfloat16")
    assert loaded.config.dtype == "bfloat16" and loaded.model.config.dtype == "bfloat16"
    assert gen.context_note(loaded, 10, 22) is None
    assert "make 40 tokens, more than the 32 the model was trained on (data.seq_len" in gen.context_note(loaded, 10, 30)
    with pytest.raises(ValueError, match=r"--dtype = 'float64' is not one of"):
        gen.load_model(str(run_dir), dtype="float64")


def test_paths_that_are_not_models_are_clear_errors(tmp_path, run_dir):
    with pytest.raises(ValueError, match="is not a folder"):
        gen.load_model(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match=r"neither a lolax run folder .* nor a Hugging Face checkpoint folder"
                                         r".*; it has no config.json"):
        gen.load_model(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 8}))
    with pytest.raises(ValueError, match="neither a lolax run folder"):
        gen.load_model(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps(json.loads((run_dir / "config.json").read_text())))
    with pytest.raises(ValueError, match="is a lolax run folder without checkpoints"):
        gen.load_model(str(tmp_path))


def test_prompt_and_tokenizer_errors(run_dir, tmp_path):
    loaded = gen.load_model(str(run_dir))
    tokenizer = gen.resolve_tokenizer(loaded)
    with pytest.raises(ValueError, match="the prompt is empty"):
        gen.generate_text(loaded.model, tokenizer, "", 4)
    with pytest.raises(ValueError, match="top_p must lie in"):
        gen.generate_text(loaded.model, tokenizer, "x", 4, top_p=0.0)
    with pytest.raises(ValueError, match=r"--tokenizer = '.*nope.json' does not exist"):
        gen.resolve_tokenizer(loaded, str(tmp_path / "nope.json"))
    moved = gen.LoadedModel(**{**vars(loaded), "tokenizer": str(tmp_path / "gone.json")})
    with pytest.raises(ValueError, match=r"the run's data.tokenizer = .*; pass --tokenizer=PATH"):
        gen.resolve_tokenizer(moved)


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "experiments.generate", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu"})


def test_command_line(run_dir, tmp_path):
    result = _cli(f"--model={run_dir}", "--prompt=ROMEO:", "--max_new_tokens=40", "--temperature=0")
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.rstrip("\n").split("\n")
    assert lines[0].startswith("ROMEO:") and "new tokens in" in lines[-1] and "tokens/s" in lines[-1]
    assert "40 new tokens" in lines[-1] and "more than the 32 the model was trained on" in result.stderr
    bad = _cli(f"--model={tmp_path / 'missing'}", "--prompt=x")
    assert bad.returncode != 0 and "error: --model = " in bad.stderr and "Traceback" not in bad.stderr


@pytest.mark.slow
def test_adapter_run_generates_with_its_adapters_folded_in(run_dir, text_file, tmp_path):
    from experiments import finetune

    c = tiny_config(text_file)
    c.init_from = str(run_dir)
    c.peft.method, c.peft.rank = "lora", 2
    c.optim.learning_rate = 3e-2
    adapter_dir = tmp_path / "lora"
    train(c, str(adapter_dir), show_progress=False)
    loaded = gen.load_model(str(adapter_dir))
    assert loaded.kind == "lolax" and loaded.tokenizer == "byte"
    tokenizer = gen.resolve_tokenizer(loaded)
    merged = gen.generate_text(loaded.model, tokenizer, "ROMEO:", 12, temperature=0.0)
    adapted = finetune.restore_adapted(str(adapter_dir))[0]
    direct = generate(adapted, tokenizer.encode("ROMEO:")[None], 12, temperature=0.0)
    assert np.array_equal(np.asarray(direct[0]), merged.new_tokens)


def test_hugging_face_checkpoint_generates_its_recorded_greedy_continuation():
    fixture = REPO / "tests" / "fixtures" / "hf" / "llama3"
    loaded = gen.load_model(str(fixture))
    assert loaded.kind == "hf" and loaded.tokenizer is None
    with pytest.raises(ValueError, match="has no tokenizer.json; pass --tokenizer"):
        gen.resolve_tokenizer(loaded, model_path=str(fixture))
    expected = np.load(fixture / "expected.npz")          # transformers' greedy continuation
    direct = generate(loaded.model, expected["prompt"][:1], 12, temperature=0.0)
    np.testing.assert_array_equal(np.asarray(direct[0]), expected["greedy"][0])
    out = gen.generate_text(loaded.model, gen.resolve_tokenizer(loaded, "byte"), "ROMEO:", max_new_tokens=12,
                            temperature=0.0)
    again = generate(loaded.model, out.prompt_tokens[None], 12, temperature=0.0)
    np.testing.assert_array_equal(out.new_tokens, np.asarray(again[0]))
