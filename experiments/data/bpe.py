"""``data.tokenizer = "bpe:N"``: a byte-level BPE of N tokens trained on the training split.

The tokenizer is GPT-2 style: text is split by the byte-level pre-tokenizer (every byte of UTF-8
maps to one of 256 printable characters, so nothing is ever unknown), merges are learnt with the
``tokenizers`` library's ``BpeTrainer``, and id 0 is the special token ``<|endoftext|>`` (which
``experiments.prepare_data --eos`` can append to every document). Training is deterministic: the
same texts in the same order give a byte-identical ``tokenizer.json``. If the text has fewer
distinct merges than N asks for, the vocabulary stops short of N (never beyond).

>>> import tempfile, os
>>> path = os.path.join(tempfile.mkdtemp(), "tokenizer.json")
>>> tok = train_bpe(["to be or not to be, that is the question"] * 4, 300, path)
>>> tok.decode(tok.encode("to be or not")), tok.vocab_size <= 300
('to be or not', True)
"""

from __future__ import annotations

import os
from typing import Iterable, Iterator

PREFIX = "bpe:"
EOS_TOKEN = "<|endoftext|>"
CHUNK_CHARS = 1 << 20
MIN_VOCAB = 256 + 1          # the byte alphabet and <|endoftext|>


def parse_spec(spec: str, name: str = "data.tokenizer") -> int:
    """N of ``"bpe:N"``; a ValueError naming ``name`` unless N is an integer >= 257."""
    _, _, value = spec.strip().partition(":")
    try:
        vocab_size = int(value)
    except ValueError:
        vocab_size = None
    if vocab_size is None or vocab_size < MIN_VOCAB:
        raise ValueError(f"{name} = {spec!r} must be 'bpe:N' with an integer N >= {MIN_VOCAB} (the 256 byte "
                         f"tokens and {EOS_TOKEN}), e.g. 'bpe:1024'")
    return vocab_size


def _chunks(texts: Iterable[str], size: int = CHUNK_CHARS) -> Iterator[str]:
    """Each text in pieces of about ``size`` characters, cut after a newline where there is one
    (so the trainer never holds one huge string; the cut only splits a run of whitespace)."""
    for text in texts:
        start = 0
        while start < len(text):
            end = min(start + size, len(text))
            if end < len(text):
                newline = text.rfind("\n", start, end)
                end = newline + 1 if newline > start else end
            yield text[start:end]
            start = end


def train_bpe(texts: Iterable[str], vocab_size: int, path: str):
    """Trains a byte-level BPE of at most ``vocab_size`` tokens on ``texts`` and writes it to
    ``path`` (through a temporary file and a rename, so a killed run leaves no half file).

    Returns it as a :class:`experiments.data.tokenizer.JsonTokenizer`.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from experiments.data.tokenizer import JsonTokenizer

    if vocab_size < MIN_VOCAB:
        raise ValueError(f"vocab_size must be >= {MIN_VOCAB}, got {vocab_size}")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS_TOKEN], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(_chunks(texts), trainer)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    partial = f"{path}.partial"
    tokenizer.save(partial)
    os.replace(partial, path)
    return JsonTokenizer(path)
