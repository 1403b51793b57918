"""data.tokenizer: a Hugging Face tokenizer.json beside the byte tokenizer, bits per byte that
stays comparable across tokenizers, and a run that trains, samples and resumes with one."""

import json
import math
import os

import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from experiments.checkpoint import check_compatible, write_config
from experiments.configs.lm_shakespeare import get_config
from experiments.data import ByteTokenizer, JsonTokenizer, eval_windows, load_corpus, load_tokenizer
from experiments.data.tokenizer import covered_bytes
from experiments.metrics import read_metrics
from experiments.train_state import evaluate
from experiments.trainer import train

VOCAB = 300


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    """~40 KB of Shakespeare with a few non-ASCII characters mixed in."""
    path = tmp_path_factory.mktemp("data") / "plays.txt"
    text = load_corpus().train[:40_000].tobytes().decode("utf-8", errors="replace")
    path.write_text(text.replace("Romeo", "Roméo").replace("--", "—"), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tokenizer_json(tmp_path_factory, text_file):
    """A byte-level BPE tokenizer of 300 tokens trained on the text, saved as tokenizer.json."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(text_file.read_text(encoding="utf-8").splitlines(), trainer)
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tok.save(str(path))
    return path


def tiny_config(data_path, tokenizer, steps=4):
    c = get_config()
    c.data.path, c.data.tokenizer = str(data_path), str(tokenizer)
    c.data.seq_len, c.data.batch_size = 32, 8
    c.model.vocab_size = 320
    c.model.d_model, c.model.num_layers, c.model.pattern = 32, 2, "LS"
    c.model.num_heads, c.model.chunk_size = 2, 16
    c.optim.learning_rate, c.optim.warmup_steps = 1e-2, 2
    c.train.steps, c.train.log_every, c.train.eval_every = steps, 1, steps
    c.train.eval_batches, c.train.checkpoint_every, c.train.sample_tokens = 2, steps, 0
    c.mesh.data = 1
    return c


def test_json_tokenizer_loads_from_file_or_folder_and_round_trips(tokenizer_json):
    assert get_config().data.tokenizer == "byte" and isinstance(load_tokenizer("byte"), ByteTokenizer)
    for spec in (str(tokenizer_json), str(tokenizer_json.parent)):
        tok = load_tokenizer(spec)
        assert isinstance(tok, JsonTokenizer) and tok.vocab_size == VOCAB and tok.spec == spec
    text = "But soft, what light through yonder window breaks? Roméo — 🙂"
    ids = tok.encode(text)
    assert ids.dtype == np.int32 and 0 < ids.size < len(text.encode("utf-8"))
    assert ids.max() < VOCAB and tok.decode(ids) == text
    tokens, counts = tok.encode_with_bytes(text)
    assert np.array_equal(tokens, ids) and counts.sum() == len(text.encode("utf-8")) and counts.min() >= 0


def test_bad_tokenizer_paths_are_clear_errors(tmp_path):
    expected = r"expected 'byte', a tokenizer.json file, or a folder containing one"
    with pytest.raises(ValueError, match=rf"data.tokenizer = '.*nope.json' does not exist \({expected}\)"):
        load_tokenizer(str(tmp_path / "nope.json"))
    with pytest.raises(ValueError, match=r"data.tokenizer = '.*' is a folder without a tokenizer.json"):
        load_tokenizer(str(tmp_path))
    (tmp_path / "tokenizer.json").write_text('{"not": "a tokenizer"}')
    with pytest.raises(ValueError, match=rf"--tokenizer = '.*' could not be read as a Hugging Face tokenizer.json "
                                         rf"\({expected}\)"):
        load_tokenizer(str(tmp_path), name="--tokenizer")


def test_covered_bytes_by_hand():
    assert covered_bytes("aé b", [(0, 2), (2, 4)]).tolist() == [3, 2]        # 'é' is 2 bytes
    assert covered_bytes("a  b", [(0, 1), (3, 4)]).tolist() == [1, 3]        # skipped spaces go to 'b'
    assert covered_bytes("éx", [(0, 1), (0, 1), (1, 2)]).tolist() == [2, 0, 1]  # 'é' split in 2 tokens
    assert covered_bytes("ab  ", [(0, 1), (1, 2)]).tolist() == [1, 3]        # the uncovered tail
    assert covered_bytes("", []).tolist() == []


def _stub_eval_step(params, batch):
    """Exactly one bit per target token, in nats."""
    return batch["targets"].size * math.log(2)


def test_bits_per_byte_divides_by_the_bytes_the_targets_cover():
    tokens = np.arange(10, dtype=np.int32)
    counts = np.arange(1, 11, dtype=np.int32)        # token i covers i + 1 bytes
    batches = eval_windows(tokens, batch_size=1, seq_len=4, max_batches=2, token_bytes=counts)
    assert [b["target_bytes"].tolist() for b in batches] == [[[2, 3, 4, 5]], [[7, 8, 9, 10]]]
    result = evaluate(_stub_eval_step, None, batches)
    assert result["loss"] == pytest.approx(math.log(2))          # nats per token
    assert result["bpb"] == pytest.approx(8 / 48)                # 8 bits over 14 + 34 bytes
    with pytest.raises(ValueError, match="token_bytes must have the tokens' shape"):
        eval_windows(tokens, 1, 4, 2, token_bytes=counts[:5])


def test_byte_tokenizer_numbers_are_unchanged(text_file):
    default, byte = load_corpus(str(text_file)), load_corpus(str(text_file), tokenizer="byte")
    assert default.train_bytes is None and byte.val_bytes is None
    assert np.array_equal(default.train, byte.train) and np.array_equal(default.val, byte.val)
    assert byte.train.dtype == np.uint8 and "train bytes" in byte.describe()

    def eval_step(params, batch):   # an arbitrary, data-dependent loss
        return float(np.sum(np.sin(batch["targets"] * 0.37 + batch["inputs"] * 0.11) + 1.5))

    plain = eval_windows(byte.val, 4, 16, 3)
    total = sum(eval_step(None, b) for b in plain)
    count = sum(b["targets"].size for b in plain)
    assert evaluate(eval_step, None, plain) == {"loss": total / count, "bpb": total / count / math.log(2)}
    ones = eval_windows(byte.val, 4, 16, 3, token_bytes=np.ones(byte.val.size, np.int32))
    assert evaluate(eval_step, None, ones) == evaluate(eval_step, None, plain)


def test_json_corpus_covers_every_byte(text_file, tokenizer_json):
    byte = load_corpus(str(text_file), 0.1)
    tok = load_corpus(str(text_file), 0.1, tokenizer=str(tokenizer_json))
    assert tok.train.dtype == np.int32 and tok.train.size < 0.8 * byte.train.size
    assert tok.train_bytes.shape == tok.train.shape and tok.val_bytes.shape == tok.val.shape
    assert int(tok.train_bytes.sum()) + int(tok.val_bytes.sum()) == byte.train.size + byte.val.size
    assert "train tokens" in tok.describe()
    decoded = load_tokenizer(str(tokenizer_json)).decode(tok.val)
    assert decoded.encode("utf-8") == byte.val.tobytes()[-len(decoded.encode("utf-8")):]


def test_vocabulary_larger_than_the_model_fails_before_the_model(text_file, tokenizer_json, tmp_path):
    c = tiny_config(text_file, tokenizer_json)
    c.model.vocab_size = 256
    with pytest.raises(ValueError, match=r"data.tokenizer = '.*tokenizer.json' has a vocabulary of 300 tokens, "
                                         r"more than model.vocab_size = 256; set --config.model.vocab_size=300"):
        train(c, str(tmp_path / "run"), show_progress=False)
    assert not (tmp_path / "run").exists()


def test_runs_without_the_field_count_as_byte(tmp_path):
    write_config(str(tmp_path), {"data": {"path": "x"}, "model": {}})       # written before data.tokenizer
    check_compatible(str(tmp_path), {"data": {"path": "x", "tokenizer": "byte"}, "model": {}})
    with pytest.raises(ValueError, match="data.tokenizer: checkpoint has None, config has 'tok.json'"):
        check_compatible(str(tmp_path), {"data": {"path": "x", "tokenizer": "tok.json"}, "model": {}})


def test_train_sample_and_resume_with_a_tokenizer_json(text_file, tokenizer_json, tmp_path, monkeypatch, capsys):
    decoded = []
    original = JsonTokenizer.decode

    def spy(self, tokens, **kwargs):
        decoded.append(np.asarray(tokens).copy())
        return original(self, tokens, **kwargs)

    monkeypatch.setattr(JsonTokenizer, "decode", spy)
    c = tiny_config(text_file, tokenizer_json)
    c.train.sample_tokens, c.train.sample_prompt = 8, "ROMEO:"
    workdir = str(tmp_path / "run")
    summary = train(c, workdir, show_progress=False)
    assert summary["step"] == 4 and np.isfinite(summary["val_bpb"])
    val = [r for r in read_metrics(os.path.join(workdir, "metrics.jsonl")) if r["split"] == "val"][-1]
    # more than one byte per token, so bits per byte is below the loss in bits per token
    assert 0 < val["bpb"] < 0.8 * val["loss"] / math.log(2)
    assert len(decoded) == 1 and decoded[0].size == 8 and isinstance(summary["sample"], str)
    assert "--- sample (8 tokens" in capsys.readouterr().out
    assert json.loads((tmp_path / "run" / "config.json").read_text())["data"]["tokenizer"] == str(tokenizer_json)

    c.train.sample_tokens = 0
    train(c, workdir, show_progress=False)
    assert "resumed from step 4" in capsys.readouterr().out
    c.data.tokenizer = "byte"
    with pytest.raises(ValueError, match=r"data.tokenizer: checkpoint has '.*tokenizer.json', config has 'byte'"):
        train(c, workdir, show_progress=False)

    from experiments.generate import load_model, resolve_tokenizer

    loaded = load_model(workdir)
    assert loaded.tokenizer == str(tokenizer_json) and loaded.context == 32
    assert isinstance(resolve_tokenizer(loaded), JsonTokenizer)
