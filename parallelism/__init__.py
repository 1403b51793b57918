"""Meshes, logical-axis sharding rules and sequence parallelism (LASP-2, ring attention)."""

from parallelism.context import SequenceSharding, current_sequence_sharding, sequence_parallel

__all__ = ["SequenceSharding", "current_sequence_sharding", "sequence_parallel"]
