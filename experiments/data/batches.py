"""Fixed-length training windows in a seeded order that a checkpoint can resume exactly.

Each epoch cuts the token stream into non-overlapping windows of ``seq_len + 1`` tokens, starting
at a random shift, and visits them in a random order; both come from ``(seed, epoch)`` only.
The iterator's position is two integers, ``(epoch, index)``, saved with every checkpoint.

Given the offsets where documents start (``doc_starts``) the batches are packed: they also carry
``cu_seqlens [B, K + 1]`` and ``loss_mask [B, L]`` (see :mod:`experiments.data.packing`).
"""

from __future__ import annotations

from typing import Iterator

import numpy as np

from experiments.data.packing import boundaries_in_window, pack_windows


def _check_length(tokens: np.ndarray, seq_len: int, split: str) -> None:
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    if tokens.size < seq_len + 1:
        raise ValueError(
            f"seq_len = {seq_len} needs at least {seq_len + 1} tokens, but the {split} split has "
            f"only {tokens.size}; use a shorter --config.data.seq_len or more text")


class BatchIterator:
    """Yields ``{"inputs": [B, L], "targets": [B, L]}`` int32 batches of next-token pairs.

    >>> import numpy as np
    >>> it = BatchIterator(np.arange(100, dtype=np.uint8), batch_size=2, seq_len=8, seed=0)
    >>> batch = next(it)
    >>> batch["inputs"].shape, bool((batch["inputs"][:, 1:] == batch["targets"][:, :-1]).all())
    ((2, 8), True)
    """

    def __init__(self, tokens: np.ndarray, batch_size: int, seq_len: int, seed: int,
                 epoch: int = 0, index: int = 0, doc_starts: np.ndarray | None = None, max_segments: int = 2):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        _check_length(tokens, seq_len, "training")
        self.tokens = tokens
        self.doc_starts = doc_starts
        self.max_segments = max_segments
        self.batch_size = batch_size
        self.seq_len = seq_len
        self.seed = seed
        self.epoch = epoch
        self.index = index
        self._order_epoch = None
        self._starts = None

    def _epoch_starts(self) -> np.ndarray:
        if self._order_epoch != self.epoch:
            rng = np.random.default_rng([self.seed, self.epoch])
            window = self.seq_len + 1
            slack = self.tokens.size - window
            shift = int(rng.integers(0, min(self.seq_len, slack) + 1))
            count = (self.tokens.size - shift) // window
            self._starts = shift + window * rng.permutation(count)
            self._order_epoch = self.epoch
        return self._starts

    def position(self) -> dict[str, int]:
        return {"epoch": int(self.epoch), "index": int(self.index)}

    def restore(self, position: dict[str, int]) -> None:
        self.epoch, self.index = int(position["epoch"]), int(position["index"])

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        starts = []
        while len(starts) < self.batch_size:
            epoch_starts = self._epoch_starts()
            take = epoch_starts[self.index:self.index + self.batch_size - len(starts)]
            starts.extend(take.tolist())
            self.index += len(take)
            if self.index >= len(epoch_starts):
                self.epoch, self.index = self.epoch + 1, 0
        offsets = np.asarray(starts)[:, None] + np.arange(self.seq_len + 1)[None, :]
        windows = self.tokens[offsets].astype(np.int32)
        if self.doc_starts is not None:
            return pack_windows(windows, [boundaries_in_window(self.doc_starts, s, self.seq_len) for s in starts],
                                self.max_segments)
        return {"inputs": windows[:, :-1], "targets": windows[:, 1:]}


def eval_windows(tokens: np.ndarray, batch_size: int, seq_len: int, max_batches: int,
                 token_bytes: np.ndarray | None = None, doc_starts: np.ndarray | None = None,
                 max_segments: int = 2) -> list[dict[str, np.ndarray]]:
    """Deterministic evaluation batches: consecutive windows from the start of the split.

    With ``token_bytes`` (the UTF-8 bytes each token covers, as ``Corpus.val_bytes``) every
    batch also holds ``"target_bytes" [B, L]``, the bytes of its targets, which
    ``train_state.evaluate`` divides by for bits per byte; without it a token is one byte.
    With ``doc_starts`` the batches are packed like :class:`BatchIterator`'s.
    """
    _check_length(tokens, seq_len, "validation")
    if token_bytes is not None and token_bytes.shape != tokens.shape:
        raise ValueError(f"token_bytes must have the tokens' shape {tokens.shape}, got {token_bytes.shape}")
    window = seq_len + 1
    count = min((tokens.size // window), batch_size * max_batches)
    count -= count % batch_size
    if count == 0:
        # Fewer windows than one batch: evaluate one smaller batch.
        count = tokens.size // window
        batch_size = count
    windows = tokens[: count * window].reshape(count, window).astype(np.int32)
    if doc_starts is None:
        batches = [{"inputs": w[:, :-1], "targets": w[:, 1:]} for w in np.split(windows, count // batch_size)]
    else:
        bounds = [boundaries_in_window(doc_starts, i * window, seq_len) for i in range(count)]
        batches = [pack_windows(windows[i:i + batch_size], bounds[i:i + batch_size], max_segments)
                   for i in range(0, count, batch_size)]
    if token_bytes is not None:
        covered = token_bytes[: count * window].reshape(count, window).astype(np.int32)
        for batch, b in zip(batches, np.split(covered, count // batch_size)):
            batch["target_bytes"] = b[:, 1:]
    return batches
