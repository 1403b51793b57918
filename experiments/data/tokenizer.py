"""Tokenizers for the text pipeline: raw UTF-8 bytes, or a Hugging Face ``tokenizer.json``.

``load_tokenizer(spec)`` turns the value of ``data.tokenizer`` into a tokenizer:

- ``"byte"``: every UTF-8 byte is a token (vocabulary 256, nothing to train or load);
- a path to a ``tokenizer.json`` file, or to a folder holding one: loaded from disk with the
  ``tokenizers`` library, no network;
- ``"bpe:N"``: a byte-level BPE of N tokens trained on the run's training text (see
  :mod:`experiments.data.bpe`), kept as ``<workdir>/tokenizer.json`` and loaded from there when the
  file exists.

Besides ``encode`` / ``decode``, both report how many UTF-8 bytes of the text each token covers
(:meth:`encode_with_bytes`), which is what bits per byte is normalised by (see
``experiments.train_state.evaluate``).
"""

from __future__ import annotations

import hashlib
import os
from typing import Callable, Iterable, Protocol, Sequence, runtime_checkable

import numpy as np

BYTE = "byte"
BPE_PREFIX = "bpe:"
TOKENIZER_FILE = "tokenizer.json"


@runtime_checkable
class Tokenizer(Protocol):
    """What the data pipeline, the trainer's sample and ``experiments.generate`` need."""

    spec: str
    vocab_size: int

    def encode(self, text: str) -> np.ndarray: ...

    def decode(self, tokens) -> str: ...

    def encode_with_bytes(self, text: str) -> tuple[np.ndarray, np.ndarray]: ...


class ByteTokenizer:
    """Maps text to its UTF-8 bytes and back.

    >>> tok = ByteTokenizer()
    >>> tok.decode(tok.encode("To be, or not to be"))
    'To be, or not to be'
    """

    spec = BYTE
    vocab_size = 256

    def encode(self, text: str) -> np.ndarray:
        """The UTF-8 bytes of ``text`` as a uint8 array."""
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).copy()

    def decode(self, tokens) -> str:
        """The text of byte tokens in [0, 255]; invalid UTF-8 becomes U+FFFD."""
        data = np.asarray(tokens)
        if data.size and (data.min() < 0 or data.max() > 255):
            raise ValueError(f"byte tokens must lie in [0, 255], got range [{data.min()}, {data.max()}]")
        return data.astype(np.uint8).tobytes().decode("utf-8", errors="replace")

    def encode_with_bytes(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        """``(tokens, bytes per token)``: every token covers exactly one byte."""
        tokens = self.encode(text)
        return tokens, np.ones(tokens.size, np.int32)


def covered_bytes(text: str, offsets: Sequence[tuple[int, int]]) -> np.ndarray:
    """UTF-8 bytes of ``text`` credited to each token, from the tokens' character offsets.

    Token ``i`` is credited with the bytes from the furthest end reached by tokens ``0..i-1`` to
    the furthest end reached by tokens ``0..i``; the last token also takes any uncovered tail.
    So the counts are non-negative and sum to the byte length of ``text`` (for a text with at
    least one token); text a tokenizer skips (e.g. whitespace it drops) goes to the next token,
    and a token sharing a character with the previous one (a multi-byte character split into
    byte tokens) may be credited with 0 bytes.

    >>> covered_bytes("aé b", [(0, 2), (2, 4)]).tolist()   # 'é' is 2 bytes
    [3, 2]
    """
    raw = np.frombuffer(text.encode("utf-8"), dtype=np.uint8)
    if not len(offsets):
        return np.zeros(0, np.int32)
    # byte position of the start of every character, then the end of the text
    char_start = np.append(np.flatnonzero((raw & 0xC0) != 0x80), raw.size)
    ends = np.maximum.accumulate(np.asarray([end for _, end in offsets], dtype=np.int64))
    end_bytes = char_start[np.minimum(ends, len(char_start) - 1)]
    counts = np.diff(end_bytes, prepend=0)
    counts[-1] += raw.size - end_bytes[-1]
    return counts.astype(np.int32)


class JsonTokenizer:
    """A Hugging Face tokenizer read from a ``tokenizer.json`` file (``tokenizers.Tokenizer``).

    ``vocab_size`` is one more than the largest token id, added tokens included. Text is encoded
    without the tokenizer's special tokens unless ``add_special_tokens=True`` (the training
    corpus never has them; a pretrained model's prompt may want its BOS token).
    """

    def __init__(self, path: str, spec: str | None = None):
        import tokenizers

        self.path = path
        self.spec = path if spec is None else spec
        self._tokenizer = tokenizers.Tokenizer.from_file(path)
        vocab = self._tokenizer.get_vocab(with_added_tokens=True)
        self.vocab_size = max(vocab.values()) + 1 if vocab else 0

    def encode(self, text: str, add_special_tokens: bool = False) -> np.ndarray:
        """The token ids of ``text`` as an int32 array."""
        return np.asarray(self._tokenizer.encode(text, add_special_tokens=add_special_tokens).ids, np.int32)

    def encode_batch(self, texts: Sequence[str], add_special_tokens: bool = False) -> list[np.ndarray]:
        """:meth:`encode` of several texts (encoded in parallel by ``tokenizers``)."""
        encodings = self._tokenizer.encode_batch(list(texts), add_special_tokens=add_special_tokens)
        return [np.asarray(e.ids, np.int32) for e in encodings]

    def token_id(self, token: str) -> int | None:
        """The id of ``token`` (a special token such as ``<|endoftext|>``), None if unknown."""
        return self._tokenizer.token_to_id(token)

    def to_str(self) -> str:
        """The tokenizer as the JSON text of a ``tokenizer.json``."""
        return self._tokenizer.to_str()

    def decode(self, tokens, skip_special_tokens: bool = True) -> str:
        """The text of ``tokens`` (ids the vocabulary lacks are left out)."""
        return self._tokenizer.decode(np.asarray(tokens).astype(np.int64).ravel().tolist(),
                                      skip_special_tokens=skip_special_tokens)

    def encode_with_bytes(self, text: str, add_special_tokens: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """``(tokens, bytes per token)``, the bytes as in :func:`covered_bytes`."""
        return self.encode_batch_with_bytes([text], add_special_tokens)[0]

    def encode_batch_with_bytes(self, texts: Sequence[str], add_special_tokens: bool = False,
                                ) -> list[tuple[np.ndarray, np.ndarray]]:
        """:meth:`encode_with_bytes` of several texts (encoded in parallel by ``tokenizers``)."""
        encodings = self._tokenizer.encode_batch(list(texts), add_special_tokens=add_special_tokens)
        return [(np.asarray(e.ids, np.int32), covered_bytes(text, e.offsets)) for text, e in zip(texts, encodings)]


def fingerprint(tokenizer: Tokenizer) -> str:
    """What identifies a tokenizer's mapping: ``"byte"``, or ``"sha256:<hex>"`` of its JSON text.

    Two ``tokenizer.json`` files with the same content (a copy, another path) share it.
    """
    if isinstance(tokenizer, ByteTokenizer):
        return BYTE
    if isinstance(tokenizer, JsonTokenizer):
        return "sha256:" + hashlib.sha256(tokenizer.to_str().encode("utf-8")).hexdigest()
    raise ValueError(f"tokenizer must be a ByteTokenizer or a JsonTokenizer to be fingerprinted, "
                     f"got {type(tokenizer).__name__}")


def load_tokenizer(spec: str | Tokenizer | None = BYTE, name: str = "data.tokenizer", *,
                   workdir: str | None = None,
                   train_texts: Callable[[], Iterable[str]] | None = None) -> Tokenizer:
    """The tokenizer ``spec`` names: ``"byte"`` (or empty / None), a ``tokenizer.json`` file
    or a folder containing one, or ``"bpe:N"``. A tokenizer passes through unchanged.

    ``"bpe:N"`` lives in ``workdir/tokenizer.json``: loaded when the file exists (a resumed run
    never retrains), else trained on ``train_texts()`` (the run's training split) and saved there.

    Args:
      spec: the value of the setting.
      name: the setting's name, for error messages (``data.tokenizer``, ``--tokenizer``).
      workdir: the folder of a ``bpe:N`` tokenizer.
      train_texts: called (once) for the texts to train a ``bpe:N`` tokenizer on.

    Raises:
      ValueError: naming ``name`` and ``spec`` when the file is missing or not a tokenizer, or a
        ``bpe:N`` spec is malformed or has no workdir (or no text to train on).
    """
    if spec is None or isinstance(spec, str) and spec.strip() in ("", BYTE):
        return ByteTokenizer()
    if not isinstance(spec, str):
        return spec
    if spec.strip().startswith(BPE_PREFIX):
        return _load_bpe(spec, name, workdir, train_texts)
    expected = f"expected {BYTE!r}, a {TOKENIZER_FILE} file, or a folder containing one"
    path = os.path.expanduser(spec)
    if os.path.isdir(path):
        path = os.path.join(path, TOKENIZER_FILE)
        if not os.path.isfile(path):
            raise ValueError(f"{name} = {spec!r} is a folder without a {TOKENIZER_FILE} ({expected})")
    elif not os.path.isfile(path):
        raise ValueError(f"{name} = {spec!r} does not exist ({expected})")
    try:
        return JsonTokenizer(path, spec)
    except Exception as e:  # tokenizers raises its own Exception subclass for unreadable files
        raise ValueError(f"{name} = {spec!r} could not be read as a Hugging Face {TOKENIZER_FILE} "
                         f"({expected}): {type(e).__name__}: {str(e)[:300]}") from e


def _load_bpe(spec: str, name: str, workdir: str | None,
              train_texts: Callable[[], Iterable[str]] | None) -> JsonTokenizer:
    from experiments.data import bpe

    vocab_size = bpe.parse_spec(spec, name)
    if workdir is None:
        raise ValueError(f"{name} = {spec!r} is trained for a run and kept in its folder, but no folder was "
                         f"given; pass the run's {TOKENIZER_FILE} (<workdir>/{TOKENIZER_FILE}) instead")
    path = os.path.join(os.path.expanduser(workdir), TOKENIZER_FILE)
    if not os.path.isfile(path):
        if train_texts is None:
            raise ValueError(f"{name} = {spec!r}: {path} does not exist and there is no text to train it on")
        bpe.train_bpe(train_texts(), vocab_size, path)
    tokenizer = JsonTokenizer(path, spec)
    if tokenizer.vocab_size > vocab_size:
        raise ValueError(f"{name} = {spec!r}, but {path} holds a tokenizer of {tokenizer.vocab_size:,} tokens, "
                         f"more than {vocab_size:,}; use a new workdir, or set {name} to that file")
    return tokenizer
