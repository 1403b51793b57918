"""Meshes, logical-axis sharding rules and sequence parallelism (LASP-2, ring attention).

* :mod:`.mesh`: ``make_mesh(config)`` over the axes ``data, fsdp, sequence, tensor``;
  ``initialize_distributed()`` for multi-host runs.
* :mod:`.rules`: the logical-axis table, sharded parameter/optimizer-state creation, train steps
  with in/out shardings.
* :mod:`.lasp2`: ``lasp2(family, q, k, v, mesh=..., **op_kwargs)``, every chunk family with the
  sequence sharded (one all-gather per layer).
* :mod:`.ring`: ``sequence_parallel_attention(q, k, v, mesh=..., mode='ring' | 'ulysses' |
  'allgather')``.
* :mod:`.hlo`: collectives and their bytes in compiled HLO text.

Models become sequence-parallel through JAX's own mesh context: trace them under
``jax.set_mesh(mesh)`` with a ``sequence`` axis larger than 1 (``lolax.models.dispatch``).
"""

from .lasp2 import lasp2
from .mesh import AXES, MeshConfig, initialize_distributed, make_mesh
from .ring import sequence_parallel_attention
from .rules import LOGICAL_RULES, batch_sharding, create_sharded, shard_step, state_shardings

__all__ = ["AXES", "MeshConfig", "initialize_distributed", "make_mesh", "LOGICAL_RULES", "batch_sharding",
           "create_sharded", "shard_step", "state_shardings", "lasp2", "sequence_parallel_attention"]
