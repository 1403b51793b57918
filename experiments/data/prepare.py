"""Tokenise text files once into token shards (``python -m experiments.prepare_data``).

Every input file is split as :func:`experiments.data.corpus.load_corpus` splits it (its last
``val_fraction`` is validation text, cut at a character boundary), then each part into documents:

* ``file`` (default): the part is one document;
* ``blank_line``: documents are separated by one or more blank lines;
* ``line``: one document per line (JSON-lines style text);
* ``re:REGEX``: documents are separated by matches of ``REGEX``, applied to the raw bytes.

Separators are dropped; with ``eos`` (a special token of the tokenizer, such as ``<|endoftext|>``,
which every ``bpe:N`` tokenizer has) each document ends with that token, so a model can learn where
documents end. Documents are tokenised in batches (in parallel for a ``tokenizer.json``) and
streamed to the shards of :mod:`experiments.data.shards`; memory holds one input file at a time.
The output depends only on the inputs and the arguments: the same text gives the same files.

>>> import tempfile, os
>>> folder = tempfile.mkdtemp()
>>> with open(os.path.join(folder, "a.txt"), "w") as f:
...     _ = f.write("First document.\\n\\nSecond one.\\n\\n" * 10)
>>> index = prepare(os.path.join(folder, "a.txt"), "byte", os.path.join(folder, "out"), val_fraction=0.1,
...                 documents="blank_line", progress=False)
>>> index["dtype"], index["splits"]["train"]["documents"], index["splits"]["val"]["documents"]
('uint8', 18, 2)
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Iterator

import numpy as np
from tqdm import tqdm

from experiments.data import bpe
from experiments.data.corpus import resolve_files, split_file
from experiments.data.shards import INDEX_FILE, SplitWriter, token_dtype, write_index
from experiments.data.tokenizer import TOKENIZER_FILE, ByteTokenizer, JsonTokenizer, fingerprint, load_tokenizer

SPLITTERS = {"file": None, "blank_line": rb"\r?\n(?:[ \t]*\r?\n)+", "line": rb"\r?\n"}
BATCH_BYTES = 8 << 20
DEFAULT_SHARD_TOKENS = 1 << 27


def document_splitter(documents: str) -> re.Pattern | None:
    """The compiled separator of a ``--documents`` value (None: one document per file part)."""
    if documents in SPLITTERS:
        pattern = SPLITTERS[documents]
        return None if pattern is None else re.compile(pattern)
    if documents.startswith("re:"):
        try:
            return re.compile(documents[3:].encode("utf-8"))
        except re.error as e:
            raise ValueError(f"--documents = {documents!r} is not a valid regular expression: {e}") from e
    raise ValueError(f"--documents = {documents!r} is not one of {sorted(SPLITTERS)} or 're:REGEX'")


def split_documents(data: bytes, splitter: re.Pattern | None) -> list[bytes]:
    """The non-empty documents of ``data``, separators dropped.

    >>> split_documents(b"a\\n\\n\\nb\\n \\nc", document_splitter("blank_line"))
    [b'a', b'b', b'c']
    """
    parts = [data] if splitter is None else splitter.split(data)
    return [p for p in parts if p]


def _batches(docs: list[bytes]) -> Iterator[list[bytes]]:
    batch, size = [], 0
    for doc in docs:
        batch.append(doc)
        size += len(doc)
        if size >= BATCH_BYTES:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _encode(tokenizer: ByteTokenizer | JsonTokenizer, docs: list[bytes],
            with_bytes: bool) -> list[tuple[np.ndarray, np.ndarray | None]]:
    if isinstance(tokenizer, ByteTokenizer):
        return [(np.frombuffer(d, np.uint8), None) for d in docs]
    texts = [d.decode("utf-8", errors="replace") for d in docs]
    if with_bytes:
        return tokenizer.encode_batch_with_bytes(texts)
    return [(ids, None) for ids in tokenizer.encode_batch(texts)]


def _eos_id(tokenizer: ByteTokenizer | JsonTokenizer, eos: str) -> int | None:
    if not eos:
        return None
    token = tokenizer.token_id(eos) if isinstance(tokenizer, JsonTokenizer) else None
    if token is None:
        raise ValueError(f"--eos = {eos!r} is not a token of --tokenizer = {tokenizer.spec!r} (the byte tokenizer "
                         f"has none; every bpe:N has {bpe.EOS_TOKEN!r})")
    return token


def prepare(inputs: str, tokenizer: str, out: str, val_fraction: float = 0.05,
            shard_tokens: int = DEFAULT_SHARD_TOKENS, documents: str = "file", eos: str = "",
            overwrite: bool = False, progress: bool = True) -> dict:
    """Writes the token shards of the files ``inputs`` names into the folder ``out``; returns the index.

    Args:
      inputs: a file, folder or glob (as ``data.path``).
      tokenizer: ``byte``, a ``tokenizer.json`` (or a folder holding one), or ``bpe:N`` (trained on the
        training parts of the inputs and saved as ``out/tokenizer.json``).
      out: the folder to write; refused if it already holds an index, unless ``overwrite``.
      val_fraction: the tail of every file kept for validation, in [0, 1).
      shard_tokens: tokens per shard file at most.
      documents: how a file part splits into documents (see the module docstring).
      eos: a special token appended to every document, or empty for none.
      progress: show a tqdm bar over the input bytes.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"--val_fraction must lie in [0, 1), got {val_fraction}")
    if shard_tokens < 1:
        raise ValueError(f"--shard_tokens must be >= 1, got {shard_tokens}")
    splitter = document_splitter(documents)
    files = resolve_files(inputs)
    out = os.path.expanduser(out)
    if os.path.isfile(os.path.join(out, INDEX_FILE)) and not overwrite:
        raise ValueError(f"--out = {out!r} already holds prepared data ({INDEX_FILE}); pass --overwrite or "
                         "choose another folder")
    trained = tokenizer.strip().startswith(bpe.PREFIX)
    tok = None if trained else load_tokenizer(tokenizer, "--tokenizer")
    tokenizer_json = Path(tok.path).read_bytes() if isinstance(tok, JsonTokenizer) else None
    os.makedirs(out, exist_ok=True)
    for name in os.listdir(out):   # a previous preparation's files (or a killed one's)
        if name.endswith((".tokens", ".bytes", ".docs", ".partial")) or name in (INDEX_FILE, TOKENIZER_FILE):
            os.remove(os.path.join(out, name))
    if trained:
        texts = (split_file(Path(f).read_bytes(), val_fraction)[0].decode("utf-8", errors="replace") for f in files)
        tok = load_tokenizer(tokenizer, "--tokenizer", workdir=out, train_texts=lambda: texts)
    elif tokenizer_json is not None:
        Path(out, TOKENIZER_FILE).write_bytes(tokenizer_json)
    by_bytes = isinstance(tok, ByteTokenizer)
    eos_id = _eos_id(tok, eos)
    dtype = token_dtype(tok.vocab_size)
    writers = {"train": SplitWriter(out, "train", dtype, shard_tokens),
               "val": SplitWriter(out, "val", dtype, shard_tokens, with_bytes=not by_bytes)}
    bar = tqdm(total=sum(os.path.getsize(f) for f in files), unit="B", unit_scale=True, disable=not progress,
               desc="tokenising", dynamic_ncols=True)
    try:
        for name in files:
            data = Path(name).read_bytes()
            shown = 0
            for split, part in zip(("train", "val"), split_file(data, val_fraction, whole_characters=not by_bytes)):
                writer = writers[split]
                for batch in _batches(split_documents(part, splitter)):
                    for doc, (ids, counts) in zip(batch, _encode(tok, batch, writer.with_bytes)):
                        if eos_id is not None:
                            ids = np.append(ids, eos_id)
                            counts = None if counts is None else np.append(counts, 0)
                        writer.add(ids, counts, text_bytes=len(doc))
                    bar.update(sum(len(d) for d in batch))
                    shown += sum(len(d) for d in batch)
            bar.update(len(data) - shown)   # the separators
    finally:
        bar.close()
        entries = {split: w.close() for split, w in writers.items()}
    if entries["train"]["tokens"] == 0:
        raise ValueError(f"--input = {inputs!r} holds no training text ({len(files)} file(s))")
    index = {"tokenizer": {"spec": tokenizer, "fingerprint": fingerprint(tok), "vocab_size": tok.vocab_size,
                           "file": None if by_bytes else TOKENIZER_FILE},
             "dtype": dtype.name, "documents": documents,
             "eos": None if eos_id is None else {"token": eos, "id": int(eos_id)},
             "val_fraction": val_fraction, "shard_tokens": shard_tokens, "inputs": files, "splits": entries}
    write_index(out, index)
    return index
