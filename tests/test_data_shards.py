"""Token shards: experiments.prepare_data writes them once, training reads them window by window
through grain (deterministic, resumable, one part per JAX process) without loading them."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from experiments.configs.lm_shakespeare import get_config
from experiments.data import ShardBatches, SplitReader, load_corpus, load_data, load_tokenizer, run_tokenizer
from experiments.data.corpus import split_file
from experiments.data.prepare import prepare
from experiments.data.shards import SplitWriter, read_index, token_dtype
from experiments.metrics import read_metrics
from experiments.trainer import train

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def texts(tmp_path_factory):
    """Three files of Shakespeare, paragraphs separated by blank lines, one with non-ASCII text."""
    folder = tmp_path_factory.mktemp("texts")
    text = load_corpus().train[:90_000].tobytes().decode("utf-8", errors="replace")
    for i in range(3):
        part = text[i * 30_000:(i + 1) * 30_000]
        (folder / f"{i}.txt").write_text(part.replace("Romeo", "Roméo") if i == 1 else part, encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def bpe_shards(texts, tmp_path_factory):
    out = tmp_path_factory.mktemp("bpe_shards")
    prepare(str(texts), "bpe:300", str(out), val_fraction=0.1, shard_tokens=5_000, documents="blank_line",
            eos="<|endoftext|>", progress=False, overwrite=True)
    return out


def test_token_dtype_is_the_smallest_that_fits():
    assert [token_dtype(v).name for v in (256, 257, 65_536, 65_537)] == ["uint8", "uint16", "uint16", "uint32"]


def test_byte_shards_hold_the_corpus_bytes(texts, tmp_path):
    index = prepare(str(texts), "byte", str(tmp_path), val_fraction=0.1, shard_tokens=20_000, progress=False)
    parts = [split_file(path.read_bytes(), 0.1, whole_characters=False) for path in sorted(texts.iterdir())]
    train, val = index["splits"]["train"], index["splits"]["val"]
    assert index["dtype"] == "uint8" and index["tokenizer"]["fingerprint"] == "byte" and index["eos"] is None
    assert train["documents"] == 3 and len(train["shards"]) == -(-train["tokens"] // 20_000)
    reader = SplitReader(str(tmp_path), train, index["dtype"])
    stream = reader.read(0, reader.tokens)
    # one document per file: load_corpus's train split without the "\n\n" it puts between files
    assert stream.astype(np.uint8).tobytes() == b"".join(t for t, _ in parts)
    starts = np.cumsum([0] + [len(t) for t, _ in parts[:-1]])
    assert reader.starts_between(-1, reader.tokens).tolist() == starts.tolist()
    assert reader.read(19_998, 4).tolist() == stream[19_998:20_002].tolist()     # across a shard boundary
    assert val["tokens"] == val["text_bytes"] == sum(len(v) for _, v in parts)
    with pytest.raises(ValueError, match="already holds prepared data"):
        prepare(str(texts), "byte", str(tmp_path), progress=False)


def test_bpe_shards_are_deterministic_and_cover_the_text(texts, bpe_shards, tmp_path):
    again = tmp_path / "again"
    prepare(str(texts), "bpe:300", str(again), val_fraction=0.1, shard_tokens=5_000, documents="blank_line",
            eos="<|endoftext|>", progress=False)
    for name in sorted(os.listdir(bpe_shards)):
        if name != "index.json":
            assert (bpe_shards / name).read_bytes() == (again / name).read_bytes(), name
    index = read_index(str(bpe_shards))
    assert index["dtype"] == "uint16" and index["tokenizer"]["file"] == "tokenizer.json"
    assert index["eos"] == {"token": "<|endoftext|>", "id": 0} and index["documents"] == "blank_line"
    tok = load_tokenizer(str(bpe_shards))
    train = SplitReader(str(bpe_shards), index["splits"]["train"], index["dtype"])
    assert train.documents > 100 and len(index["splits"]["train"]["shards"]) > 2
    stream = train.read(0, train.tokens)
    ends = np.append(train.starts_between(0, train.tokens), train.tokens) - 1
    assert (stream[ends] == 0).all() and (stream == 0).sum() == train.documents    # one eos per document
    first = tok.decode(stream[:ends[0]])
    assert first and "\n\n" not in first and first in (texts / "0.txt").read_text(encoding="utf-8")
    # the training split's size in bytes is the documents' text, not its token count
    text = sum(len(tok.decode(stream[a + 1:b]).encode()) for a, b in zip(np.append(-1, ends[:-1]), ends))
    assert train.text_bytes > train.tokens and abs(train.text_bytes - text) <= 0.01 * text
    val = SplitReader(str(bpe_shards), index["splits"]["val"], index["dtype"])
    covered = val.read_bytes(0, val.tokens)
    assert covered.sum() == val.text_bytes and covered[val.read(0, val.tokens) == 0].sum() == 0


def test_documents_options(texts, tmp_path):
    counts = {}
    for documents in ("file", "blank_line", "line", r"re:\n\n"):
        index = prepare(str(texts), "byte", str(tmp_path / str(len(counts))), val_fraction=0.0,
                        documents=documents, progress=False)
        counts[documents] = index["splits"]["train"]["documents"]
    assert counts["file"] == 3 < counts["blank_line"] <= counts[r"re:\n\n"] < counts["line"]
    with pytest.raises(ValueError, match=r"--documents = 'pages' is not one of \['blank_line', 'file', 'line'\]"):
        prepare(str(texts), "byte", str(tmp_path / "x"), documents="pages", progress=False)
    with pytest.raises(ValueError, match=r"--eos = '<\|endoftext\|>' is not a token of --tokenizer = 'byte'"):
        prepare(str(texts), "byte", str(tmp_path / "y"), eos="<|endoftext|>", progress=False)


def _reader(bpe_shards):
    index = read_index(str(bpe_shards))
    return SplitReader(str(bpe_shards), index["splits"]["train"], index["dtype"])


def test_batches_are_deterministic_resumable_and_cover_each_epoch_once(bpe_shards):
    reader = _reader(bpe_shards)
    make = lambda **kw: ShardBatches(reader, batch_size=4, seq_len=31, seed=5, max_segments=3, **kw)
    a, b = make(), make(prefetch=0)
    batches = [next(a) for _ in range(12)]
    for batch, other in zip(batches, (next(b) for _ in range(12))):
        assert all(np.array_equal(batch[k], other[k]) for k in batch)
    assert set(batches[0]) == {"inputs", "targets", "cu_seqlens", "loss_mask"}
    assert batches[0]["inputs"].dtype == np.int32 and batches[0]["cu_seqlens"].shape == (4, 4)
    assert np.array_equal(batches[0]["inputs"][:, 1:], batches[0]["targets"][:, :-1])

    resumed = make()
    resumed.restore(json.loads(json.dumps(make_position(a, 5))))      # the checkpoint's JSON round trip
    for batch in batches[5:]:
        assert all(np.array_equal(batch[k], v) for k, v in next(resumed).items())

    # one epoch visits every window once, at one shift: starts form a shifted arithmetic progression
    whole = ShardBatches(reader, batch_size=1, seq_len=31, seed=5, packing=False, prefetch=0)
    assert "cu_seqlens" not in next(whole)
    firsts = [whole._shift(0) + int(whole._order[i]) * 32 for i in range(whole.windows)]
    assert sorted(firsts) == list(range(whole._shift(0), whole._shift(0) + 32 * whole.windows, 32))
    epoch1 = [int(whole._order[whole.windows + i]) for i in range(whole.windows)]
    assert sorted(epoch1) == list(range(whole.windows)) and epoch1 != [int(whole._order[i]) for i in range(5)]


def make_position(batches, steps):
    """The position a fresh iterator reaches after ``steps`` batches (saved as in a checkpoint)."""
    fresh = ShardBatches(batches.reader, batches.batch_size, batches.seq_len, batches.seed,
                         max_segments=batches.max_segments, prefetch=0)
    for _ in range(steps):
        next(fresh)
    position = fresh.position()
    assert set(position) == {"epoch", "index"} and all(isinstance(v, int) for v in position.values())
    return position


def test_each_process_reads_its_rows_of_the_global_batch(bpe_shards, monkeypatch):
    reader = _reader(bpe_shards)
    whole = ShardBatches(reader, 6, 31, seed=2, prefetch=0)
    parts = [ShardBatches(reader, 6, 31, seed=2, process_index=p, process_count=3) for p in range(3)]
    monkeypatch.setattr(jax, "process_index", lambda: 1)
    monkeypatch.setattr(jax, "process_count", lambda: 3)
    defaulted = ShardBatches(reader, 6, 31, seed=2)
    for _ in range(4):
        batch, local = next(whole), [next(p) for p in parts]
        assert local[0]["inputs"].shape == (2, 31)
        for key in batch:
            assert np.array_equal(np.concatenate([part[key] for part in local]), batch[key])
        assert np.array_equal(next(defaulted)["inputs"], local[1]["inputs"])
    assert {p.position()["index"] for p in parts} == {whole.position()["index"]}
    with pytest.raises(ValueError, match="data.batch_size = 6 must be divisible by the 4 JAX processes"):
        ShardBatches(reader, 6, 31, seed=2, process_count=4, process_index=0)


def _rss() -> dict[str, int]:
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile"):
            fields[key] = int(value.split()[0]) * 1024
    return fields


def test_reading_more_than_a_memory_budget_keeps_memory_flat(tmp_path):
    """~100 MB of tokens, written directly; reading twice that through random packed batches
    (with grain's read-ahead thread) grows the resident size by a small fraction of the data,
    at every point of the run."""
    rng = np.random.default_rng(0)
    writer = SplitWriter(str(tmp_path), "train", np.uint16, shard_tokens=1 << 24)
    total = 50_000_000
    written = 0
    while written < total:
        size = min(int(rng.integers(200, 6_000)), total - written)
        writer.add(rng.integers(0, 50_000, size, dtype=np.uint16))
        written += size
    entry = writer.close()
    data_bytes = 2 * total
    assert sum(os.path.getsize(tmp_path / s["file"]) for s in entry["shards"]) == data_bytes

    reader = SplitReader(str(tmp_path), entry, "uint16")
    batches = ShardBatches(reader, batch_size=16, seq_len=4095, seed=0, max_segments=16, prefetch=2)
    next(batches)
    before = _rss()
    read, peak = 0, dict(before)
    for i in range(1600):
        batch = next(batches)
        read += batch["inputs"].size * 2
        if i % 50 == 0:
            peak = {k: max(v, peak[k]) for k, v in _rss().items()}
    batches.close()
    growth = peak["VmRSS"] - before["VmRSS"]
    more = {k: (peak[k] - before[k]) / 1e6 for k in peak}
    print(f"\nread {read / 1e6:.0f} MB of a {data_bytes / 1e6:.0f} MB split: VmRSS {before['VmRSS'] / 1e6:.0f} MB, "
          f"peak +{more['VmRSS']:.1f} MB (file-backed +{more['RssFile']:.1f} MB, anonymous +{more['RssAnon']:.1f} MB)")
    assert read > 1.5 * data_bytes
    assert growth < 0.1 * data_bytes


def test_document_starts_are_found_through_the_coarse_sample(tmp_path, monkeypatch):
    monkeypatch.setattr(SplitReader, "DOC_BLOCK", 4)
    rng = np.random.default_rng(3)
    writer = SplitWriter(str(tmp_path), "train", np.uint16, shard_tokens=300)
    for size in rng.integers(1, 40, 101):
        writer.add(np.ones(size, np.uint16))
    reader = SplitReader(str(tmp_path), writer.close(), "uint16")
    starts = reader.starts_between(-1, reader.tokens)
    assert starts.size == 101 and starts[0] == 0 and (np.diff(starts) > 0).all()
    for lo in rng.integers(-1, reader.tokens, 200):
        hi = lo + int(rng.integers(0, 120))
        assert reader.starts_between(lo, hi).tolist() == starts[(starts > lo) & (starts <= hi)].tolist()


def shard_config(path, tokenizer, steps=4):
    c = get_config()
    c.data.path, c.data.tokenizer = str(path), str(tokenizer)
    c.data.seq_len, c.data.batch_size, c.data.max_segments = 32, 4, 4
    c.model.vocab_size = 0
    c.model.d_model, c.model.num_layers, c.model.pattern, c.model.num_heads, c.model.chunk_size = 32, 2, "ES", 2, 16
    c.optim.learning_rate, c.optim.warmup_steps = 1e-2, 2
    c.train.steps, c.train.log_every, c.train.eval_every = steps, 1, steps
    c.train.eval_batches, c.train.checkpoint_every, c.train.sample_tokens = 2, 2, 0
    c.mesh.data = 1
    return c


def test_a_run_must_use_the_shards_tokenizer(bpe_shards, tmp_path):
    c = shard_config(bpe_shards, "byte")
    with pytest.raises(ValueError, match=rf"data.tokenizer = 'byte' is not the tokenizer data.path = '{bpe_shards}' "
                                         rf"was prepared with \('bpe:300'.*set --config.data.tokenizer={bpe_shards}"):
        run_tokenizer(c, str(tmp_path))
    c.data.tokenizer = "bpe:300"
    with pytest.raises(ValueError, match=r"data.tokenizer = 'bpe:300' trains a tokenizer, but data.path = .* is "
                                         r"already tokenised"):
        run_tokenizer(c, str(tmp_path))
    c.data.tokenizer = str(bpe_shards / "tokenizer.json")              # the same file by another name is fine
    tok = run_tokenizer(c, str(tmp_path))
    data = load_data(c, tok)
    assert data.packing and "token shards" in data.describe() and "documents per row" in data.describe()
    val = data.val_batches(2)
    assert len(val) == 2 and {"cu_seqlens", "loss_mask", "target_bytes"} <= set(val[0])
    c.data.packing = False
    assert set(load_data(c, tok).val_batches(1)[0]) == {"inputs", "targets", "target_bytes"}
    c.data.packing, c.mesh.sequence = True, 2
    with pytest.raises(ValueError, match="data.packing = True needs mesh.sequence = 1"):
        load_data(c, tok)


@pytest.mark.slow
def test_packed_shard_run_resumes_on_the_uninterrupted_trajectory(bpe_shards, tmp_path):
    c = shard_config(bpe_shards, bpe_shards, steps=6)
    reference = train(c, str(tmp_path / "reference"), show_progress=False)
    assert np.isfinite(reference["val_bpb"])
    c.train.steps = 3
    train(c, str(tmp_path / "resumed"), show_progress=False)
    c.train.steps = 6
    train(c, str(tmp_path / "resumed"), show_progress=False)
    losses = lambda run: {r["step"]: r["loss"] for r in read_metrics(str(tmp_path / run / "metrics.jsonl"))
                          if r["split"] == "train"}
    ref, resumed = losses("reference"), losses("resumed")
    for step in range(4, 7):
        np.testing.assert_allclose(resumed[step], ref[step], rtol=1e-6, err_msg=f"step {step}")
    saved = json.loads((tmp_path / "reference" / "config.json").read_text())
    assert saved["model"]["vocab_size"] == 300 and saved["data"]["packing"] is None


def test_prepare_data_command_line(texts, tmp_path):
    result = subprocess.run([sys.executable, "-m", "experiments.prepare_data", f"--input={texts}/*.txt",
                             f"--out={tmp_path}", "--tokenizer=byte", "--documents=blank_line"],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "tokenising" in result.stderr
    assert f"--config.data.path={tmp_path} --config.data.tokenizer=byte" in result.stdout
    result = subprocess.run([sys.executable, "-m", "experiments.prepare_data", f"--input={texts}/*.txt",
                             f"--out={tmp_path}"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "already holds prepared data" in result.stderr
    assert "Traceback" not in result.stderr
