"""Token shards: a prepared folder of raw token files and the JSON index that names them.

``python -m experiments.prepare_data`` writes, for each split (``train``, ``val``):

* ``<split>-00000.tokens``, ``<split>-00001.tokens``, ...: the split's token stream (documents one
  after another), raw little-endian integers of the index's ``dtype`` (``uint8`` for a vocabulary
  of at most 256, ``uint16`` up to 65,536, else ``uint32``), at most ``shard_tokens`` per file;
* ``<split>.docs``: int64 offsets in the stream where each document starts;
* ``<split>-00000.bytes``, ...: with a ``tokenizer.json``, the UTF-8 bytes each validation token
  covers (uint32, for bits per byte);

plus ``index.json`` (:data:`INDEX_FILE`: counts, dtype, the tokenizer's spec and fingerprint, how
documents were split) and, with a ``tokenizer.json``, a copy of it. Reading
(:class:`SplitReader`) fetches only the windows asked for, with ``pread``: resident memory stays
flat whatever the size of the data.

>>> import tempfile
>>> folder = tempfile.mkdtemp()
>>> writer = SplitWriter(folder, "train", np.uint16, shard_tokens=4)
>>> writer.add(np.array([1, 2, 3])); writer.add(np.array([4, 5, 6, 7]))
>>> entry = writer.close()
>>> entry["tokens"], entry["documents"], [s["tokens"] for s in entry["shards"]]
(7, 2, [4, 3])
>>> reader = SplitReader(folder, entry, "uint16")
>>> reader.read(2, 4).tolist(), reader.starts_between(-1, 7).tolist()
([3, 4, 5, 6], [0, 3])
"""

from __future__ import annotations

import json
import os

import numpy as np

INDEX_FILE = "index.json"
FORMAT = "lolax-token-shards"
VERSION = 1


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned dtype that holds ids below ``vocab_size``: uint8, uint16 or uint32."""
    for dtype in (np.uint8, np.uint16, np.uint32):
        if vocab_size <= np.iinfo(dtype).max + 1:
            return np.dtype(dtype)
    raise ValueError(f"vocab_size must be <= 2**32, got {vocab_size}")


def is_prepared(path: str) -> bool:
    """Whether ``path`` is a folder written by ``experiments.prepare_data`` (it holds an index)."""
    return isinstance(path, str) and os.path.isfile(os.path.join(os.path.expanduser(path), INDEX_FILE))


def read_index(path: str) -> dict:
    """The index of the prepared folder ``path``; ValueError if it is not one this code reads."""
    file = os.path.join(os.path.expanduser(path), INDEX_FILE)
    with open(file) as f:
        index = json.load(f)
    if index.get("format") != FORMAT or index.get("version") != VERSION:
        raise ValueError(f"{file} is not a {FORMAT} index of version {VERSION} (format "
                         f"{index.get('format')!r}, version {index.get('version')!r}); prepare the data again")
    return index


def write_index(path: str, index: dict) -> None:
    """Writes ``index`` (through a temporary file: a folder has an index only once complete)."""
    file = os.path.join(path, INDEX_FILE)
    with open(file + ".partial", "w") as f:
        json.dump({"format": FORMAT, "version": VERSION, **index}, f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(file + ".partial", file)


class SplitWriter:
    """Appends one split's documents to shard files of at most ``shard_tokens`` tokens.

    A document may run over into the next shard: the shards are one stream. ``add`` takes its
    tokens (and, with ``with_bytes``, the bytes each covers); they are buffered and written about
    every ``FLUSH_TOKENS``. ``close`` returns the split's index entry.
    """

    FLUSH_TOKENS = 1 << 22

    def __init__(self, folder: str, split: str, dtype, shard_tokens: int, with_bytes: bool = False):
        if shard_tokens < 1:
            raise ValueError(f"shard_tokens must be >= 1, got {shard_tokens}")
        self.folder, self.split, self.dtype = folder, split, np.dtype(dtype)
        self.shard_tokens, self.with_bytes = shard_tokens, with_bytes
        self.shards: list[dict] = []
        self.bytes_files: list[str] = []
        self.tokens = 0                 # added so far (written or buffered)
        self.text_bytes = 0
        self._file = self._bytes = None
        self._docs = open(os.path.join(folder, f"{split}.docs"), "wb")
        self._documents = 0
        self._pending: list[tuple[np.ndarray, np.ndarray | None]] = []
        self._pending_tokens = 0
        self._starts: list[int] = []

    def _open_shard(self) -> None:
        name = f"{self.split}-{len(self.shards):05d}"
        self.shards.append({"file": f"{name}.tokens", "tokens": 0})
        self._file = open(os.path.join(self.folder, f"{name}.tokens"), "wb")
        if self.with_bytes:
            self.bytes_files.append(f"{name}.bytes")
            self._bytes = open(os.path.join(self.folder, f"{name}.bytes"), "wb")

    def _close_shard(self) -> None:
        for f in (self._file, self._bytes):
            if f is not None:
                f.close()
        self._file = self._bytes = None

    def add(self, tokens: np.ndarray, token_bytes: np.ndarray | None = None, text_bytes: int | None = None) -> None:
        """Appends one document (nothing for an empty one); ``text_bytes``, the document's size in
        bytes, counts towards the split's text bytes when ``token_bytes`` is not given."""
        tokens = np.asarray(tokens)
        if tokens.size == 0:
            return
        if tokens.min() < 0 or tokens.max() > np.iinfo(self.dtype).max:
            raise ValueError(f"token ids must fit {self.dtype}, got range [{tokens.min()}, {tokens.max()}]")
        if self.with_bytes and (token_bytes is None or np.shape(token_bytes) != tokens.shape):
            raise ValueError(f"token_bytes must have the tokens' shape {tokens.shape}")
        self._starts.append(self.tokens)
        self._documents += 1
        self._pending.append((tokens.astype(self.dtype), None if not self.with_bytes
                              else np.asarray(token_bytes).astype(np.uint32)))
        self._pending_tokens += tokens.size
        self.tokens += tokens.size
        if token_bytes is not None:
            self.text_bytes += int(np.sum(token_bytes))
        elif text_bytes is not None:
            self.text_bytes += int(text_bytes)
        if self._pending_tokens >= self.FLUSH_TOKENS:
            self._flush()

    def _flush(self) -> None:
        if self._starts:
            np.asarray(self._starts, np.int64).tofile(self._docs)
            self._starts = []
        if not self._pending:
            return
        tokens = np.concatenate([t for t, _ in self._pending])
        counts = np.concatenate([b for _, b in self._pending]) if self.with_bytes else None
        self._pending, self._pending_tokens = [], 0
        done = 0
        while done < tokens.size:
            if self._file is None or self.shards[-1]["tokens"] == self.shard_tokens:
                self._close_shard()
                self._open_shard()
            take = min(tokens.size - done, self.shard_tokens - self.shards[-1]["tokens"])
            tokens[done:done + take].tofile(self._file)
            if counts is not None:
                counts[done:done + take].tofile(self._bytes)
            self.shards[-1]["tokens"] += take
            done += take

    def close(self) -> dict:
        """Writes what is buffered and closes the files; the split's index entry."""
        self._flush()
        self._close_shard()
        self._docs.close()
        return {"tokens": self.tokens, "documents": self._documents, "shards": self.shards,
                "docs_file": f"{self.split}.docs", "bytes_files": self.bytes_files if self.with_bytes else None,
                "text_bytes": self.text_bytes or self.tokens}


class _File:
    """A read-only file of fixed-size integers, read at offsets with ``os.pread`` (no map)."""

    def __init__(self, path: str, dtype):
        self.path, self.dtype = path, np.dtype(dtype)
        self.size = os.path.getsize(path) // self.dtype.itemsize
        self.fd = os.open(path, os.O_RDONLY)

    def read(self, start: int, count: int, out: np.ndarray | None = None) -> np.ndarray:
        """Items ``[start, start + count)`` (into ``out`` when given, of this file's dtype)."""
        out = np.empty(count, self.dtype) if out is None else out
        view = memoryview(out).cast("B")
        done, offset = 0, start * self.dtype.itemsize
        while done < view.nbytes:
            got = os.preadv(self.fd, [view[done:]], offset + done)
            if got <= 0:
                raise ValueError(f"{self.path} ended early (read {done} of {view.nbytes} bytes at {offset})")
            done += got
        return out

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __del__(self):
        self.close()


class SplitReader:
    """Random access to one split of a prepared folder, without loading or mapping it.

    ``read(start, length)`` returns tokens ``[start, start + length)`` of the split's stream (across
    shard boundaries) as a new int32 array, ``read_bytes`` the bytes they cover (where the split
    has them), ``starts_between(lo, hi)`` the documents that start in ``(lo, hi]``. Every read is
    an ``os.pread`` into a fresh buffer: the file data stays in the kernel's page cache, outside
    this process, so resident memory does not grow with the data (memory maps did: the kernel
    maps whole large folios per fault, and random windows had the whole file resident within a
    few batches). Document starts are searched through a coarse in-memory sample (one start in
    ``DOC_BLOCK``) and one block read.
    """

    DOC_BLOCK = 4096

    def __init__(self, folder: str, entry: dict, dtype: str):
        self.folder = os.path.expanduser(folder)
        self.dtype = np.dtype(dtype)
        self.tokens = int(entry["tokens"])
        self.documents = int(entry["documents"])
        self.text_bytes = int(entry.get("text_bytes", self.tokens))
        counts = [int(s["tokens"]) for s in entry["shards"]]
        if sum(counts) != self.tokens:
            raise ValueError(f"the shards of {self.folder} hold {sum(counts)} tokens, but its index says "
                             f"{self.tokens}; prepare the data again")
        self._starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self._shards = [_File(os.path.join(self.folder, shard["file"]), self.dtype) for shard in entry["shards"]]
        for shard, file in zip(entry["shards"], self._shards):
            if file.size != int(shard["tokens"]):
                raise ValueError(f"{shard['file']} in {self.folder} holds {file.size} tokens, but the index says "
                                 f"{shard['tokens']}; prepare the data again")
        self._bytes = [_File(os.path.join(self.folder, name), np.uint32) for name in entry.get("bytes_files") or []]
        self._docs = _File(os.path.join(self.folder, entry["docs_file"]), np.int64)
        if self._docs.size != self.documents:
            raise ValueError(f"{entry['docs_file']} in {self.folder} holds {self._docs.size} document starts, but "
                             f"the index says {self.documents}; prepare the data again")
        self._coarse = np.concatenate([self._docs.read(i, min(self.DOC_BLOCK, self.documents - i))[:1]
                                       for i in range(0, self.documents, self.DOC_BLOCK)] or [np.zeros(0, np.int64)])

    @property
    def has_bytes(self) -> bool:
        return bool(self._bytes)

    def _gather(self, files: list[_File], start: int, length: int) -> np.ndarray:
        if start < 0 or length < 0 or start + length > self.tokens:
            raise ValueError(f"read [{start}, {start + length}) is outside the split's {self.tokens} tokens")
        out = np.empty(length, files[0].dtype) if files else np.empty(0, np.int32)
        shard = int(np.searchsorted(self._starts, start, side="right")) - 1
        done = 0
        while done < length:
            offset = start + done - int(self._starts[shard])
            take = min(length - done, files[shard].size - offset)
            files[shard].read(offset, take, out[done:done + take])
            done += take
            shard += 1
        return out.astype(np.int32)

    def read(self, start: int, length: int) -> np.ndarray:
        """Tokens ``[start, start + length)`` as int32."""
        return self._gather(self._shards, start, length)

    def read_bytes(self, start: int, length: int) -> np.ndarray:
        """The UTF-8 bytes covered by tokens ``[start, start + length)`` (int32)."""
        if not self._bytes:
            raise ValueError(f"the split in {self.folder} has no per-token byte counts")
        return self._gather(self._bytes, start, length)

    def starts_between(self, lo: int, hi: int) -> np.ndarray:
        """The int64 offsets of the documents that start in ``(lo, hi]``, sorted."""
        first = max(int(np.searchsorted(self._coarse, lo, side="right")) - 1, 0) * self.DOC_BLOCK
        last = min(int(np.searchsorted(self._coarse, hi, side="right")) * self.DOC_BLOCK, self.documents)
        starts = self._docs.read(first, max(last - first, 0))
        return starts[(starts > lo) & (starts <= hi)]

    def close(self) -> None:
        for file in self._shards + self._bytes + [self._docs]:
            file.close()
