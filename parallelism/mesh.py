"""Device meshes with the axes ``data``, ``fsdp``, ``sequence`` and ``tensor``; multi-host start.

Every lolax mesh has the same four named axes, in this order (outermost first):

========== ==================================================================================
``data``     pure data parallelism: the batch is split, parameters are replicated
``fsdp``     the batch is split *and* parameters / optimizer state are sharded (ZeRO-3 style)
``sequence`` the sequence is split (LASP-2 for linear layers, ring / Ulysses for softmax)
``tensor``   heads and MLP hidden units are split (Megatron-style tensor parallelism)
========== ==================================================================================

Unused axes have size 1, so the same partition specs work on every mesh.  ``tensor`` is the
innermost axis because it communicates most often (fastest interconnect); ``data`` the outermost.

    mesh = make_mesh({"data": -1, "tensor": 2})      # all devices: data = n / 2, tensor = 2
    mesh = make_mesh(MeshConfig(fsdp=4, sequence=2))

Multi-host (TPU pods, GPU clusters): call :func:`initialize_distributed` once at program start on
every process, *before* any other JAX call, then build the mesh over ``jax.devices()`` (all hosts'
devices) exactly as on one host.  On a single host it does nothing.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Mapping, Sequence

import jax
from absl import logging

AXES = ("data", "fsdp", "sequence", "tensor")
"""Mesh axis names, outermost first."""

BATCH_AXES = ("data", "fsdp")
"""Axes that split the batch."""


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Axis sizes; ``-1`` (at most one axis) takes every device the others leave."""

    data: int = -1
    fsdp: int = 1
    sequence: int = 1
    tensor: int = 1

    @classmethod
    def from_any(cls, config: "MeshConfig | Mapping[str, Any] | None") -> "MeshConfig":
        """Accepts a MeshConfig, a dict or an ml_collections ConfigDict (unknown keys rejected)."""
        if config is None:
            return cls()
        if isinstance(config, cls):
            return config
        values = dict(config.items() if hasattr(config, "items") else config)
        unknown = sorted(set(values) - set(AXES))
        if unknown:
            raise ValueError(f"unknown mesh axis name(s) {unknown}; mesh axes are {list(AXES)}")
        return cls(**{k: values[k] for k in AXES if k in values})

    def sizes(self) -> dict[str, int]:
        return {a: getattr(self, a) for a in AXES}


def resolve_axis_sizes(config: "MeshConfig | Mapping[str, Any] | None",
                       num_devices: int) -> dict[str, int]:
    """Replaces a ``-1`` by the remaining device count and validates the sizes.

    Raises ValueError naming the offending axis and the device count when a size is not a
    positive int (or -1), when more than one axis is -1, when the sizes need more devices than
    ``num_devices``, or when the fixed sizes do not divide ``num_devices`` for a -1 axis.
    """
    sizes = MeshConfig.from_any(config).sizes()
    for axis, n in sizes.items():
        if isinstance(n, bool) or not isinstance(n, int) or (n < 1 and n != -1):
            raise ValueError(f"mesh.{axis} = {n!r} must be a positive int or -1 (fill); "
                             f"{num_devices} devices available")
    fill = [a for a, n in sizes.items() if n == -1]
    if len(fill) > 1:
        raise ValueError(f"only one mesh axis may be -1 (fill), got {fill}; {num_devices} devices available")
    fixed = math.prod(n for n in sizes.values() if n != -1)
    if fill:
        axis = fill[0]
        if num_devices % fixed:
            others = ", ".join(f"{a}={n}" for a, n in sizes.items() if n != -1 and n > 1) or "none"
            raise ValueError(f"mesh.{axis} = -1 cannot fill {num_devices} devices: the other axes "
                             f"({others}) use {fixed} devices, which does not divide {num_devices}")
        sizes[axis] = num_devices // fixed
    total = math.prod(sizes.values())
    if total > num_devices:
        big = max(sizes, key=sizes.get)
        raise ValueError(f"mesh {sizes} needs {total} devices but only {num_devices} are available "
                         f"(largest axis: mesh.{big} = {sizes[big]})")
    return sizes


def make_mesh(config: "MeshConfig | Mapping[str, Any] | None" = None, *,
              devices: Sequence[jax.Device] | None = None,
              axis_type: jax.sharding.AxisType = jax.sharding.AxisType.Auto) -> jax.sharding.Mesh:
    """Builds the 4-axis mesh ``(data, fsdp, sequence, tensor)`` from a config.

    Args:
      config: a :class:`MeshConfig`, dict or ConfigDict with any of the four axis sizes (missing
        axes default to ``data=-1`` and 1 otherwise); -1 fills the remaining devices.
      devices: the devices to use (default ``jax.devices()``).  When the sizes use fewer devices
        than given, the first ones are taken.
      axis_type: the type of every axis (always passed explicitly to ``jax.make_mesh``).  ``Auto``
        (default) lets the compiler propagate shardings from the in/out shardings of ``jax.jit``.

    Returns:
      a ``jax.sharding.Mesh`` with ``axis_names == AXES``.
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = resolve_axis_sizes(config, len(devices))
    n = math.prod(sizes.values())
    shape = tuple(sizes[a] for a in AXES)
    return jax.make_mesh(shape, AXES, axis_types=(axis_type,) * len(AXES), devices=devices[:n])


def mesh_summary(mesh: jax.sharding.Mesh) -> str:
    """``'data=4 fsdp=1 sequence=2 tensor=1 (8 devices)'``."""
    return " ".join(f"{a}={n}" for a, n in mesh.shape.items()) + f" ({mesh.size} devices)"


_DISTRIBUTED_ENV = ("JAX_COORDINATOR_ADDRESS", "COORDINATOR_ADDRESS")


def initialize_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None, *, auto: bool | None = None,
                           **kwargs: Any) -> bool:
    """Starts multi-host JAX (``jax.distributed.initialize``); on a single host does nothing.

    Call it once per process at program start, before any other JAX call.  Three ways:

    * explicit (any cluster)::

          initialize_distributed("10.0.0.1:1234", num_processes=4, process_id=rank)

    * auto-detected (Cloud TPU pods, SLURM, Open MPI, ...; JAX reads the environment)::

          initialize_distributed(auto=True)

    * environment: if ``JAX_COORDINATOR_ADDRESS`` is set, the call behaves like ``auto=True``
      (``jax.distributed.initialize`` reads ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES``
      and ``JAX_PROCESS_ID``).

    With none of these (the default), or ``num_processes == 1``, it returns False without
    touching JAX: single-host runs need no coordinator.  Afterwards ``jax.devices()`` lists the
    devices of every host and :func:`make_mesh` builds a global mesh; each process feeds its
    own slice of the batch (``jax.make_array_from_process_local_data``).

    Args:
      coordinator_address: ``host:port`` of process 0.
      num_processes, process_id: the process count and this process's rank.
      auto: force (True) or forbid (False) auto-detection; None decides from the arguments and
        the environment as above.
      **kwargs: passed on (``local_device_ids``, ``initialization_timeout``, ...).

    Returns:
      True if ``jax.distributed.initialize`` was called.
    """
    explicit = coordinator_address is not None or (num_processes or 1) > 1
    if auto is None:
        auto = explicit or any(os.environ.get(k) for k in _DISTRIBUTED_ENV)
    if not auto or num_processes == 1:
        logging.info("single-host run: jax.distributed.initialize not called")
        return False
    jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                               process_id=process_id, **kwargs)
    logging.info("multi-host JAX: process %d of %d, %d global devices", jax.process_index(),
                 jax.process_count(), jax.device_count())
    return True
