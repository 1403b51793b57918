"""LASP-2 sequence parallelism for every chunk family: one all-gather per layer.

The sequence axis of ``[B, T, H, D]`` inputs is split over a mesh axis (``'sequence'``) of W
devices; rank r holds tokens ``[r·T/W, (r+1)·T/W)``.  Every rank

1. runs the ordinary local chunk op from a zero incoming state, with ``output_final_state``:
   its local output and its local final state ``S_ext``.  For the delta-rule families the same
   pass also yields the rank's K×K transition ``M`` (product of ``exp(g_t)(I − β_t k_t k_tᵀ)``
   over its tokens): the op runs on ``[v, 0]`` from the initial state ``[0, I]``, and since every
   value column evolves independently the extra K columns of the final state are exactly ``M``
   (where the Pallas kernels may run and V + K is not one of their sizes, a second call on zero
   values from ``I`` gives ``M`` instead).  For the diagonal families the transition is the
   cumulative decay ``exp(Σ g)`` (a scalar per head, or a K-vector for GLA), summed directly
   (:mod:`lolax.ops.common.decay`);
2. packs ``(transition, S_ext)`` into one flat float32 vector and **all-gathers it once**
   (W·H·K·(V + K) values per sequence for delta rules, W·H·(K·V + 1 or K) for decays: independent
   of T);
3. folds the prefix ``S ← M_j S + S_ext,j`` over ranks ``j < r`` (a static loop: W is small);
4. corrects its output: diagonal decays add ``(s·Q ⊙ exp(G_local)) S_in`` (no recomputation);
   delta rules re-run the local chunk op with ``initial_state = S_in``.

The backward pass is JAX autodiff of this forward: the all-gather transposes into a reduce-scatter
that forms exactly LASP-2's suffix sums of state cotangents.

Packed sequences (``cu_seqlens``, B = 1): each rank runs its slice with local offsets
``clip(cu − r·T/W, 0, T/W)`` (empty local sequences are allowed).  Only the sequence crossing a
rank's left edge receives a carried state; a rank whose last sequence starts inside it contributes
a zero transition, so the fold stops at sequence starts by itself.  Initial states seed each
sequence on the rank holding its first token; final states are assembled from the gathered data
(the per-sequence local final states are then part of the one all-gather).

Usage (inside or outside ``jax.jit``; ``mesh`` may also be the abstract mesh of ``jax.set_mesh``,
which is how the models call it)::

    mesh = lolax.parallelism.make_mesh({"data": 2, "sequence": 4})
    o, final = lasp2("gated_delta_rule", q, k, v, g=g, beta=beta, mesh=mesh,
                     output_final_state=True)

Batch and heads stay sharded as the rules table says when the mesh has those axes (batch over
``data``/``fsdp``, heads over ``tensor``) and the sizes divide.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from ..ops import get_op
from ..ops.common import checks, decay
from ..ops.common.diagonal_kernels import SUPPORTED_DIMS
from ..ops.common.precision import einsum
from ..ops.common.scan import vary_like
from . import rules as _rules

FAMILIES = ("linear_attn", "simple_gla", "gla", "delta_rule", "gated_delta_rule")
DELTA_FAMILIES = ("delta_rule", "gated_delta_rule")
NORMALIZE_EPS = 1e-10  # as lolax.ops.linear_attn


def check_sequence_split(T: int, mesh, axis_name: str) -> int:
    """Returns the local length ``T / W``; ValueError if the axis is missing or W does not divide T."""
    if axis_name not in mesh.shape:
        raise ValueError(f"axis {axis_name!r} is not a mesh axis; the mesh has axes {mesh.axis_names}")
    W = mesh.shape[axis_name]
    if T % W:
        raise ValueError(f"sequence length T = {T} is not divisible by the {W} devices of mesh axis "
                         f"{axis_name!r}: every rank needs an equal block of T / {W} tokens (pad the "
                         f"sequence to a multiple of {W}, e.g. T = {-(-T // W) * W})")
    return T // W


def lasp2(family: str, q, k, v, *, mesh: jax.sharding.Mesh | jax.sharding.AbstractMesh,
          axis_name: str = "sequence", **op_kwargs):
    """``lolax.ops.get_op(family)`` with T sharded over ``mesh`` axis ``axis_name`` (LASP-2).

    Args:
      family: one of :data:`FAMILIES`.
      q, k: ``[B, T, H, K]``; v: ``[B, T, H(V), V]``, T divisible by the axis size.
      mesh: the device mesh (or the abstract mesh of ``jax.set_mesh``); ``axis_name`` its
        sequence axis.
      **op_kwargs: exactly what ``chunk_<family>`` takes (``g``, ``g_gamma``, ``beta``, ``scale``,
        ``initial_state``, ``output_final_state``, ``normalize`` (linear_attn),
        ``use_qk_l2norm_in_kernel``, ``allow_neg_eigval``, ``state_v_first``, ``cu_seqlens``,
        ``chunk_size``, ...).

    Returns:
      ``(o [B, T, H, V], final_state or None)`` equal to the unsharded op.
    """
    if family not in FAMILIES:
        raise ValueError(f"unknown linear family {family!r}; LASP-2 supports {FAMILIES}")
    kw = {key: val for key, val in op_kwargs.items() if val is not None}
    output_final_state = checks.check_bool("output_final_state", kw.pop("output_final_state", False))
    if family == "linear_attn":
        if checks.check_bool("normalize", kw.pop("normalize", True)):     # chunk_linear_attn's default
            return _normalized_linear_attn(q, k, v, mesh, axis_name, output_final_state, kw)
        return _lasp2(family, q, k, v, mesh, axis_name, output_final_state, dict(kw, normalize=False))
    v_first = checks.check_bool("state_v_first", kw.pop("state_v_first", False))
    if v_first and "initial_state" in kw:
        kw["initial_state"] = jnp.swapaxes(kw["initial_state"], -1, -2)
    o, final = _lasp2(family, q, k, v, mesh, axis_name, output_final_state, kw)
    return o, (jnp.swapaxes(final, -1, -2) if v_first and final is not None else final)


def _normalized_linear_attn(q, k, v, mesh, axis_name, output_final_state, kw):
    """``normalize=True``: the key sum z is one more value column of ones (as lolax.ops.linear_attn)."""
    checks.check_qkv(q, k, v)
    B, T, H, K = q.shape
    V = v.shape[-1]
    h0 = kw.pop("initial_state", None)
    S0, z0 = h0 if isinstance(h0, tuple) else (h0, None)
    if z0 is not None:
        N = checks.check_cu_seqlens(kw.get("cu_seqlens"), B, T)
        checks.check_state("initial_state[1]", z0, (N, 1, H, K), "[N, 1, H, K] (the key sum z)")
    v_aug = jnp.concatenate([v.astype(jnp.float32), jnp.ones((B, T, H, 1), jnp.float32)], -1)
    if S0 is not None or z0 is not None:
        N = S0.shape[0] if S0 is not None else z0.shape[0]
        S0 = jnp.zeros((N, H, K, V), jnp.float32) if S0 is None else S0
        z = jnp.zeros((N, H, K), jnp.float32) if z0 is None else z0[:, 0]
        kw["initial_state"] = jnp.concatenate([S0, z[..., None]], -1)
    o, final = _lasp2("linear_attn", q, k, v_aug, mesh, axis_name, output_final_state, dict(kw, normalize=False))
    o = o[..., :V] / (o[..., V:] + NORMALIZE_EPS)
    return o.astype(v.dtype), (None if final is None else (final[..., :V], final[..., V][:, None]))


def _lasp2(family, q, k, v, mesh, axis_name, output_final_state, kw):
    B, T, H, K, V = checks.check_qkv(q, k, v, grouped_values=family == "gated_delta_rule")
    HV = v.shape[2]
    Tl = check_sequence_split(T, mesh, axis_name)
    W = mesh.shape[axis_name]
    cu = kw.pop("cu_seqlens", None)
    packed = cu is not None
    N = checks.check_cu_seqlens(cu, B, T)
    h0 = kw.pop("initial_state", None)
    if h0 is not None:
        checks.check_state("initial_state", h0, (N, HV, K, V), "[N, HV, K, V]")
    if W == 1:
        return get_op(family)(q, k, v, initial_state=h0, output_final_state=output_final_state,
                              cu_seqlens=cu, **kw)

    # ---- specs: sequence over axis_name; batch over data/fsdp and heads over tensor when they divide
    bax = () if packed else _rules.axes_for(mesh, "batch", B, (axis_name,))
    hax = _rules.axes_for(mesh, "heads", math.gcd(H, HV), (axis_name,) + bax)
    b, h = _rules.spec_entry(bax), _rules.spec_entry(hax)
    tok = P(b, axis_name, h, None)
    arrays: dict[str, Any] = {"q": q, "k": k, "v": v}
    specs: dict[str, Any] = {"q": tok, "k": tok, "v": tok}
    for name in ("g", "beta"):
        if name in kw:
            x = kw.pop(name)
            arrays[name] = x
            specs[name] = P(b, axis_name, h) if x.ndim == 3 else P(b, axis_name, h, None)
    for name in ("g_gamma", "A_log", "dt_bias"):               # per-head parameters
        if name in kw:
            arrays[name] = jnp.asarray(kw.pop(name), jnp.float32)
            specs[name] = P(h)
    if h0 is not None:
        arrays["h0"] = h0
        specs["h0"] = P(None if packed else b, h, None, None)
    if packed:
        arrays["cu"] = jnp.asarray(cu, jnp.int32)
        specs["cu"] = P()
    scale = checks.resolve_scale(kw.pop("scale", None), K)
    static = dict(kw)  # remaining static op kwargs (chunk_size, flags, ...)

    final_spec = P(None if packed else b, h, None, None)
    out_specs = (tok, final_spec if output_final_state else P())
    body = _make_body(family, W, Tl, N, axis_name, packed, output_final_state, scale, static)
    o, final = jax.shard_map(body, mesh=mesh, in_specs=(specs,), out_specs=out_specs, check_vma=True)(arrays)
    return o, (final if output_final_state else None)


def _make_body(family, W, Tl, N, axis, packed, output_final_state, scale, static):
    delta = family in DELTA_FAMILIES
    op = get_op(family)
    # delta rules: [v, 0] carries the transition in K extra value columns when the chunk op runs
    # V + K columns (XLA, or kernels of that width); otherwise a second call on zeros finds it
    one_call = static.get("implementation") == "xla"

    def body(a):
        q, k, v = a["q"], a["k"], a["v"]
        Bl, _, Hl, K = q.shape
        HVl, V = v.shape[2], v.shape[3]
        one_call_here = one_call or (V + K) in SUPPORTED_DIMS
        r = jax.lax.axis_index(axis)
        off = r * Tl
        gates = {n: a[n] for n in ("g", "beta", "g_gamma", "A_log", "dt_bias") if n in a}
        Nl = N if packed else Bl
        h0 = a.get("h0")
        if h0 is None:
            h0 = jnp.zeros((Nl, HVl, K, V), jnp.float32)

        # which local sequences continue from the previous rank, and over how many local tokens
        if packed:
            cu = a["cu"]
            lo, hi = cu[:-1], cu[1:]
            crosses = (lo < off) & (hi > off)                                     # [N]
            local_cu = jnp.clip(cu - off, 0, Tl)
            cross_len = jnp.sum(jnp.where(crosses, jnp.minimum(hi, off + Tl) - off, 0))
        else:
            crosses = jnp.broadcast_to(r > 0, (Nl,))
            local_cu = None
            cross_len = jnp.where(r > 0, Tl, 0)
        rows = 1 if packed else Bl                                                 # fold chains
        sel = lambda m: m.reshape(m.shape + (1,) * 3)

        # ---- pass 1: local op from a zero incoming state (h0 for sequences starting here)
        init1 = jnp.where(sel(crosses), 0.0, h0)
        v1 = v
        if delta:
            eye = vary_like(jnp.where(sel(crosses), jnp.broadcast_to(jnp.eye(K, dtype=jnp.float32), (Nl, HVl, K, K)),
                                      0.0), q)
            zeros = jnp.zeros(v.shape[:3] + (K,), v.dtype)
            if one_call_here:
                init1 = jnp.concatenate([init1, eye], -1)
                v1 = jnp.concatenate([v, zeros], -1)
        init1 = vary_like(init1, q)
        o1, fin1 = op(q, k, v1, **gates, scale=scale, initial_state=init1, output_final_state=True,
                      cu_seqlens=local_cu, **static)
        if delta and not one_call_here:                # the transition from its own call: M = M·I
            _, M = op(q, k, zeros, **gates, scale=scale, initial_state=eye, output_final_state=True,
                      cu_seqlens=local_cu, **static)
            fin1 = jnp.concatenate([fin1, M], -1)

        # ---- per-rank transition of the crossing sequence and local final states
        if delta:
            S_loc, A_all = fin1[..., :V], fin1[..., V:]                          # [Nl,HV,K,V], [Nl,HV,K,K]
            A = jnp.sum(sel(crosses) * A_all, axis=0, keepdims=True) if packed else A_all
        else:
            S_loc = fin1
            tpos = jnp.arange(Tl)
            in_cross = (tpos < cross_len)[None, :, None]                         # [1, Tl, 1]
            glog = _log_decay(family, gates, q)                                  # [B,Tl,H(,K)] or None
            if glog is None:
                A = jnp.ones((rows, Hl), jnp.float32)
            else:
                m = in_cross if glog.ndim == 3 else in_cross[..., None]
                A = jnp.exp(jnp.sum(jnp.where(m, glog, 0.0), axis=1))            # [rows, H(,K)]
            A = jnp.where(cross_len > 0, A, 0.0)
        need_all = packed and output_final_state
        if packed and not need_all:
            e = off + Tl - 1
            last = (lo <= e) & (hi > e)
            S_send = jnp.sum(sel(last) * S_loc, axis=0, keepdims=True)          # [1, HV, K, V]
        else:
            S_send = S_loc                                                        # [Nl, HV, K, V]

        # ---- the one all-gather
        A_all_r, S_all_r = _all_gather_packed((A, S_send), axis, invariant=output_final_state)

        # ---- prefix fold over ranks (static loop), every prefix kept for the final states
        apply = _apply_transition(delta)
        S = jnp.zeros((rows,) + S_send.shape[1:], jnp.float32)
        prefixes = [S]
        for j in range(W):
            Aj, Sj = A_all_r[j], S_all_r[j]
            if packed:
                offj = j * Tl
                ej = offj + Tl - 1
                spans = jnp.sum(jnp.where((lo < offj) & (hi > offj), jnp.minimum(hi, offj + Tl) - offj, 0)) == Tl
                Aj = jnp.where(spans, Aj, 0.0)
                if need_all:
                    lastj = (lo <= ej) & (hi > ej)
                    Sj = jnp.sum(sel(lastj) * Sj, axis=0, keepdims=True)
            S = apply(Aj, S) + Sj
            prefixes.append(S)
        S_in = jnp.stack(prefixes)[r]                                             # [rows, HV, K, V]

        # ---- output: additive correction (decays) or re-run from S_in (delta rules)
        if delta:
            S_in_n = jnp.broadcast_to(S_in, (Nl,) + S_in.shape[1:]) if packed else S_in
            init2 = vary_like(jnp.where(sel(crosses), S_in_n, h0), q)
            o, _ = op(q, k, v, **gates, scale=scale, initial_state=init2, output_final_state=False,
                      cu_seqlens=local_cu, **static)
        else:
            qs = q.astype(jnp.float32) * scale
            if glog is not None:
                w = decay.decay_from_start(glog, axis=1)
                qs = qs * (w if glog.ndim == 4 else w[..., None])
            corr = einsum("bthk,bhkv->bthv", qs, S_in)
            keep = (jnp.arange(Tl) < cross_len)[None, :, None, None]
            o = (o1.astype(jnp.float32) + jnp.where(keep, corr, 0.0)).astype(o1.dtype)

        if not output_final_state:
            return o, jnp.zeros((), jnp.float32)
        if not packed:
            return o, prefixes[-1]
        # packed: final of sequence n from its owner rank (holding its last token)
        own = jnp.clip((hi - 1) // Tl, 0, W - 1)                                 # [N]
        crosses_own = (lo < own * Tl) & (hi > own * Tl)
        pref = jnp.stack(prefixes)[own, 0]                                       # [N, HV, K, V]
        A_own = A_all_r[own, 0]                                                  # [N, ...]
        S_own = S_all_r[own, jnp.arange(N)]                                      # [N, HV, K, V]
        carried = apply(A_own, pref)
        final = jnp.where(sel(crosses_own), carried, 0.0) + S_own
        return o, final

    return body


def _log_decay(family, gates, q):
    """Per-token log decay in f32: ``[B, T, H]`` (scalar) / ``[B, T, H, K]`` (GLA) / None."""
    if family == "linear_attn":
        return None
    if family == "gla":
        return gates["g"].astype(jnp.float32)
    if "g" in gates:
        return gates["g"].astype(jnp.float32)
    if "g_gamma" not in gates:                         # simple GLA without a decay
        return None
    B, T = q.shape[:2]
    return jnp.broadcast_to(gates["g_gamma"][None, None, :], (B, T, gates["g_gamma"].shape[0]))


def _apply_transition(delta: bool):
    if delta:
        return lambda A, S: einsum("...kl,...lv->...kv", A, S)

    def apply(a, S):
        return (a[..., None, None] if a.ndim == S.ndim - 2 else a[..., None]) * S

    return apply


def _all_gather_packed(xs, axis, invariant: bool = False):
    """All-gathers a tuple of arrays as ONE flat float32 vector; returns them with a leading W axis.

    ``invariant=False``: ``lax.all_gather`` (typed device-varying; its transpose is the
    reduce-scatter of LASP-2's backward).  ``invariant=True``: ``all_gather_invariant`` (typed
    replicated, so final states computed from it can leave ``shard_map`` unsharded over the axis;
    its backward is an all-reduce of the gathered cotangent, about twice the reduce-scatter's
    bytes).  Both lower to one HLO all-gather.
    """
    flat = jnp.concatenate([jnp.ravel(x.astype(jnp.float32)) for x in xs])
    if invariant:
        from jax._src.lax.parallel import all_gather_invariant  # not re-exported in jax.lax (0.10)
        g = all_gather_invariant(flat, axis, axis=0, tiled=False)                  # [W, P]
    else:
        g = jax.lax.all_gather(flat, axis, axis=0, tiled=False)                   # [W, P]
    out, start = [], 0
    for x in xs:
        n = int(np.prod(x.shape))
        out.append(g[:, start:start + n].reshape((g.shape[0],) + x.shape))
        start += n
    return tuple(out)
