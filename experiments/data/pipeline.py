"""What the trainer asks of the data: the run's tokenizer, its training batches and validation batches.

``data.path`` is either text (the embedded corpus, a file, folder or glob; tokenised in memory at
start-up, :mod:`experiments.data.corpus`) or a folder written by ``experiments.prepare_data``
(recognised by its ``index.json``; read window by window, :mod:`experiments.data.loader`).

* :func:`run_tokenizer`: ``data.tokenizer`` for this run (``bpe:N`` trained on the training split
  into the workdir, or loaded from there on resume; a prepared folder's tokenizer checked against
  the one it was prepared with).
* :func:`with_model_vocab`: ``model.vocab_size = 0`` becomes the tokenizer's vocabulary.
* :func:`load_data`: a :class:`TextData` or :class:`ShardData` with ``batches(seed)``,
  ``val_batches(max_batches)`` and ``describe()``.
* :func:`to_device`: a host batch onto the mesh (per-process rows on several hosts).
"""

from __future__ import annotations

import json
import os

import jax
import ml_collections
import numpy as np

from experiments.data import bpe
from experiments.data.batches import BatchIterator, eval_windows
from experiments.data.corpus import Corpus, load_corpus, train_texts
from experiments.data.loader import ShardBatches, process_rows
from experiments.data.packing import default_max_segments
from experiments.data.shards import SplitReader, is_prepared, read_index
from experiments.data.tokenizer import BPE_PREFIX, TOKENIZER_FILE, Tokenizer, fingerprint, load_tokenizer


def _setting(d: ml_collections.ConfigDict, key: str, default):
    value = d.get(key, default)
    return default if value is None else value


def run_tokenizer(config: ml_collections.ConfigDict, workdir: str) -> Tokenizer:
    """The tokenizer ``config.data.tokenizer`` names for the run in ``workdir``.

    ``bpe:N`` is ``workdir/tokenizer.json``, trained on the training split of ``data.path`` when
    the file does not exist yet (after checking that N fits ``model.vocab_size``, unless that is 0,
    and that the workdir holds no run with another tokenizer). With a prepared ``data.path`` the
    tokenizer must be the one the shards were made with (``data.tokenizer`` = the prepared folder).
    """
    d = config.data
    spec = _setting(d, "tokenizer", "byte")
    if is_prepared(d.path):
        return _prepared_tokenizer(d.path, spec)
    if isinstance(spec, str) and spec.strip().startswith(BPE_PREFIX):
        vocab_size = bpe.parse_spec(spec)
        model_vocab = config.model.get("vocab_size") if "model" in config else 0
        if not config.get("init_from") and model_vocab and model_vocab < vocab_size:
            raise ValueError(f"data.tokenizer = {spec!r} trains a vocabulary of up to {vocab_size:,} tokens, more "
                             f"than model.vocab_size = {model_vocab:,}; set --config.model.vocab_size=0 (the "
                             f"tokenizer's size) or {vocab_size}")
        _refuse_other_run(workdir, spec)
        return load_tokenizer(spec, workdir=workdir, train_texts=lambda: train_texts(d.path, d.val_fraction))
    return load_tokenizer(spec)


def _refuse_other_run(workdir: str, spec: str) -> None:
    """Never trains a tokenizer into a workdir whose run used another one (checkpoint.check_compatible
    would refuse that run later, after the training)."""
    config = os.path.join(workdir, "config.json")
    if os.path.isfile(os.path.join(workdir, TOKENIZER_FILE)) or not os.path.isfile(config):
        return
    with open(config) as f:
        saved = json.load(f).get("data", {}).get("tokenizer", "byte")
    if saved != spec:
        raise ValueError(f"workdir {workdir!r} holds checkpoints from an incompatible config:\n  data.tokenizer: "
                         f"checkpoint has {saved!r}, config has {spec!r}\nUse a new --workdir, or the same settings "
                         "to resume.")


def _prepared_tokenizer(path: str, spec: str) -> Tokenizer:
    index = read_index(path)
    recorded = index["tokenizer"]
    hint = (f"set --config.data.tokenizer={path}" if recorded.get("file") else "set --config.data.tokenizer=byte")
    if isinstance(spec, str) and spec.strip().startswith(BPE_PREFIX):
        raise ValueError(f"data.tokenizer = {spec!r} trains a tokenizer, but data.path = {path!r} is already "
                         f"tokenised (with {recorded['spec']!r}); {hint}")
    tokenizer = load_tokenizer(spec)
    if fingerprint(tokenizer) != recorded["fingerprint"]:
        raise ValueError(f"data.tokenizer = {spec!r} is not the tokenizer data.path = {path!r} was prepared with "
                         f"({recorded['spec']!r}, fingerprint {recorded['fingerprint'][:20]}...); {hint}")
    return tokenizer


def with_model_vocab(config: ml_collections.ConfigDict, tokenizer: Tokenizer) -> ml_collections.ConfigDict:
    """``config`` with ``model.vocab_size = 0`` (the sentinel for "the tokenizer's") replaced by
    ``tokenizer.vocab_size``; unchanged (the same object) otherwise."""
    if config.model.get("vocab_size") != 0:
        return config
    config = config.copy_and_resolve_references()
    config.model.vocab_size = int(tokenizer.vocab_size)
    return config


def packing_settings(d: ml_collections.ConfigDict, prepared: bool, sequence_devices: int = 1) -> tuple[bool, int]:
    """``(packing, max_segments)``: ``data.packing`` (None: on for token shards, off for text) and
    ``data.max_segments`` (0: :func:`experiments.data.packing.default_max_segments`)."""
    packing = _setting(d, "packing", prepared)
    max_segments = int(_setting(d, "max_segments", 0)) or default_max_segments(d.seq_len)
    if max_segments < 1:
        raise ValueError(f"data.max_segments must be >= 0 (0: automatic), got {max_segments}")
    if packing and sequence_devices > 1:
        raise ValueError(f"data.packing = True needs mesh.sequence = 1 (got {sequence_devices}): sequence-parallel "
                         "layers take no packed rows; set --config.data.packing=False")
    return bool(packing), max_segments


class LocalRows:
    """This JAX process's rows of every batch of ``batches`` (same position and restore)."""

    def __init__(self, batches: BatchIterator, process_index: int | None = None, process_count: int | None = None):
        self.batches = batches
        self.first_row, self.rows = process_rows(batches.batch_size, process_index, process_count)

    def position(self) -> dict[str, int]:
        return self.batches.position()

    def restore(self, position: dict[str, int]) -> None:
        self.batches.restore(position)

    def __iter__(self) -> LocalRows:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        return {k: v[self.first_row:self.first_row + self.rows] for k, v in next(self.batches).items()}


class TextData:
    """A text corpus tokenised in memory (:func:`experiments.data.corpus.load_corpus`).

    Without packing its batches are exactly :class:`BatchIterator`'s and :func:`eval_windows`'s.
    """

    def __init__(self, corpus: Corpus, d: ml_collections.ConfigDict, packing: bool, max_segments: int):
        self.corpus, self.d, self.packing, self.max_segments = corpus, d, packing, max_segments

    def describe(self) -> str:
        return self.corpus.describe() + (f"; packed, {self.max_segments} segments per row" if self.packing else "")

    def batches(self, seed: int) -> BatchIterator | LocalRows:
        """The training batches; with several JAX processes, each process's rows of them."""
        d, c = self.d, self.corpus
        if not self.packing:
            batches = BatchIterator(c.train, d.batch_size, d.seq_len, seed)
        else:
            batches = BatchIterator(c.train, d.batch_size, d.seq_len, seed, doc_starts=c.train_docs,
                                    max_segments=self.max_segments)
        return batches if jax.process_count() == 1 else LocalRows(batches)

    def val_batches(self, max_batches: int) -> list[dict[str, np.ndarray]]:
        d, c = self.d, self.corpus
        if not self.packing:
            return eval_windows(c.val, d.batch_size, d.seq_len, max_batches, c.val_bytes)
        return eval_windows(c.val, d.batch_size, d.seq_len, max_batches, c.val_bytes, doc_starts=c.val_docs,
                            max_segments=self.max_segments)


class ShardData:
    """A prepared folder: splits read window by window, batches from :class:`ShardBatches`."""

    def __init__(self, path: str, d: ml_collections.ConfigDict, packing: bool, max_segments: int):
        self.path, self.d, self.packing, self.max_segments = path, d, packing, max_segments
        self.index = read_index(path)
        dtype, splits = self.index["dtype"], self.index["splits"]
        self.train = SplitReader(path, splits["train"], dtype)
        self.val = SplitReader(path, splits["val"], dtype)
        self.prefetch = int(_setting(d, "prefetch", 2))

    def describe(self) -> str:
        t, v = self.train, self.val
        text = (f"token shards {self.path} ({self.index['tokenizer']['spec']}, {self.index['dtype']}): "
                f"{t.tokens:,} train tokens in {t.documents:,} documents ({t.text_bytes:,} bytes), "
                f"{v.tokens:,} validation tokens ({v.text_bytes:,} bytes)")
        if self.packing:
            per_row = self.d.seq_len * t.documents / max(t.tokens, 1)
            text += f"; packed, {self.max_segments} segments per row (~{per_row:.2g} documents per row)"
        return text

    def batches(self, seed: int) -> ShardBatches:
        return ShardBatches(self.train, self.d.batch_size, self.d.seq_len, seed, packing=self.packing,
                            max_segments=self.max_segments, prefetch=self.prefetch)

    def val_batches(self, max_batches: int) -> list[dict[str, np.ndarray]]:
        """The first windows of the validation split (every process reads all of them)."""
        d, v = self.d, self.val
        window = d.seq_len + 1
        count = min(v.tokens // window, d.batch_size * max_batches) * window
        if count == 0:
            raise ValueError(f"seq_len = {d.seq_len} needs at least {window} tokens, but the validation split has "
                             f"only {v.tokens}; use a shorter --config.data.seq_len or more text")
        tokens = v.read(0, count)
        token_bytes = v.read_bytes(0, count) if v.has_bytes else None
        doc_starts = v.starts_between(-1, count - 1) if self.packing else None
        return eval_windows(tokens, d.batch_size, d.seq_len, max_batches, token_bytes, doc_starts=doc_starts,
                            max_segments=self.max_segments)


def load_data(config: ml_collections.ConfigDict, tokenizer: Tokenizer) -> TextData | ShardData:
    """The data of ``config.data`` tokenised by ``tokenizer`` (from :func:`run_tokenizer`)."""
    d = config.data
    prepared = is_prepared(d.path)
    mesh = config.get("mesh")
    sequence = int(mesh.get("sequence", 1)) if mesh is not None else 1
    packing, max_segments = packing_settings(d, prepared, sequence)
    if prepared:
        data = ShardData(os.path.expanduser(d.path), d, packing, max_segments)
        if packing:
            warn_if_segments_short(d.seq_len * data.train.documents / max(data.train.tokens, 1), max_segments)
        return data
    return TextData(load_corpus(d.path, d.val_fraction, tokenizer), d, packing, max_segments)


def warn_if_segments_short(documents_per_row: float, max_segments: int) -> bool:
    """Prints a warning (and returns True) when rows hold on average more documents than their
    ``max_segments`` segments can separate: the documents past the last kept boundary share a
    segment, so states carry across them."""
    if documents_per_row + 1 <= max_segments:
        return False
    wanted = int(np.ceil(documents_per_row)) + 2
    print(f"warning: rows hold ~{documents_per_row:.2g} documents on average, more than data.max_segments = "
          f"{max_segments} segments can separate, so some documents share a segment and states carry across "
          f"them; set --config.data.max_segments={wanted} to reset at (nearly) every start, at some cost in speed")
    return True


def to_device(batch: dict[str, np.ndarray], sharding: jax.sharding.NamedSharding) -> dict[str, jax.Array]:
    """Places a host batch: ``jax.device_put`` in a single process; with several JAX processes each
    holds its own rows (:class:`ShardBatches`, or its slice of a text batch) and the global batch
    is assembled with ``jax.make_array_from_process_local_data``."""
    if jax.process_count() == 1:
        return jax.device_put(batch, sharding)
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}
