"""Meshes, logical-axis sharding rules and sequence parallelism (LASP-2, ring attention).

* :mod:`parallelism.mesh`: ``make_mesh(config)`` over the axes ``data, fsdp, sequence, tensor``;
  ``initialize_distributed()`` for multi-host runs.
* :mod:`parallelism.rules`: the logical-axis table, sharded parameter/optimizer-state creation,
  train steps with in/out shardings.
* :mod:`parallelism.lasp2`: ``lasp2(family, q, k, v, mesh=..., **op_kwargs)``, every chunk family
  with the sequence sharded (one all-gather per layer).
* :mod:`parallelism.ring`: ``sequence_parallel_attention(q, k, v, mesh=..., mode='ring' |
  'ulysses' | 'allgather')``.
* :mod:`parallelism.context`: ``sequence_parallel(mesh)``, read by the models' dispatcher at trace time.
* :mod:`parallelism.hlo`: collectives and their bytes in compiled HLO text.
"""

from parallelism.context import SequenceSharding, current_sequence_sharding, sequence_parallel
from parallelism.mesh import AXES, MeshConfig, initialize_distributed, make_mesh
from parallelism.rules import LOGICAL_RULES, batch_sharding, create_sharded, shard_step, state_shardings

__all__ = ["SequenceSharding", "current_sequence_sharding", "sequence_parallel", "AXES", "MeshConfig",
           "initialize_distributed", "make_mesh", "LOGICAL_RULES", "batch_sharding", "create_sharded",
           "shard_step", "state_shardings"]
