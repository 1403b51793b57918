"""The projected-Adam engine shared by GaLore, APOLLO, Fira, FRUGAL and Natural GaLore.

Per matrix view ``G`` (``m × n``) of every leaf it receives:

1. at steps ``0, T, 2T, ...`` (the counter is read before its increment) the
   projector ``Q`` (``d × r``) is refreshed under ``lax.cond`` — SVD in float32
   with sign canonicalisation and a keep-the-old-projector guard when the SVD
   is not finite, a random Gaussian, or a random semi-orthogonal matrix — and
   the moments are kept, reset or rotated (``moment_policy``);
2. ``R = project(G, Q)``; optional hook ``precondition`` (Natural GaLore);
3. Adam moments on ``R`` and the direction ``d`` (:func:`optim._core.adam_direction`);
4. the method's ``combine`` hook maps ``(G, Q, R, d, c)`` to the full-size update.

Each method wraps this with its own NamedTuple state class.

``moments_8bit=True`` keeps the two moments block-wise in 8 bits (:mod:`optim.quantized`):
read back to float32 at the start of a step, stored again at its end.

Under FSDP (parameters sharded over an explicit mesh) nothing is gathered on an ordinary step:
the moments and projector are sharded like the parameter (:func:`optim._core.lowrank_specs`),
``R = QᵀG`` contracts over the sharded dimension as partial products summed by one all-reduce of
the small ``R`` (or needs no communication when the sharded dimension is not contracted), and
the update ``Q N`` comes out sharded like ``G``.  Only the SVD of a refresh gathers ``G``, inside
its ``lax.cond`` branch, so the gather runs once every ``T`` steps.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import optax

from . import _core
from . import projection as proj_lib
from . import quantized as q8


@dataclasses.dataclass(frozen=True)
class LeafCtx:
    """Static per-leaf information handed to the hooks."""

    index: int
    name: str
    view: proj_lib.MatrixView
    side: str
    rank: int


# combine(ctx, g2, q, r, d, c, extra, first) -> (u2 float32, extra)
CombineFn = Callable[..., tuple[jax.Array, dict]]


def make_lowrank(
    *,
    state_cls,
    rank_fn: Callable[[int, int, str], int],
    update_proj_gap: int,
    proj_side: str,
    projector: str,  # 'svd' | 'random' | 'semi_orthogonal'
    store_projector: bool,
    b1, b2, eps, eps_mode: str,
    moment_policy: str,
    combine: CombineFn,
    extra_init: Callable[[LeafCtx, jax.Array], dict] = lambda ctx, p: {},
    precondition: Optional[Callable] = None,
    seed: int = 0,
    svd_method: str = "full",
    dimension_numbers=None,
    store_key: bool = False,
    moments_8bit: bool = False,
) -> optax.GradientTransformation:
    """Builds the transformation (see module docstring)."""
    _core.check_bool("moments_8bit", moments_8bit)

    def stored(x, dtype, code):
        """A moment as kept in the state: 8-bit codes, or ``dtype`` (the parameter's)."""
        return q8.store(x, code) if moments_8bit else x.astype(dtype)

    def read(s, shape, code):
        return q8.load(s, shape, code) if moments_8bit else s

    def contexts(tree):
        views = _core.resolve_views(tree, dimension_numbers)
        names = _core.leaf_names(tree)
        ctxs = []
        for i, (v, nm) in enumerate(zip(views, names)):
            side = proj_lib.resolve_side(v.m, v.n, proj_side)
            r = rank_fn(v.m, v.n, side)
            _core.check_rank_fits(r, v.m, v.n, nm)
            ctxs.append(LeafCtx(i, nm, v, side, r))
        return ctxs

    def lowrank_shape(ctx: LeafCtx):
        return (ctx.rank, ctx.view.n) if ctx.side == "left" else (ctx.view.m, ctx.rank)

    def init_fn(params):
        leaves = jax.tree.leaves(params)
        ctxs = contexts(params)
        mus, nus, qs, extras = [], [], [], []
        for ctx, p in zip(ctxs, leaves):
            shp = lowrank_shape(ctx)
            mspec, qspec = _core.lowrank_specs(p, ctx.view, ctx.side)
            zeros = _core.reshard_to(jnp.zeros(shp, p.dtype), mspec)
            mus.append(stored(zeros, p.dtype, q8.FIRST))
            nus.append(stored(zeros, p.dtype, q8.SECOND))
            d = proj_lib.projected_dim(ctx.view.m, ctx.view.n, ctx.side)
            qs.append(_core.reshard_to(jnp.zeros((d, ctx.rank), p.dtype), qspec))
            ex = extra_init(ctx, p)
            if mspec is not None and "history" in ex:
                from jax.sharding import PartitionSpec as P
                ex = dict(ex, history=_core.reshard_to(ex["history"], P(None, *mspec)))
            extras.append(ex)
        fields = dict(
            count=jnp.zeros([], jnp.int32),
            moment_count=jnp.zeros([], jnp.int32),
            mu=_core.unflatten_like(params, mus),
            nu=_core.unflatten_like(params, nus),
            projector=_core.unflatten_like(params, qs) if store_projector else (),
        )
        if store_key:
            fields["key"] = jax.random.key_data(jax.random.key(seed))
        for k in state_cls._fields:
            if k not in fields:
                fields[k] = _core.unflatten_like(params, [e[k] for e in extras])
        return state_cls(**{k: fields[k] for k in state_cls._fields})

    def update_fn(updates, state, params=None):
        del params
        st = state._asdict()
        leaves = jax.tree.leaves(updates)
        ctxs = contexts(updates)
        count = st["count"]
        refresh = (count % update_proj_gap) == 0
        refresh_idx = count // update_proj_gap
        first = count == 0
        if moment_policy == "reset":
            t_m = jnp.where(refresh, 1, optax.safe_int32_increment(st["moment_count"]))
        else:
            t_m = optax.safe_int32_increment(st["moment_count"])
        tf = t_m.astype(jnp.float32)
        mus = _core.flatten_like(updates, st["mu"])
        nus = _core.flatten_like(updates, st["nu"])
        qs = _core.flatten_like(updates, st["projector"]) if store_projector else [None] * len(leaves)
        extra_keys = [k for k in state_cls._fields
                      if k not in ("count", "moment_count", "mu", "nu", "projector", "key")]
        extras = {k: _core.flatten_like(updates, st[k]) for k in extra_keys}
        key_data = st.get("key")

        outs, new_mu, new_nu, new_q = [], [], [], []
        new_extra = {k: [] for k in extra_keys}
        for j, (ctx, g) in enumerate(zip(ctxs, leaves)):
            # explicitly sharded (FSDP) leaves stay sharded: projections contract over the
            # sharded dimension with partial sums (an all-reduce of the low-rank result); only
            # the SVD of a refresh gathers the gradient, inside its lax.cond branch
            specs = jax.tree.map(_core.explicit_spec, (g, qs[j], {k: extras[k][j] for k in extra_keys}))
            mspec = _core.lowrank_specs(g, ctx.view, ctx.side)[0]
            g2 = ctx.view.to_matrix(g)
            shp = lowrank_shape(ctx)
            mu, nu, q_old = read(mus[j], shp, q8.FIRST), read(nus[j], shp, q8.SECOND), qs[j]
            ex = {k: extras[k][j] for k in extra_keys}
            d_dim = proj_lib.projected_dim(ctx.view.m, ctx.view.n, ctx.side)

            def make_projector(q_prev=None, g2=g2, ctx=ctx, d_dim=d_dim):
                if projector == "svd":
                    k = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), ctx.index), refresh_idx)
                    previous = None if q_prev is None else _core.replicate(q_prev)
                    return proj_lib.svd_projector(_core.replicate(g2), ctx.rank, ctx.side, method=svd_method,
                                                  key=k, previous=previous)
                if projector == "random":
                    kd = key_data if key_data is not None else jax.random.key_data(jax.random.key(seed))
                    return proj_lib.random_projector(kd, ctx.index, refresh_idx, d_dim, ctx.rank, g2.dtype)
                k = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), ctx.index), refresh_idx)
                return proj_lib.semi_orthogonal_projector(k, d_dim, ctx.rank, g2.dtype)

            def on_refresh(q_prev, mu, nu, ex, ctx=ctx, make_projector=make_projector):
                q_new = make_projector(q_prev)
                if q_prev is not None:   # computed unsharded; stored like the previous one
                    q_new = _core.reshard_to(q_new, _core.explicit_spec(q_prev))
                if projector == "svd" and q_prev is not None:
                    q_new = proj_lib.keep_if_finite(q_new, q_prev)
                if moment_policy == "reset":
                    mu, nu = jnp.zeros_like(mu), jnp.zeros_like(nu)
                    ex = {k: (jnp.zeros_like(v) if k == "history" else v) for k, v in ex.items()}
                elif moment_policy == "rotate":
                    m2, n2 = _core.rotate_moments(mu, nu, q_prev, q_new, ctx.side)
                    mu, nu = m2.astype(mu.dtype), n2.astype(nu.dtype)
                    if "history" in ex:
                        h = ex["history"]
                        c = _core.basis_overlap(q_new, q_prev)
                        h32 = h.astype(jnp.float32)
                        h2 = (jnp.einsum("ab,sbn->san", c, h32) if ctx.side == "left"
                              else jnp.einsum("smb,ab->sma", h32, c))
                        ex = dict(ex, history=h2.astype(h.dtype))
                return q_new.astype(g2.dtype), mu, nu, ex

            if store_projector:
                q, mu, nu, ex = jax.lax.cond(
                    refresh, on_refresh, lambda q_prev, mu, nu, ex: (q_prev, mu, nu, ex),
                    q_old, mu, nu, ex)
            else:  # regenerated every step from the key (APOLLO); 'rotate' is rejected earlier
                q = make_projector()
                if moment_policy == "reset":
                    mu, nu, ex = jax.lax.cond(
                        refresh, lambda mu, nu, ex: on_refresh(None, mu, nu, ex)[1:],
                        lambda mu, nu, ex: (mu, nu, ex), mu, nu, ex)

            r = proj_lib.project(g2.astype(jnp.float32), q.astype(jnp.float32), ctx.side,
                                 out_sharding=mspec)
            r_adam = r
            if precondition is not None:
                r_adam, ex = precondition(ctx, r, ex, count)
            mu2, nu2 = _core.adam_moments(r_adam, mu, nu, b1, b2)
            d, c = _core.adam_direction(mu2, nu2, tf, b1, b2, eps, eps_mode)
            u2, ex = combine(ctx, g2.astype(jnp.float32), q.astype(jnp.float32), r, d, c, ex, first)
            sg, sq, sex = specs
            outs.append(_core.reshard_to(ctx.view.from_matrix(u2).astype(g.dtype), sg))
            new_mu.append(stored(_core.reshard_to(mu2, mspec), mu.dtype, q8.FIRST))
            new_nu.append(stored(_core.reshard_to(nu2, mspec), nu.dtype, q8.SECOND))
            new_q.append(q if q is None else _core.reshard_to(q, sq))
            for k in extra_keys:
                new_extra[k].append(_core.reshard_to(ex[k].astype(extras[k][j].dtype), sex[k]))

        fields = dict(
            count=optax.safe_int32_increment(count),
            moment_count=t_m,
            mu=_core.unflatten_like(updates, new_mu),
            nu=_core.unflatten_like(updates, new_nu),
            projector=_core.unflatten_like(updates, new_q) if store_projector else (),
        )
        if "key" in state_cls._fields:
            fields["key"] = key_data
        for k in extra_keys:
            fields[k] = _core.unflatten_like(updates, new_extra[k])
        return _core.unflatten_like(updates, outs), state_cls(**fields)

    return optax.GradientTransformation(init_fn, update_fn)


def scalar_state(ctx: LeafCtx, p: jax.Array) -> dict:
    """Extra state: one float32 limiter norm per matrix."""
    return {"prev_norm": jnp.zeros([], jnp.float32)}
