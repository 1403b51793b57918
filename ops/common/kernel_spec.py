"""The static description of one kernel call: gate mode, tiling and launch parameters."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class KernelSpec:
    """Everything about a kernel call that is fixed at trace time (hashable: a static argument).

    Attributes:
      mode: ``None`` (no decay), ``"head"`` (a log decay per head) or ``"key"`` (per key dimension).
      chunk_size: tokens per chunk, C.
      sub_chunk_size: tokens per sub-chunk of the per-key-dimension scores (divides C).
      block_v: value columns per program, BV (divides V); the state block is ``[BV, K]``.
      num_heads: H (rows of the kernel layout are ``row·H + head``).
      num_seqs: N, the number of initial / final states.
      key_dim: K.
      num_warps, num_stages: Triton launch parameters (GPU only).
    """

    mode: str | None
    chunk_size: int
    sub_chunk_size: int
    block_v: int
    num_heads: int
    num_seqs: int
    key_dim: int
    num_warps: int = 4
    num_stages: int = 1
