"""Argument checks shared by every op: kinds, shapes, dtypes, flags and, where they are known, values.

Every check raises ``ValueError`` naming the argument, what it got and what was expected.  Shapes
and dtypes are always static.  Values (the sign of a log decay, the range of ``beta``, the
offsets in ``cu_seqlens``) are checked eagerly when the array is concrete; under ``jax.jit`` they
are traced, and the same conditions are emitted as ``checkify.debug_check``, which costs nothing
unless the caller wraps the function with ``jax.experimental.checkify.checkify``::

    err, out = checkify.checkify(jax.jit(f))(*args)
    err.throw()          # raises if, say, cu_seqlens was not increasing
"""

from __future__ import annotations

import numbers

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import checkify

Array = jax.Array


def shape_of(x) -> tuple[int, ...]:
    return tuple(getattr(x, "shape", ()))


def is_concrete(x) -> bool:
    """True when the values of ``x`` are known here and now: not a tracer (``jit``, ``grad``,
    ``vmap``) and, on several hosts, held entirely by this process."""
    return not isinstance(x, jax.core.Tracer) and getattr(x, "is_fully_addressable", True)


def check_array(name: str, x) -> None:
    """``x`` must be an array (``jax.Array`` or ``numpy.ndarray``), not a list, scalar or None."""
    if hasattr(x, "shape") and hasattr(x, "dtype"):
        return
    hint = "; convert it with jnp.asarray" if isinstance(x, (list, tuple, numbers.Number)) else ""
    raise ValueError(f"{name} must be a jax.Array or numpy.ndarray, got {type(x).__name__}{hint}")


def check_float(name: str, x) -> None:
    check_array(name, x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"{name} must be a floating-point array, got dtype {x.dtype}")


def check_bool(name: str, value) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{name} must be a Python bool, got {value!r} "
                         "(an array here usually means an argument was passed in the wrong position)")
    return bool(value)


def check_shape(name: str, x, expected: tuple[int, ...], layout: str) -> None:
    """``x`` must be a float array of shape ``expected``; ``layout`` names the axes, e.g. '[B, T, H]'."""
    if x is None:
        raise ValueError(f"{name} is required, with shape {layout} = {tuple(expected)}")
    check_float(name, x)
    if shape_of(x) != tuple(expected):
        raise ValueError(f"{name} must have shape {layout} = {tuple(expected)}, got {shape_of(x)}")


def check_qkv(q, k, v, *, grouped_values: bool = False) -> tuple[int, int, int, int, int]:
    """``q, k [B, T, H, K]`` and ``v [B, T, HV, V]``; returns ``(B, T, H, K, V)``.

    ``HV == H`` unless ``grouped_values``, where HV may be any multiple of H (value head ``hv``
    then reads query/key head ``hv // (HV // H)``).
    """
    for name, x in (("q", q), ("k", k), ("v", v)):
        check_float(name, x)
        if len(shape_of(x)) != 4:
            raise ValueError(f"{name} must have rank 4 [B, T, H, D], got shape {shape_of(x)}")
    if shape_of(q) != shape_of(k):
        raise ValueError(f"q and k must have the same shape [B, T, H, K], got q {shape_of(q)} and k {shape_of(k)}")
    B, T, H, K = q.shape
    if v.shape[:2] != (B, T):
        raise ValueError(f"v must have shape [B={B}, T={T}, H, V] like q, got {shape_of(v)}")
    if grouped_values:
        if v.shape[2] % H:
            raise ValueError(f"v must have a multiple of the {H} q/k heads (grouped values), got v shape {shape_of(v)}")
    elif v.shape[2] != H:
        raise ValueError(f"v must have H={H} heads like q and k, got v shape {shape_of(v)}")
    if T < 1:
        raise ValueError(f"the sequence length must be at least 1, got q shape {shape_of(q)}")
    return B, T, H, K, v.shape[3]


def check_state(name: str, x, expected: tuple[int, ...], layout: str) -> None:
    """A recurrent state: float32 of shape ``expected`` (states accumulate in float32)."""
    check_shape(name, x, expected, layout)
    if x.dtype != jnp.float32:
        raise ValueError(f"{name} must be float32 (states accumulate in float32), got {x.dtype}")


def resolve_scale(scale, key_dim: int):
    """``scale`` as given (a Python number or a scalar array), or ``key_dim ** -0.5`` when None."""
    if scale is None:
        return key_dim ** -0.5
    if isinstance(scale, bool) or not (isinstance(scale, numbers.Real) or np.ndim(scale) == 0):
        raise ValueError(f"scale must be a number or a scalar array, got {scale!r}")
    return scale


def check_chunk_size(chunk_size) -> int:
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, numbers.Integral) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    return int(chunk_size)


def check_cu_seqlens(cu_seqlens, batch: int, length: int) -> int:
    """Validates packing offsets ``[N + 1]``; returns the number of sequences N (``batch`` if None)."""
    if cu_seqlens is None:
        return batch
    check_array("cu_seqlens", cu_seqlens)
    if batch != 1:
        raise ValueError(f"cu_seqlens requires a packed batch with B == 1, got B = {batch}")
    shape = shape_of(cu_seqlens)
    if len(shape) != 1 or shape[0] < 2:
        raise ValueError(f"cu_seqlens must have shape [N + 1] with N >= 1, got shape {shape}")
    if not jnp.issubdtype(cu_seqlens.dtype, jnp.integer):
        raise ValueError(f"cu_seqlens must be an integer array, got dtype {cu_seqlens.dtype}")
    expect = f"start at 0, end at T = {length} and never decrease"
    if is_concrete(cu_seqlens):
        cu = np.asarray(cu_seqlens)
        if cu[0] != 0 or cu[-1] != length or np.any(np.diff(cu) < 0):
            raise ValueError(f"cu_seqlens must {expect}, got {cu.tolist()}")
    else:
        cu = jnp.asarray(cu_seqlens)
        ok = (cu[0] == 0) & (cu[-1] == length) & jnp.all(cu[1:] >= cu[:-1])
        checkify.debug_check(ok, f"cu_seqlens must {expect}")
    return shape[0] - 1


def check_range(name: str, x, lo: float, hi: float, what: str) -> None:
    """Every value of ``x`` in ``[lo, hi]`` (``-inf`` allowed as ``lo``); NaN always fails."""
    if is_concrete(x):
        values = np.asarray(x, np.float32)
        bad = ~((values >= lo) & (values <= hi))
        if np.any(bad):
            first = tuple(int(i) for i in np.argwhere(bad)[0])
            raise ValueError(f"{name} must be {what}, got {values[first]} at index {first}")
    else:
        checkify.debug_check(jnp.all((x >= lo) & (x <= hi)), f"{name} must be {what}")


def check_log_decay(name: str, g) -> None:
    """A log decay: ``g <= 0`` (decay ``exp(g)`` in [0, 1]; ``-inf`` is a full reset)."""
    check_range(name, g, -np.inf, 0.0, "a log decay <= 0 (exp(g) in [0, 1]; -inf resets the state)")


def sequence_spans(cu_seqlens, batch: int, length: int) -> list[tuple[int, int, int]]:
    """``(row, start, end)`` of every sequence, for loops in Python (the ``naive`` oracles).

    ``cu_seqlens`` must then be concrete: a ``ValueError`` says so under ``jit``.
    """
    if cu_seqlens is None:
        return [(b, 0, length) for b in range(batch)]
    if not is_concrete(cu_seqlens):
        raise ValueError("cu_seqlens must be concrete for the naive ops (they loop over sequences in "
                         "Python); close over a NumPy array instead of passing it through jit")
    cu = np.asarray(cu_seqlens)
    return [(0, int(a), int(b)) for a, b in zip(cu[:-1], cu[1:])]


def initial_state_kv(initial_state, n: int, h: int, k: int, v: int, state_v_first: bool):
    """Validates ``initial_state`` (``[N, H, K, V]``, or ``[N, H, V, K]`` with ``state_v_first``)
    and returns it in ``[N, H, K, V]`` order, or None."""
    if initial_state is None:
        return None
    if state_v_first:
        check_state("initial_state", initial_state, (n, h, v, k), "[N, H, V, K] (state_v_first=True)")
        return jnp.swapaxes(initial_state, -1, -2)
    check_state("initial_state", initial_state, (n, h, k, v), "[N, H, K, V]")
    return initial_state
