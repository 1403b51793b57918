"""data.tokenizer = "bpe:N": a byte-level BPE trained on the training split only, deterministic,
kept in the workdir and reused on resume; model.vocab_size = 0 takes its size."""

import json

import numpy as np
import pytest

from experiments.configs.lm_shakespeare import get_config
from experiments.data import JsonTokenizer, bpe, load_corpus, load_tokenizer, run_tokenizer, with_model_vocab
from experiments.data.tokenizer import fingerprint
from experiments.trainer import train

MARKER = "zqxv"          # only in the validation tails: a BPE trained on them would learn it


@pytest.fixture(scope="module")
def text_folder(tmp_path_factory):
    """Two files of Shakespeare whose last 10% are a made-up word, repeated."""
    folder = tmp_path_factory.mktemp("texts")
    text = load_corpus().train[:60_000].tobytes().decode("utf-8", errors="replace")
    for i, part in enumerate((text[:30_000], text[30_000:])):
        tail = (MARKER + " ") * (len(part) // 9 // 5)
        (folder / f"{i}.txt").write_text(part + tail, encoding="utf-8")
    return folder


def bpe_config(folder, vocab=320):
    c = get_config()
    c.data.path, c.data.tokenizer, c.data.val_fraction = str(folder), f"bpe:{vocab}", 0.1
    c.model.vocab_size = 0
    return c


def test_training_is_deterministic_and_round_trips(tmp_path):
    texts = ["But soft, what light through yonder window breaks?\n" * 50, "Roméo — 🙂 and Juliet\n" * 20]
    a = bpe.train_bpe(texts, 300, str(tmp_path / "a" / "tokenizer.json"))
    b = bpe.train_bpe(iter(texts), 300, str(tmp_path / "b" / "tokenizer.json"))
    assert (tmp_path / "a" / "tokenizer.json").read_bytes() == (tmp_path / "b" / "tokenizer.json").read_bytes()
    assert fingerprint(a) == fingerprint(b) and a.vocab_size <= 300
    assert a.token_id(bpe.EOS_TOKEN) == 0
    line = "Roméo — 🙂 what light"
    tokens, counts = a.encode_with_bytes(line)
    assert a.decode(tokens) == line and counts.sum() == len(line.encode("utf-8"))
    assert tokens.size < len(line.encode("utf-8"))


def test_bad_specs_are_clear_errors(tmp_path):
    for spec in ("bpe:", "bpe:abc", "bpe:100"):
        with pytest.raises(ValueError, match=rf"data.tokenizer = '{spec}' must be 'bpe:N' with an integer N >= 257"):
            load_tokenizer(spec, workdir=str(tmp_path), train_texts=lambda: ["x"])
    with pytest.raises(ValueError, match=r"data.tokenizer = 'bpe:300' is trained for a run .* no folder was given"):
        load_tokenizer("bpe:300")


def test_trained_on_the_training_split_only_and_reused(text_folder, tmp_path, monkeypatch):
    c = bpe_config(text_folder)
    tok = run_tokenizer(c, str(tmp_path))
    assert isinstance(tok, JsonTokenizer) and tok.spec == "bpe:320" and tok.vocab_size == 320
    vocab = json.loads((tmp_path / "tokenizer.json").read_text())["model"]["vocab"]
    assert not any("zq" in token or "xv" in token for token in vocab)     # the validation tails were not seen
    assert len(tok.encode(MARKER)) > 2

    def no_training(*args, **kwargs):
        raise AssertionError("a resumed run must not train its tokenizer again")

    monkeypatch.setattr(bpe, "train_bpe", no_training)
    again = run_tokenizer(c, str(tmp_path))
    assert fingerprint(again) == fingerprint(tok)
    assert with_model_vocab(c, again).model.vocab_size == 320 and c.model.vocab_size == 0
    c.model.vocab_size = 512
    assert with_model_vocab(c, again) is c


def test_too_small_a_model_fails_before_training(text_folder, tmp_path):
    c = bpe_config(text_folder, vocab=1024)
    c.model.vocab_size = 256
    with pytest.raises(ValueError, match=r"data.tokenizer = 'bpe:1024' trains a vocabulary of up to 1,024 tokens, "
                                         r"more than model.vocab_size = 256; set --config.model.vocab_size=0"):
        run_tokenizer(c, str(tmp_path))
    assert not (tmp_path / "tokenizer.json").exists()


def test_never_trains_into_another_runs_workdir(text_folder, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"data": {"tokenizer": "byte"}, "model": {}}))
    with pytest.raises(ValueError, match=r"data.tokenizer: checkpoint has 'byte', config has 'bpe:320'"):
        run_tokenizer(bpe_config(text_folder), str(tmp_path))
    assert not (tmp_path / "tokenizer.json").exists()


@pytest.mark.slow
def test_a_bpe_run_trains_resumes_and_reports_bits_per_byte(text_folder, tmp_path, monkeypatch):
    c = bpe_config(text_folder)
    c.data.seq_len, c.data.batch_size = 32, 4
    c.model.d_model, c.model.num_layers, c.model.pattern, c.model.num_heads = 32, 1, "S", 2
    c.train.steps, c.train.log_every, c.train.eval_every, c.train.checkpoint_every = 3, 1, 3, 3
    c.train.eval_batches, c.train.sample_tokens, c.mesh.data = 2, 0, 1
    summary = train(c, str(tmp_path), show_progress=False)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model"]["vocab_size"] == 320 and saved["data"]["tokenizer"] == "bpe:320"
    assert (tmp_path / "tokenizer.json").exists() and np.isfinite(summary["val_bpb"])
    corpus = load_corpus(str(text_folder), 0.1, tokenizer=str(tmp_path / "tokenizer.json"))
    assert corpus.train.size < 0.8 * corpus.train_bytes.sum()             # tokens hold several bytes

    monkeypatch.setattr(bpe, "train_bpe", lambda *a, **k: pytest.fail("retrained on resume"))
    c.train.steps = 4
    assert train(c, str(tmp_path), show_progress=False)["step"] == 4

    # generation finds the run's BPE in the run folder
    from experiments.generate import load_model, resolve_tokenizer
    tokenizer = resolve_tokenizer(load_model(str(tmp_path)), None, str(tmp_path))
    assert isinstance(tokenizer, JsonTokenizer) and tokenizer.vocab_size == 320
