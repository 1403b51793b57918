"""Mixture-of-Memories (MoM) with Gated DeltaNet memories, in the exact dense masked form.

A router ``W_r x_t`` over M memories picks the top-k (softmax, renormalised weights).  Every
memory has its own k, v, beta and decay projections (q is shared) and its own state; memory m
only sees the tokens routed to it (an unrouted token has k = 0, beta = 0 and g = 0, so it
neither writes nor decays m's state).  All memories run as one op call with the
memories stacked on the head axis.  ``o_t = sum_{m in topk(t)} w_{t,m} o_t^(m)`` (+ the optional
shared memory, which sees every token with weight 1), then a gated RMSNorm and ``o_proj``.

The load-balancing loss is ``aux_loss_weight * M * sum_m f_m P_m`` (f_m: fraction of routing
slots that picked m, P_m: mean router probability of m, over real tokens), returned by
``forward`` and summed over layers by the language model.  Short convolutions are applied to the
shared q only (k/v convolutions over routed sub-sequences have no dense masked equivalent).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from ..config import ModelConfig
from ..layers import GatedRMSNorm, dense, l2norm, param
from .linear import F32, RecurrentMixer, _conv_or_none, _heads, gdn_gate, gdn_gate_init


class MoM(RecurrentMixer):
    family = "gated_delta_rule"

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, layer_idx: int = 0):
        h, d = cfg.num_heads, cfg.head_size
        dv = d * cfg.gdn_expand_v
        m, mt = cfg.mom_num_memories, cfg.mom_num_memories + int(cfg.mom_shared_memory)
        self.num_heads, self.head_dim, self.value_dim = h, d, dv
        self.num_memories, self.total_memories, self.topk = m, mt, cfg.mom_topk
        self.shared, self.neg, self.chunk_size = cfg.mom_shared_memory, cfg.allow_neg_eigval, cfg.chunk_size
        self.implementation = cfg.implementation
        self.aux_weight = cfg.aux_loss_weight
        self.router = dense(cfg.d_model, m, ("embed", "memories"), rngs)
        self.q_proj = dense(cfg.d_model, h * d, ("embed", "heads"), rngs)
        self.q_conv = _conv_or_none(cfg.conv_size, h * d, rngs)
        self.k_proj = dense(cfg.d_model, mt * h * d, ("embed", "heads"), rngs)
        self.v_proj = dense(cfg.d_model, mt * h * dv, ("embed", "heads"), rngs)
        self.a_proj = dense(cfg.d_model, mt * h, ("embed", "heads"), rngs)
        self.b_proj = dense(cfg.d_model, mt * h, ("embed", "heads"), rngs)
        A_log, dt_bias = gdn_gate_init(rngs, mt * h)
        self.A_log, self.dt_bias = param(A_log, "heads"), param(dt_bias, "heads")
        self.g_proj = dense(cfg.d_model, h * dv, ("embed", "heads"), rngs)
        self.o_norm = GatedRMSNorm(dv, cfg.norm_eps)
        self.o_proj = dense(h * dv, cfg.d_model, ("heads", "embed"), rngs)

    def route(self, x, valid=None):
        """Returns ``(weights [B, T, M(+1)], routed bool, aux scalar)``."""
        probs = jax.nn.softmax(self.router(x).astype(F32), axis=-1)            # [B, T, M]
        top_w, top_i = jax.lax.top_k(probs, self.topk)
        top_w = top_w / jnp.sum(top_w, axis=-1, keepdims=True)
        onehot = jax.nn.one_hot(top_i, self.num_memories, dtype=F32)           # [B, T, k, M]
        weights = jnp.einsum("btk,btkm->btm", top_w, onehot)
        picked = jnp.sum(onehot, axis=2)                                         # [B, T, M] in {0, 1}
        w_tok = jnp.ones(x.shape[:2], F32) if valid is None else valid.astype(F32)
        count = jnp.maximum(jnp.sum(w_tok), 1.0)
        f = jnp.einsum("bt,btm->m", w_tok, picked) / (count * self.topk)
        p = jnp.einsum("bt,btm->m", w_tok, probs) / count
        aux = self.aux_weight * self.num_memories * jnp.sum(f * p)
        routed = picked > 0
        if self.shared:
            weights = jnp.concatenate([weights, jnp.ones(weights.shape[:2] + (1,), F32)], -1)
            routed = jnp.concatenate([routed, jnp.ones(routed.shape[:2] + (1,), bool)], -1)
        return weights, routed, aux

    def _project(self, x, ctx, conv):
        b, t, _ = x.shape
        h, mt = self.num_heads, self.total_memories
        weights, routed, aux = self.route(x, ctx.valid)
        r = jnp.repeat(routed, h, axis=-1)                                       # [B, T, Mt*H]
        q = l2norm(_heads(conv("q", self.q_conv, self.q_proj(x)), h))
        q = jnp.broadcast_to(q[:, :, None], (b, t, mt, h, self.head_dim)).reshape(b, t, mt * h, -1)
        k = l2norm(_heads(jax.nn.silu(self.k_proj(x)), mt * h))
        v = _heads(jax.nn.silu(self.v_proj(x)), mt * h)
        k = jnp.where(r[..., None], k, 0)
        beta = jax.nn.sigmoid(self.b_proj(x).astype(F32)) * (2.0 if self.neg else 1.0)
        g = gdn_gate(self.a_proj(x), self.A_log[...], self.dt_bias[...])
        return {"q": q, "k": k, "v": v, "beta": jnp.where(r, beta, 0.0), "g": jnp.where(r, g, 0.0),
                "allow_neg_eigval": self.neg,
                "_weights": weights, "_aux": aux}

    def _output(self, o, x, extras):
        b, t = o.shape[:2]
        o = o.reshape(b, t, self.total_memories, self.num_heads, self.value_dim)
        o = jnp.einsum("btmhv,btm->bthv", o.astype(F32), extras["_weights"]).astype(x.dtype)
        o = self.o_norm(o, _heads(self.g_proj(x), self.num_heads))
        return self.o_proj(o.reshape(b, t, -1))
