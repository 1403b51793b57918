"""Training batches from token shards with grain, deterministic, resumable and split over hosts.

The window order is a grain pipeline over the shards (:mod:`experiments.data.shards`):
``MapDataset.range(n).shuffle(seed).repeat()`` numbers the ``n`` windows of ``L + 1`` tokens of
every epoch in a fresh order (grain's index shuffle, reseeded per epoch, computed per index
without materialising a permutation); epoch ``e`` also shifts every window by a seeded offset
in ``[0, L]`` as :class:`experiments.data.batches.BatchIterator` does. Global batch ``s`` is
elements ``[s B, (s + 1) B)`` of that order; JAX process ``p`` of ``P`` reads only its rows,
``[p B / P, (p + 1) B / P)`` of each, through another grain ``MapDataset`` batched and read
ahead by grain's thread prefetch. So a run's batches do not depend on the number of hosts.

The position saved in checkpoints is today's ``{"epoch", "index"}``: the epoch and the window
within it at which the next global batch starts. Resuming rebuilds the pipeline from there
(random access, nothing replayed); grain's own iterator state is not saved, so checkpoints do
not depend on grain's state format.
"""

from __future__ import annotations

import functools
import sys
from typing import Iterator

import jax
import numpy as np

from experiments.data.packing import row_segments
from experiments.data.shards import SplitReader


def window_layout(tokens: int, seq_len: int) -> tuple[int, int]:
    """``(windows per epoch, largest shift)`` of a split of ``tokens`` cut into windows of
    ``seq_len + 1``: every shift in ``[0, largest]`` leaves room for all the windows.

    >>> window_layout(100, 9)      # 9 windows of 10 need 90 tokens: shifts 0..9 fit
    (9, 9)
    """
    window = seq_len + 1
    if tokens < window:
        raise ValueError(f"seq_len = {seq_len} needs at least {window} tokens, but the training split has "
                         f"only {tokens}; use a shorter --config.data.seq_len or more text")
    count = max(1, (tokens - seq_len) // window)
    return count, min(seq_len, tokens - count * window)


def process_rows(batch_size: int, process_index: int | None = None,
                 process_count: int | None = None) -> tuple[int, int]:
    """``(first row, rows)`` of the global batch that this JAX process reads."""
    index = jax.process_index() if process_index is None else process_index
    count = jax.process_count() if process_count is None else process_count
    if batch_size % count:
        raise ValueError(f"data.batch_size = {batch_size} must be divisible by the {count} JAX processes")
    rows = batch_size // count
    return index * rows, rows


class ShardBatches:
    """Yields this process's rows of each global batch: ``inputs``, ``targets`` ``[B / P, L]``
    int32, and with ``packing`` ``cu_seqlens [B / P, K + 1]`` and ``loss_mask [B / P, L]``.

    Args:
      reader: the training split.
      batch_size: B, the global batch (all processes together).
      seq_len: L.
      seed: the order's seed (any int; folded into grain's 32-bit seed).
      packing: carry document boundaries (see :mod:`experiments.data.packing`).
      max_segments: K, segments per packed row.
      prefetch: batches grain reads ahead in a background thread (0: read on demand).
      process_index, process_count: default ``jax.process_index()``, ``jax.process_count()``.
    """

    def __init__(self, reader: SplitReader, batch_size: int, seq_len: int, seed: int, *, packing: bool = True,
                 max_segments: int = 2, prefetch: int = 2, epoch: int = 0, index: int = 0,
                 process_index: int | None = None, process_count: int | None = None):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if prefetch < 0:
            raise ValueError(f"data.prefetch must be >= 0, got {prefetch}")
        self.reader = reader
        self.batch_size, self.seq_len, self.seed = batch_size, seq_len, seed
        self.packing, self.max_segments, self.prefetch = packing, max_segments, prefetch
        self.windows, self.max_shift = window_layout(reader.tokens, seq_len)
        self.first_row, self.rows = process_rows(batch_size, process_index, process_count)
        import grain  # here, not at the top: importing it takes a second that text-only runs skip

        self._grain = grain
        self._order = grain.MapDataset.range(self.windows).shuffle(seed=seed % 2**32).repeat(None)
        self._iterator = None
        self.restore({"epoch": epoch, "index": index})

    @functools.lru_cache(maxsize=8)
    def _shift(self, epoch: int) -> int:
        rng = np.random.default_rng([self.seed % 2**63, epoch])
        return int(rng.integers(0, self.max_shift + 1))

    def _row(self, element: int) -> dict[str, np.ndarray]:
        """Global element ``element`` of the order: one window, packed if asked."""
        epoch = element // self.windows
        start = self._shift(epoch) + int(self._order[element]) * (self.seq_len + 1)
        window = self.reader.read(start, self.seq_len + 1)
        row = {"inputs": window[:-1], "targets": window[1:]}
        if self.packing:
            bounds = self.reader.starts_between(start, start + self.seq_len) - start
            row["cu_seqlens"], row["loss_mask"] = row_segments(bounds, self.seq_len, self.max_segments)
        return row

    def _dataset(self, start: int):
        """This process's batches from global element ``start`` on (batch s: its rows of global batch s)."""
        first, rows, size = self.first_row, self.rows, self.batch_size
        element = lambda j: start + (j // rows) * size + first + j % rows
        return self._grain.MapDataset.range(sys.maxsize // 2).map(lambda j: self._row(element(j))).batch(rows)

    def position(self) -> dict[str, int]:
        return {"epoch": self._next // self.windows, "index": self._next % self.windows}

    def restore(self, position: dict[str, int]) -> None:
        self.close()
        self._next = int(position["epoch"]) * self.windows + int(position["index"])
        dataset = self._dataset(self._next)
        if self.prefetch:
            options = self._grain.ReadOptions(num_threads=1, prefetch_buffer_size=self.prefetch)
            self._iterator = iter(dataset.to_iter_dataset(options))
        else:
            self._iterator = (dataset[s] for s in range(len(dataset)))

    def close(self) -> None:
        """Stops the read-ahead thread (the iterator restarts on the next :meth:`restore`)."""
        closer = getattr(self._iterator, "close", None)
        if closer is not None:
            closer()
        self._iterator = None

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self._iterator is None:
            self.restore(self.position())
        batch = next(self._iterator)
        self._next += self.batch_size
        return batch
