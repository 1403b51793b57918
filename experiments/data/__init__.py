"""Byte-level text data: tokenizer, corpus loading and resumable batch iteration."""

from experiments.data.batches import BatchIterator, eval_windows
from experiments.data.corpus import Corpus, default_corpus_files, load_corpus, resolve_files
from experiments.data.tokenizer import ByteTokenizer

__all__ = ["BatchIterator", "ByteTokenizer", "Corpus", "default_corpus_files", "eval_windows",
           "load_corpus", "resolve_files"]
