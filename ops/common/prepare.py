"""Arguments as data: one validation-and-normalisation step before every chunk and recurrent form.

:func:`prepare` checks an op's arguments once and returns :class:`Inputs`, float32 working arrays
in one convention for every family: q already scaled, q/k L2-normalised when asked, key heads
repeated for grouped values, gates in log space, ``beta`` as the step actually taken, states in
``[N, HV, K, V]`` order.  The forms consume ``Inputs`` and :func:`finish` turns their float32
results back into the op's return value.  (The ``naive`` oracles do not use this module: they
compute everything themselves from the raw arguments.)
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from . import checks

Array = jax.Array

L2NORM_EPS = 1e-6


class Inputs(NamedTuple):
    """Validated float32 inputs of one op call (HV value heads; HV == H unless grouped)."""

    q: Array                      # [B, T, HV, K], times the scale ([B, T, H, K] unrepeated, see prepare)
    k: Array                      # [B, T, HV, K] ([B, T, H, K] unrepeated)
    v: Array                      # [B, T, HV, V]
    g: Array | None               # [B, T, HV] log decay per head
    gk: Array | None              # [B, T, HV, K] log decay per key dimension
    gv: Array | None              # [B, T, HV, V] log decay per value dimension
    beta: Array | None            # [B, T, HV] delta-rule step
    initial_state: Array | None   # [N, HV, K, V]
    cu_seqlens: Array | None      # [N + 1] int32
    num_seqs: int
    out_dtype: Any
    output_final_state: bool
    state_v_first: bool


def l2norm(x: Array, eps: float = L2NORM_EPS) -> Array:
    """``x / sqrt(sum(x**2) + eps)`` over the last axis, in float32."""
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + eps)


def _gate(name, x, shape, layout, *, log_decay=True):
    if x is None:
        return None
    checks.check_shape(name, x, shape, layout)
    if log_decay:
        checks.check_log_decay(name, x)
    return x.astype(jnp.float32)


def prepare(q, k, v, *, scale=None, initial_state=None, output_final_state: bool = False,
            cu_seqlens=None, g=None, g_gamma=None, gk=None, gv=None, beta=None, delta_rule: bool = False,
            grouped_values: bool = False, state_v_first: bool = False,
            qk_l2norm: bool = False, beta_logits: bool = False, allow_neg_eigval: bool = False,
            A_log=None, dt_bias=None, names: dict[str, str] | None = None,
            repeat_key_heads: bool = True) -> Inputs:
    """Validates an op's arguments and returns float32 :class:`Inputs`.

    Args:
      q, k: ``[B, T, H, K]``; v: ``[B, T, HV, V]`` (HV a multiple of H when ``grouped_values``).
      scale: multiplies q; None means ``K ** -0.5``.
      initial_state: ``[N, HV, K, V]`` float32 (``[N, HV, V, K]`` with ``state_v_first``).
      output_final_state: whether :func:`finish` returns the final state.
      cu_seqlens: ``[N + 1]`` int offsets of packed sequences (B == 1).
      g: ``[B, T, HV]`` log decay, or the raw gate input when ``A_log`` is given:
        ``g <- -exp(A_log) * softplus(g + dt_bias)``.
      g_gamma: ``[H]`` constant log decay per head (instead of g).
      gk, gv: ``[B, T, HV, K]`` / ``[B, T, HV, V]`` log decays per key / value dimension.
      beta: ``[B, T, HV]`` delta-rule step, in ``[0, 1]`` (``[0, 2]`` with ``allow_neg_eigval``);
        with ``beta_logits`` raw logits, mapped to ``sigmoid(beta)`` (``2 sigmoid(beta)``).
      delta_rule: the op is a delta rule: a missing ``beta`` means a step of 1.
      qk_l2norm: L2-normalise q and k before scaling.
      names: how the caller's signature names the gates in error messages, e.g. ``{"gk": "g"}``.
      repeat_key_heads: with grouped values, repeat q and k to HV heads (False: keep H heads;
        the consumer maps value head hv to key head ``hv // (HV / H)``, see :func:`with_repeated_key_heads`).
    """
    B, T, H, K, V = checks.check_qkv(q, k, v, grouped_values=grouped_values)
    for name, flag in (("output_final_state", output_final_state), ("state_v_first", state_v_first),
                       ("use_qk_l2norm_in_kernel", qk_l2norm),
                       ("use_beta_sigmoid_in_kernel", beta_logits), ("allow_neg_eigval", allow_neg_eigval)):
        checks.check_bool(name, flag)
    HV = v.shape[2]
    N = checks.check_cu_seqlens(cu_seqlens, B, T)
    heads = "[B, T, HV]" if grouped_values else "[B, T, H]"
    initial_state = checks.initial_state_kv(initial_state, N, HV, K, V, state_v_first)
    scale = checks.resolve_scale(scale, K)

    if g is not None and g_gamma is not None:
        raise ValueError("pass at most one of g [B, T, H] (per-token log decay) and g_gamma [H] "
                         "(constant per-head log decay), got both")
    if A_log is not None:
        checks.check_shape("g", g, (B, T, HV), heads)
        checks.check_shape("A_log", A_log, (HV,), "[HV]")
        bias = jnp.zeros((HV,), jnp.float32) if dt_bias is None else dt_bias
        checks.check_shape("dt_bias", bias, (HV,), "[HV]")
        g = -jnp.exp(A_log.astype(jnp.float32)) * jax.nn.softplus(g.astype(jnp.float32) + bias)
    else:
        g = _gate("g", g, (B, T, HV), heads)
    if g_gamma is not None:
        g = jnp.broadcast_to(_gate("g_gamma", g_gamma, (H,), "[H]")[None, None], (B, T, H))
    names = names or {}
    gk = _gate(names.get("gk", "gk"), gk, (B, T, HV, K), "[B, T, HV, K]" if grouped_values else "[B, T, H, K]")
    gv = _gate("gv", gv, (B, T, HV, V), "[B, T, HV, V]" if grouped_values else "[B, T, H, V]")

    if beta is None and delta_rule:
        if beta_logits:
            raise ValueError("beta=None (a step of 1) cannot be combined with use_beta_sigmoid_in_kernel=True")
        beta = jnp.ones((B, T, HV), jnp.float32)
    elif beta is not None:
        beta = _gate("beta", beta, (B, T, HV), heads, log_decay=False)
        if beta_logits:
            beta = jax.nn.sigmoid(beta) * (2.0 if allow_neg_eigval else 1.0)
        else:
            hi = 2.0 if allow_neg_eigval else 1.0
            checks.check_range("beta", beta, 0.0, hi, f"in [0, {hi:g}]" + (
                "" if allow_neg_eigval else " (pass allow_neg_eigval=True for steps up to 2)"))

    qf, kf = q.astype(jnp.float32), k.astype(jnp.float32)
    if qk_l2norm:
        qf, kf = l2norm(qf), l2norm(kf)
    if HV != H and repeat_key_heads:
        qf, kf = jnp.repeat(qf, HV // H, axis=2), jnp.repeat(kf, HV // H, axis=2)
    cu = None if cu_seqlens is None else jnp.asarray(cu_seqlens, jnp.int32)
    return Inputs(qf * scale, kf, v.astype(jnp.float32), g, gk, gv, beta, initial_state, cu, N, v.dtype,
                  bool(output_final_state), bool(state_v_first))


def with_repeated_key_heads(x: Inputs) -> Inputs:
    """``x`` with q and k repeated to the value heads (a no-op when they already match)."""
    G = x.v.shape[2] // x.q.shape[2]
    if G == 1:
        return x
    return x._replace(q=jnp.repeat(x.q, G, axis=2), k=jnp.repeat(x.k, G, axis=2))


def finish(x: Inputs, o: Array, final: Array) -> tuple[Array, Array | None]:
    """``(o in v's dtype, final state or None)``, the state transposed back when ``state_v_first``."""
    if not x.output_final_state:
        return o.astype(x.out_dtype), None
    return o.astype(x.out_dtype), (jnp.swapaxes(final, -1, -2) if x.state_v_first else final)
