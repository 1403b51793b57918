"""The ops' precision policy: every product is a float32 product at ``Precision.HIGHEST``.

Inputs of any floating dtype are upcast to float32 once, at the op boundary (exact for bf16 and
fp16), and everything inside an op (gates, scores, the triangular inverse, states) is float32.
Matrix products go through :func:`einsum` / :func:`matmul`, which pin ``Precision.HIGHEST`` and
float32 accumulation, so the result does not depend on the platform's default: on a TPU a
float32 product at the default precision is one bfloat16 pass (8 mantissa bits), on recent
NVIDIA GPUs it may run as TF32 (10 bits), and either would lose three to four digits that the
chunk recurrence then compounds over every chunk.  ``docs/precision.md`` states the policy and
its cost; ``tests/test_ops_precision.py`` pins it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

HIGHEST = jax.lax.Precision.HIGHEST


def einsum(spec: str, *operands: jax.Array) -> jax.Array:
    """``jnp.einsum`` at full float32 precision with float32 accumulation."""
    return jnp.einsum(spec, *operands, precision=HIGHEST, preferred_element_type=jnp.float32)


def matmul(a: jax.Array, b: jax.Array) -> jax.Array:
    """``a @ b`` (batched over leading axes) at full float32 precision."""
    return jnp.matmul(a, b, precision=HIGHEST, preferred_element_type=jnp.float32)
