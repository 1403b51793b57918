"""Text data: tokenizers (bytes or a tokenizer.json), corpus loading and resumable batch iteration."""

from experiments.data.batches import BatchIterator, eval_windows
from experiments.data.corpus import Corpus, default_corpus_files, load_corpus, resolve_files
from experiments.data.tokenizer import ByteTokenizer, JsonTokenizer, Tokenizer, load_tokenizer

__all__ = ["BatchIterator", "ByteTokenizer", "Corpus", "JsonTokenizer", "Tokenizer", "default_corpus_files",
           "eval_windows", "load_corpus", "load_tokenizer", "resolve_files"]
