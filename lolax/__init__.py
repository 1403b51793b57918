"""lolax: efficient sequence models and memory-efficient training in JAX.

| package | what it holds |
|---|---|
| :mod:`lolax.ops` | chunkwise linear attention and its relatives, in flash-linear-attention's API |
| :mod:`lolax.models` | Flax NNX mixer layers, hybrid language models, cached generation |
| :mod:`lolax.optim` | low-rank and memory-efficient optimizers as optax transformations |
| :mod:`lolax.parallelism` | meshes, sharding rules, LASP-2 and ring / Ulysses attention |

The sub-packages are imported on first use, so ``import lolax`` is cheap.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_SUBPACKAGES = ("ops", "models", "optim", "parallelism")


def __getattr__(name: str):
    if name in _SUBPACKAGES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'lolax' has no attribute {name!r}")


__all__ = ["__version__", *_SUBPACKAGES]
