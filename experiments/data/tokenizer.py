"""A byte-level tokenizer: every UTF-8 byte is a token, vocabulary 256, nothing to train."""

from __future__ import annotations

import numpy as np


class ByteTokenizer:
    """Maps text to its UTF-8 bytes and back.

    >>> tok = ByteTokenizer()
    >>> tok.decode(tok.encode("To be, or not to be"))
    'To be, or not to be'
    """

    vocab_size = 256

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).copy()

    def decode(self, tokens) -> str:
        data = np.asarray(tokens)
        if data.size and (data.min() < 0 or data.max() > 255):
            raise ValueError(f"byte tokens must lie in [0, 255], got range [{data.min()}, {data.max()}]")
        return data.astype(np.uint8).tobytes().decode("utf-8", errors="replace")
