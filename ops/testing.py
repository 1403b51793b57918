"""Test helpers shared by the op tests and benchmarks: inputs, FLA's test loss, one error metric.

The metric is the relative RMS error ``rms(out - ref) / rms(ref)``; a check passes when
``rms(out - ref) <= rtol * rms(ref) + atol``.  ``atol`` is an explicit floor for quantities whose
reference is itself near zero (float32 round-off of O(1) terms does not shrink with the result);
there is no blanket pass for small differences.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np


def rms(x) -> float:
    x = np.asarray(x, np.float64)
    return float(np.sqrt(np.mean(x * x))) if x.size else 0.0


def rel_rms_error(ref, out) -> float:
    """``rms(out - ref) / rms(ref)`` in float64 (inf when the reference is exactly 0 and out is not)."""
    ref, out = np.asarray(ref, np.float64), np.asarray(out, np.float64)
    if ref.shape != out.shape:
        raise ValueError(f"shape mismatch: reference {ref.shape} vs output {out.shape}")
    err, scale = rms(out - ref), rms(ref)
    return err / scale if scale > 0 else (0.0 if err == 0 else float("inf"))


def assert_close(name: str, ref, out, rtol: float, atol: float = 0.0) -> None:
    """Asserts finite ``out`` with ``rms(out - ref) <= rtol * rms(ref) + atol`` (same shapes)."""
    ref, out = np.asarray(ref, np.float64), np.asarray(out, np.float64)
    assert ref.shape == out.shape, f"{name}: shape {out.shape} != reference {ref.shape}"
    assert np.all(np.isfinite(out)) or not np.all(np.isfinite(ref)), f"{name}: non-finite values"
    err, scale = rms(out - ref), rms(ref)
    assert err <= rtol * scale + atol, (
        f"{name}: rms error {err:.3e} > {rtol:.1e} x rms(ref) {scale:.3e} + {atol:.1e} "
        f"(relative {err / scale if scale else float('inf'):.3e})")


def random_inputs(seed: int, B: int, T: int, H: int, K: int, V: int, *, gate: str | None = None,
                  strength: float = 1.0, beta_max: float | None = None, value_heads: int | None = None,
                  num_states: int | None = None, unit_keys: bool = False, dtype=jnp.float32) -> dict:
    """Random op inputs in flash-linear-attention's test conventions (fixed seed).

    Returns q, k ``[B, T, H, K]`` and v ``[B, T, HV, V]`` (normal, in ``dtype``; k unit-norm with
    ``unit_keys``); with ``gate="scalar"`` g ``[B, T, HV]``, with ``gate="vector"`` g
    ``[B, T, H, K]``, drawn as ``logsigmoid(u) / strength`` (strength 0.1 is a 10x stronger
    decay); with ``beta_max`` beta ``[B, T, HV]`` uniform in ``[0, beta_max]``; and float32
    ``initial_state`` ``[N, HV, K, V]`` plus the cotangents ``do [B, T, HV, V]``, ``dht``.
    """
    HV = value_heads or H
    N = B if num_states is None else num_states
    rng = np.random.default_rng(seed)
    normal = lambda *s: rng.standard_normal(s).astype(np.float32)
    k = normal(B, T, H, K)
    if unit_keys:
        k = k / np.linalg.norm(k, axis=-1, keepdims=True)
    out = {"q": jnp.asarray(normal(B, T, H, K), dtype), "k": jnp.asarray(k, dtype),
           "v": jnp.asarray(normal(B, T, HV, V), dtype), "initial_state": jnp.asarray(normal(N, HV, K, V)),
           "do": jnp.asarray(normal(B, T, HV, V)), "dht": jnp.asarray(normal(N, HV, K, V))}
    if gate is not None:
        shape = {"scalar": (B, T, HV), "vector": (B, T, H, K)}[gate]
        out["g"] = jnp.asarray(jax.nn.log_sigmoid(normal(*shape)) / strength, dtype)
    if beta_max is not None:
        out["beta"] = jnp.asarray(beta_max * rng.uniform(size=(B, T, HV)).astype(np.float32), dtype)
    return out


def value_and_grads(fn: Callable, args: dict, do, dht):
    """``fn(**args) -> (o, final_state)`` and the gradients of the loss
    ``L = Σ(o ⊙ do) + Σ(h_T ⊙ dh_T)`` with respect to every entry of ``args``.

    The random cotangent on the final state makes ``initial_state`` and ``output_final_state``
    part of every gradient check.  Returns ``(o, final_state, grads)``.
    """
    def loss(a):
        o, ht = fn(**a)
        return jnp.sum(o.astype(jnp.float32) * do) + jnp.sum(ht * dht), (o, ht)

    grads, (o, ht) = jax.grad(loss, has_aux=True)(args)
    return o, ht, grads


def assert_forms_match(ref_fn: Callable, fns: dict, args: dict, do, dht, tol: dict, *, jit: bool = True) -> dict:
    """Compares each ``fns[name]`` with ``ref_fn`` on o, the final state and every gradient.

    ``tol`` maps ``"o"``, ``"final_state"`` and ``"d<arg>"`` (``"dq"``, ``"dg"``, ...) to a relative
    tolerance, with ``"grad"`` the default for gradients, and ``"atol"`` to the absolute floor
    (default 0).  Outputs must keep v's dtype and every gradient its input's dtype.  Returns
    ``{name: {quantity: relative error}}`` for reporting.
    """
    run = lambda f: jax.jit(lambda a: value_and_grads(f, a, do, dht)) if jit else (
        lambda a: value_and_grads(f, a, do, dht))
    ro, rh, rg = run(ref_fn)(args)
    errors = {}
    for name, fn in fns.items():
        o, h, g = run(fn)(args)
        assert o.dtype == args["v"].dtype, f"{name}: o dtype {o.dtype} != v dtype {args['v'].dtype}"
        assert h.dtype == jnp.float32, f"{name}: final state dtype {h.dtype}"
        errors[name] = {}
        for quantity, ref, out in [("o", ro, o), ("final_state", rh, h)] + [("d" + a, rg[a], g[a]) for a in rg]:
            if quantity.startswith("d"):
                assert out.dtype == args[quantity[1:]].dtype, f"{name} {quantity}: dtype {out.dtype}"
            assert_close(f"{name} {quantity}", ref, out, tol.get(quantity, tol.get("grad")), tol.get("atol", 0.0))
            errors[name][quantity] = rel_rms_error(ref, out)
    return errors


# ----------------------------------------------------------------------------------------------
# One calling convention for every family, so that tests (and kernel tests) loop over families
# ----------------------------------------------------------------------------------------------

GATES = {"linear_attn": None, "simple_gla": "scalar", "gla": "vector", "delta_rule": None,
         "gated_delta_rule": "scalar"}
"""The gate each family takes: none, a scalar log decay per head, or one per key dimension."""

DELTA = ("delta_rule", "gated_delta_rule")


def family_inputs(family: str, seed: int, B: int, T: int, H: int, K: int, V: int, *, strength: float = 1.0,
                  beta_max: float = 1.0, value_heads: int | None = None, num_states: int | None = None,
                  dtype=jnp.float32):
    """``(args, do, dht)`` for :func:`family_op`: ``args`` holds q, k, v, the family's ``g`` and
    ``beta`` (delta rules, with unit-norm keys) and ``initial_state``."""
    delta = family in DELTA
    x = random_inputs(seed, B, T, H, K, V, gate=GATES[family], strength=strength,
                      beta_max=beta_max if delta else None, value_heads=value_heads, num_states=num_states,
                      unit_keys=delta, dtype=dtype)
    args = {a: x[a] for a in ("q", "k", "v", "g", "beta", "initial_state") if a in x}
    return args, x["do"], x["dht"]


def family_op(family: str, form: str, **fixed) -> Callable:
    """``fn(q, k, v, [g], [beta], initial_state=...) -> (o, final_state)`` for any family and form.

    Keyword arguments in ``fixed`` are passed on (``output_final_state`` defaults to True;
    ``linear_attn`` defaults to ``normalize=False``).  Only the spelling of the gate differs
    between forms (``fused_recurrent_gla`` calls it ``gk``); this adapter hides that.
    """
    from . import get_op

    op = get_op(family, form)
    fixed = {"output_final_state": True, **fixed}
    if family == "linear_attn":
        fixed.setdefault("normalize", False)
    if form != "chunk":
        fixed = {k: v for k, v in fixed.items() if k not in ("chunk_size", "sub_chunk_size")}

    def fn(q, k, v, g=None, beta=None, **kw):
        gates = {}
        if g is not None:
            gates["gk" if (family, form) == ("gla", "fused_recurrent") else "g"] = g
        if beta is not None:
            gates["beta"] = beta
        return op(q, k, v, **gates, **fixed, **kw)

    return fn
