"""Text data: tokenizers (bytes, a tokenizer.json, a trained BPE), corpus loading, token shards,
document packing and resumable batch iteration."""

from experiments.data.batches import BatchIterator, eval_windows
from experiments.data.corpus import Corpus, default_corpus_files, load_corpus, resolve_files
from experiments.data.loader import ShardBatches
from experiments.data.pipeline import ShardData, TextData, load_data, run_tokenizer, to_device, with_model_vocab
from experiments.data.shards import SplitReader, is_prepared
from experiments.data.tokenizer import ByteTokenizer, JsonTokenizer, Tokenizer, load_tokenizer

__all__ = ["BatchIterator", "ByteTokenizer", "Corpus", "JsonTokenizer", "ShardBatches", "ShardData", "SplitReader",
           "TextData", "Tokenizer", "default_corpus_files", "eval_windows", "is_prepared", "load_corpus", "load_data",
           "load_tokenizer", "resolve_files", "run_tokenizer", "to_device", "with_model_vocab"]
