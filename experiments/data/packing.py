"""Document packing: where documents start inside a training row, as fixed-shape arrays.

A packed row is a window of ``L + 1`` tokens cut from the stream of concatenated documents, so
it holds the end of one document, whole documents and the start of another. For such a row,
:func:`row_segments` gives

* ``cu_seqlens [K + 1]`` int32: offsets of the row's segments over its ``L`` inputs, ``0`` first
  and ``L`` last, padded with repeated ``L`` (empty segments) up to ``K = max_segments`` so the
  shape never changes and nothing recompiles. The model restarts positions and recurrent states
  at every offset (``LanguageModel(tokens [1, L], cu_seqlens=...)``). A row with more than ``K``
  documents keeps its first ``K - 1`` boundaries; the documents after those share the last
  segment.
* ``loss_mask [L]`` bool: False for a target that is the first token of a document (predicted
  from the previous document's last token), True elsewhere. Every document start is masked, also
  past the first ``K - 1``.

>>> cu, mask = row_segments(np.array([3, 6]), seq_len=8, max_segments=4)
>>> cu.tolist(), mask.astype(int).tolist()
([0, 3, 6, 8, 8], [1, 1, 0, 1, 1, 0, 1, 1])
"""

from __future__ import annotations

import numpy as np


def default_max_segments(seq_len: int) -> int:
    """Segments per packed row when ``data.max_segments`` is 0: ``max(2, seq_len // 256)``.

    The linear-attention chunk ops plan ``L // chunk_size + K`` chunks for a row of ``K``
    segments, so ``K`` costs compute; ``L // 256`` keeps that within a quarter of the unpacked
    ``L // 64`` chunks (``model.chunk_size = 64``).
    """
    return max(2, seq_len // 256)


def boundaries_in_window(doc_starts: np.ndarray, start: int, seq_len: int) -> np.ndarray:
    """Offsets ``r`` in ``[1, seq_len]``, relative to ``start``, at which a document of the sorted
    ``doc_starts`` begins inside the window ``[start, start + seq_len]``.

    Two binary searches, so ``doc_starts`` may be as long as it likes.

    >>> boundaries_in_window(np.array([0, 5, 9, 20]), start=4, seq_len=8).tolist()
    [1, 5]
    """
    lo = int(np.searchsorted(doc_starts, start, side="right"))
    hi = int(np.searchsorted(doc_starts, start + seq_len, side="right"))
    return np.asarray(doc_starts[lo:hi], np.int64) - start


def row_segments(boundaries: np.ndarray, seq_len: int, max_segments: int) -> tuple[np.ndarray, np.ndarray]:
    """``(cu_seqlens [max_segments + 1] int32, loss_mask [seq_len] bool)`` of one window of
    ``seq_len + 1`` tokens whose documents start at ``boundaries`` (see the module docstring).

    Args:
      boundaries: sorted offsets in ``[1, seq_len]`` (token ``r`` of the window starts a document).
      seq_len: L, the row's inputs (the window has L + 1 tokens).
      max_segments: K >= 1.
    """
    if max_segments < 1:
        raise ValueError(f"max_segments must be >= 1, got {max_segments}")
    boundaries = np.asarray(boundaries, np.int64)
    if boundaries.size and (boundaries[0] < 1 or boundaries[-1] > seq_len):
        raise ValueError(f"boundaries must lie in [1, {seq_len}], got {boundaries.tolist()}")
    loss_mask = np.ones(seq_len, bool)
    loss_mask[boundaries - 1] = False              # target t is token t + 1 of the window
    cuts = boundaries[boundaries < seq_len][:max_segments - 1]
    cu = np.full(max_segments + 1, seq_len, np.int32)
    cu[0] = 0
    cu[1:1 + cuts.size] = cuts
    return cu, loss_mask


def pack_windows(windows: np.ndarray, boundaries: list[np.ndarray], max_segments: int) -> dict[str, np.ndarray]:
    """A packed batch from ``windows [B, L + 1]`` and each window's document ``boundaries``:
    ``inputs``, ``targets`` ``[B, L]`` int32, ``cu_seqlens [B, K + 1]`` int32, ``loss_mask [B, L]``.

    >>> batch = pack_windows(np.arange(10).reshape(2, 5), [np.array([2]), np.array([], int)], 2)
    >>> batch["cu_seqlens"].tolist(), batch["loss_mask"].astype(int).tolist()
    ([[0, 2, 4], [0, 4, 4]], [[1, 0, 1, 1], [1, 1, 1, 1]])
    """
    windows = np.asarray(windows)
    seq_len = windows.shape[1] - 1
    rows = [row_segments(b, seq_len, max_segments) for b in boundaries]
    windows = windows.astype(np.int32)
    return {"inputs": windows[:, :-1], "targets": windows[:, 1:],
            "cu_seqlens": np.stack([cu for cu, _ in rows]), "loss_mask": np.stack([m for _, m in rows])}


def flat_cu_seqlens(cu_seqlens: np.ndarray, seq_len: int) -> np.ndarray:
    """Per-row ``cu_seqlens [B, K + 1]`` -> offsets ``[B * K + 1]`` of the same segments in the
    batch flattened to one row ``[1, B * L]`` (row ends stay boundaries; the padding becomes
    empty segments in the middle). The trainer runs rows separately; this is the other
    fixed-shape layout, kept to check that both agree.

    >>> flat_cu_seqlens(np.array([[0, 2, 4], [0, 4, 4]]), 4).tolist()
    [0, 2, 4, 8, 8]
    """
    cu = np.asarray(cu_seqlens)
    offsets = np.arange(cu.shape[0])[:, None] * seq_len
    return np.concatenate([[0], (cu[:, 1:] + offsets).ravel()]).astype(np.int32)
