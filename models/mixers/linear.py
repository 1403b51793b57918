"""Linear-attention mixers on the ``ops`` families (chunk form for sequences, recurrent for decoding).

| class | op family | parameters (besides ``q/k/v/o_proj``) |
|---|---|---|
| :class:`LinearAttention` | ``linear_attn`` | a feature map (``lolax.ops.feature_maps``), per-head RMSNorm |
| :class:`HedgehogAttention` | ``linear_attn`` | learnable Hedgehog maps ``q_map``/``k_map`` ``[H, D, D']`` |
| :class:`BasedAttention` | ``linear_attn`` (normalised) | q/k projected to ``based_feature_dim``, Taylor map |
| :class:`GLA` | ``gla`` | low-rank gate ``gk_down_proj``/``gk_up_proj``, output gate, gated RMSNorm |
| :class:`DeltaNet` | ``delta_rule`` | short convs, L2 q/k, ``b_proj`` (beta), per-head RMSNorm |
| :class:`GatedDeltaNet` | ``gated_delta_rule`` | DeltaNet's + ``a_proj A_log dt_bias``, optional gate ``g_proj`` |

The fixed-decay layers (RetNet, Lightning) live in :mod:`.retention`.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from ...ops import feature_maps as fm
from .. import dispatch
from ..config import ModelConfig
from ..layers import GatedRMSNorm, RMSNorm, ShortConv, dense, l2norm, param
from .base import Mixer

F32 = jnp.float32


class ConvIO:
    """Runs short convolutions in the current mode and collects their decoding states."""

    def __init__(self, ctx, mode, states):
        self.ctx, self.mode, self.states, self.out = ctx, mode, states, {}

    def __call__(self, name: str, conv: ShortConv | None, u: jax.Array, activation=jax.nn.silu):
        if conv is None:
            return activation(u) if activation is not None else u
        if self.mode == "step":
            y, self.out[name] = conv.step(u, self.states[name])
            return y
        y = conv(u, self.ctx.segment_ids, self.ctx.valid)
        if self.mode == "prefill":
            self.out[name] = conv.final_state(u, self.ctx.valid)
        return y


def _heads(y: jax.Array, h: int) -> jax.Array:
    return y.reshape(y.shape[:2] + (h, y.shape[-1] // h))


class RecurrentMixer(Mixer):
    """A layer around one linear family.  Subclasses define ``family``, ``_project`` and ``_output``.

    ``_project(x, ctx, conv) -> dict`` returns q, k, v and the op kwargs (``g``, ``g_gamma``,
    ``beta``, ``scale``, ``normalize``); keys starting with ``_`` are passed to ``_output`` only
    (``_aux`` is the layer's auxiliary loss).
    """

    family: str = "linear_attn"

    def _project(self, x, ctx, conv):
        raise NotImplementedError

    def _output(self, o, x, extras):
        raise NotImplementedError

    def _run(self, x, ctx, mode, cache, max_len, index):
        conv = ConvIO(ctx, mode, None if cache is None else cache.get("conv"))
        inp = self._project(x, ctx, conv)
        extras = {key: inp.pop(key) for key in list(inp) if key.startswith("_")}
        q, k, v = inp.pop("q"), inp.pop("k"), inp.pop("v")
        if ctx.valid is not None:                  # padding writes nothing and decays nothing
            valid = ctx.valid
            k = jnp.where(valid[..., None, None], k, 0)
            v = jnp.where(valid[..., None, None], v, 0)
            if inp.get("g_gamma") is not None:
                inp["g"] = jnp.where(valid[..., None], inp.pop("g_gamma")[None, None], 0.0)
            for name in ("g", "beta"):
                if inp.get(name) is not None:
                    shape = valid.shape + (1,) * (inp[name].ndim - 2)
                    inp[name] = jnp.where(valid.reshape(shape), inp[name], 0)
        kw = dict(inp)
        if mode == "step":
            kw.update(initial_state=cache["state"], output_final_state=True)
        elif mode == "prefill":
            kw["output_final_state"] = True
        o, state = dispatch.linear(self.family, q, k, v, form="fused_recurrent" if mode == "step" else "chunk",
                                   chunk_size=self.chunk_size, cu_seqlens=ctx.cu_seqlens,
                                   implementation=self.implementation, **kw)
        # the decoding cache: the op's final state ((S, z) for normalised linear attention), conv states
        new_cache = None if mode == "full" else {"state": state, "conv": conv.out}
        y, aux = self._output(o, x, extras), extras.get("_aux", jnp.zeros((), F32))
        return y, aux, new_cache


# ------------------------------------------------------------------------------------------------
# Linear attention with a feature map; Hedgehog; Based
# ------------------------------------------------------------------------------------------------

class LinearAttention(RecurrentMixer):
    """Causal linear attention ``o_t = sum_{s<=t} (phi(q_t) . phi(k_s)) v_s`` with ``cfg.feature_map``.

    The head outputs are RMS-normalised (as in FLA's LinearAttention) unless ``cfg.normalize``,
    which divides by ``s phi(q_t) . sum phi(k)`` instead (positive maps only).  Maps that contain
    their temperature (``hedgehog``, ``based_taylor``) use scale 1.
    """

    family = "linear_attn"

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, layer_idx: int = 0, feature_map: str | None = None):
        h, d = cfg.num_heads, cfg.head_size
        self.num_heads, self.head_dim, self.chunk_size = h, d, cfg.chunk_size
        self.implementation = cfg.implementation
        self.feature_map = feature_map or cfg.feature_map
        self.normalize = cfg.normalize
        self.q_proj = dense(cfg.d_model, h * d, ("embed", "heads"), rngs)
        self.k_proj = dense(cfg.d_model, h * d, ("embed", "heads"), rngs)
        self.v_proj = dense(cfg.d_model, h * d, ("embed", "heads"), rngs)
        self.o_proj = dense(h * d, cfg.d_model, ("heads", "embed"), rngs)
        if self.feature_map == "hedgehog":
            dp = cfg.hedgehog_dim or d
            self.hedgehog_form = cfg.hedgehog_form
            if cfg.hedgehog_form == "fla":             # identity init (D' = D), shared init for q and k
                init = lambda: jnp.broadcast_to(jnp.eye(d, dp, dtype=F32), (h, d, dp))
            else:                                       # LoLCATs: Kaiming-uniform, untied for q and k
                bound = math.sqrt(6.0 / d)
                init = lambda: jax.random.uniform(rngs.params(), (h, d, dp), F32, -bound, bound)
            self.q_map = param(init(), "heads", "kv", "features")
            self.k_map = param(init(), "heads", "kv", "features")
        self.o_norm = None if self.normalize else RMSNorm(d, cfg.norm_eps, axis_name="kv")

    def _phi(self, x, which):
        if self.feature_map != "hedgehog":
            return fm.FEATURE_MAPS[self.feature_map](x)
        weight = (self.q_map if which == "q" else self.k_map)[...]
        return fm.hedgehog(x, weight.astype(x.dtype), form=self.hedgehog_form)

    def _project(self, x, ctx, conv):
        q = self._phi(_heads(self.q_proj(x), self.num_heads), "q")
        k = self._phi(_heads(self.k_proj(x), self.num_heads), "k")
        v = _heads(self.v_proj(x), self.num_heads)
        scale = 1.0 if self.feature_map in fm.TEMPERATURE_INCLUDED else None
        return {"q": q, "k": k, "v": v, "scale": scale, "normalize": self.normalize}

    def _output(self, o, x, extras):
        if self.o_norm is not None:
            o = self.o_norm(o)
        return self.o_proj(o.reshape(o.shape[:2] + (-1,)))


class HedgehogAttention(LinearAttention):
    """Linear attention with Hedgehog's learnable softmax feature map (``cfg.hedgehog_form``)."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, layer_idx: int = 0):
        super().__init__(cfg, rngs, layer_idx, feature_map="hedgehog")


class BasedAttention(RecurrentMixer):
    """Based's linear branch: q/k projected to ``based_feature_dim`` per head, 2nd-order Taylor map
    (``1 + d + d^2`` features), normalised linear attention (scale 1), no output norm."""

    family = "linear_attn"

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, layer_idx: int = 0):
        h, d, f = cfg.num_heads, cfg.head_size, cfg.based_feature_dim
        self.num_heads, self.chunk_size = h, cfg.chunk_size
        self.implementation = cfg.implementation
        self.q_proj = dense(cfg.d_model, h * f, ("embed", "heads"), rngs)
        self.k_proj = dense(cfg.d_model, h * f, ("embed", "heads"), rngs)
        self.v_proj = dense(cfg.d_model, h * d, ("embed", "heads"), rngs)
        self.o_proj = dense(h * d, cfg.d_model, ("heads", "embed"), rngs)

    def _project(self, x, ctx, conv):
        q = fm.based_taylor(_heads(self.q_proj(x), self.num_heads))
        k = fm.based_taylor(_heads(self.k_proj(x), self.num_heads))
        v = _heads(self.v_proj(x), self.num_heads)
        return {"q": q, "k": k, "v": v, "scale": 1.0, "normalize": True}

    def _output(self, o, x, extras):
        return self.o_proj(o.reshape(o.shape[:2] + (-1,)))


class _GatedOutput(RecurrentMixer):
    """Shared output path: per-head gated RMSNorm with ``swish(g_proj(x))``, then ``o_proj``."""

    def _init_output(self, cfg, rngs, h, dv):
        self.g_proj = dense(cfg.d_model, h * dv, ("embed", "heads"), rngs)
        self.o_norm = GatedRMSNorm(dv, cfg.norm_eps)
        self.o_proj = dense(h * dv, cfg.d_model, ("heads", "embed"), rngs)

    def _output(self, o, x, extras):
        o = self.o_norm(o, _heads(self.g_proj(x), o.shape[2]))
        return self.o_proj(o.reshape(o.shape[:2] + (-1,)))


# ------------------------------------------------------------------------------------------------
# GLA
# ------------------------------------------------------------------------------------------------

class GLA(_GatedOutput):
    """Gated Linear Attention: ``g = logsigmoid(W2 W1 x + b) / gate_normalizer`` per key dim
    (key dim ``gla_expand_k * head``), output gate ``swish(g_proj x)`` into a per-head RMSNorm."""

    family = "gla"

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, layer_idx: int = 0):
        h, d = cfg.num_heads, cfg.head_size
        dk = int(cfg.gla_expand_k * d)
        self.num_heads, self.chunk_size, self.normalizer = h, cfg.chunk_size, cfg.gla_gate_normalizer
        self.implementation = cfg.implementation
        self.q_proj = dense(cfg.d_model, h * dk, ("embed", "heads"), rngs)
        self.k_proj = dense(cfg.d_model, h * dk, ("embed", "heads"), rngs)
        self.v_proj = dense(cfg.d_model, h * d, ("embed", "heads"), rngs)
        self.gk_down_proj = dense(cfg.d_model, cfg.gla_gate_rank, ("embed", "lowrank"), rngs)
        self.gk_up_proj = dense(cfg.gla_gate_rank, h * dk, ("lowrank", "heads"), rngs, use_bias=True)
        self._init_output(cfg, rngs, h, d)

    def _project(self, x, ctx, conv):
        h = self.num_heads
        q, k, v = _heads(self.q_proj(x), h), _heads(self.k_proj(x), h), _heads(self.v_proj(x), h)
        gk = self.gk_up_proj(self.gk_down_proj(x)).astype(F32)
        g = _heads(jax.nn.log_sigmoid(gk) / self.normalizer, h)
        return {"q": q, "k": k, "v": v, "g": g}


# ------------------------------------------------------------------------------------------------
# Delta rule: DeltaNet, Gated DeltaNet
# ------------------------------------------------------------------------------------------------

def _conv_or_none(size, channels, rngs):
    return ShortConv(channels, size, rngs) if size > 0 else None


class DeltaNet(RecurrentMixer):
    """DeltaNet: short causal convs (SiLU) on q, k, v, L2-normalised q/k, ``beta = sigmoid(b_proj x)``
    (``2 sigmoid`` with ``allow_neg_eigval``), per-head RMSNorm on the output."""

    family = "delta_rule"

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, layer_idx: int = 0):
        h, d = cfg.num_heads, cfg.head_size
        self.num_heads, self.num_v_heads = h, h
        self.chunk_size, self.neg = cfg.chunk_size, cfg.allow_neg_eigval
        self.implementation = cfg.implementation
        self.q_proj = dense(cfg.d_model, h * d, ("embed", "heads"), rngs)
        self.k_proj = dense(cfg.d_model, h * d, ("embed", "heads"), rngs)
        self.v_proj = dense(cfg.d_model, h * d, ("embed", "heads"), rngs)
        self.b_proj = dense(cfg.d_model, h, ("embed", "heads"), rngs)
        self.q_conv = _conv_or_none(cfg.conv_size, h * d, rngs)
        self.k_conv = _conv_or_none(cfg.conv_size, h * d, rngs)
        self.v_conv = _conv_or_none(cfg.conv_size, h * d, rngs)
        self.o_norm = RMSNorm(d, cfg.norm_eps, axis_name="kv")
        self.o_proj = dense(h * d, cfg.d_model, ("heads", "embed"), rngs)

    def _beta(self, b):
        beta = jax.nn.sigmoid(b.astype(F32))
        return 2.0 * beta if self.neg else beta

    def _project(self, x, ctx, conv):
        h, hv = self.num_heads, self.num_v_heads
        q = l2norm(_heads(conv("q", self.q_conv, self.q_proj(x)), h))
        k = l2norm(_heads(conv("k", self.k_conv, self.k_proj(x)), h))
        v = _heads(conv("v", self.v_conv, self.v_proj(x)), hv)
        return {"q": q, "k": k, "v": v, "beta": self._beta(self.b_proj(x)), "allow_neg_eigval": self.neg}

    def _output(self, o, x, extras):
        return self.o_proj(self.o_norm(o).reshape(o.shape[:2] + (-1,)))


def gdn_gate_init(rngs: nnx.Rngs, n: int):
    """FLA's GDN gate parameters: ``A ~ U(0, 16)`` stored as ``A_log``; ``dt`` log-uniform in
    [1e-3, 0.1] (floor 1e-4) stored as its inverse softplus ``dt_bias``."""
    a = jax.random.uniform(rngs.params(), (n,), F32, 0.0, 16.0)
    u = jax.random.uniform(rngs.params(), (n,), F32)
    dt = jnp.maximum(jnp.exp(u * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3)), 1e-4)
    return jnp.log(jnp.maximum(a, 1e-4)), dt + jnp.log(-jnp.expm1(-dt))


def gdn_gate(a, A_log, dt_bias):
    """``g = -exp(A_log) * softplus(a + dt_bias)`` in float32."""
    return -jnp.exp(A_log) * jax.nn.softplus(a.astype(F32) + dt_bias)


class GatedDeltaNet(DeltaNet):
    """Gated DeltaNet: DeltaNet plus the decay ``g = -exp(A_log) softplus(a_proj x + dt_bias)``,
    value dim ``gdn_expand_v * head``, and a per-head RMSNorm of the output with an optional gate.

    With ``gdn_num_v_heads = HV > num_heads`` (as in Qwen3-Next) each key head is shared by
    ``HV / num_heads`` value heads, each with its own gate, beta and ``[K, V]`` state.

    The output gate (FLA's ``use_gate``), per value head with ``n = o_norm`` (RMSNorm with a
    learned scale over one head's values):

    * ``gdn_use_gate=True, gdn_gate_activation="swish"`` (default, FLA and the paper):
      ``n(o) * swish(g_proj x)``;
    * ``gdn_gate_activation="sigmoid"`` (the gate of Kimi's KDA layer): ``n(o) * sigmoid(g_proj x)``,
      same parameters as swish;
    * ``gdn_use_gate=False``: ``n(o)``, and the layer has no ``g_proj`` at all.

    What the swish gate does to small models: at initialisation ``g_proj x`` is a random,
    token-dependent vector, and ``swish`` of it is negative or near zero for about half the
    channels, so every recalled value is multiplied channel by channel by a factor that flips or
    erases it.  In our MQAR runs (default settings, seed 0, one run each) this kept GDN at
    ``d_model`` 32 and 64 on the chance plateau, while without the gate it reached 0.991 (d = 64)
    and 0.824 (d = 32), and with a sigmoid gate (always in (0, 1), never flipping a sign) 0.975
    and 0.632.  At d = 128 the swish-gated layer reached 0.978 in the same sweep.
    """

    family = "gated_delta_rule"

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, layer_idx: int = 0):
        h, d = cfg.num_heads, cfg.head_size
        hv = cfg.gdn_num_v_heads or h
        dv = d * cfg.gdn_expand_v
        self.num_heads, self.num_v_heads = h, hv
        self.chunk_size, self.neg = cfg.chunk_size, cfg.allow_neg_eigval
        self.implementation = cfg.implementation
        self.q_proj = dense(cfg.d_model, h * d, ("embed", "heads"), rngs)
        self.k_proj = dense(cfg.d_model, h * d, ("embed", "heads"), rngs)
        self.v_proj = dense(cfg.d_model, hv * dv, ("embed", "heads"), rngs)
        self.a_proj = dense(cfg.d_model, hv, ("embed", "heads"), rngs)
        self.b_proj = dense(cfg.d_model, hv, ("embed", "heads"), rngs)
        A_log, dt_bias = gdn_gate_init(rngs, hv)
        self.A_log, self.dt_bias = param(A_log, "heads"), param(dt_bias, "heads")
        self.q_conv = _conv_or_none(cfg.conv_size, h * d, rngs)
        self.k_conv = _conv_or_none(cfg.conv_size, h * d, rngs)
        self.v_conv = _conv_or_none(cfg.conv_size, hv * dv, rngs)
        self.use_gate = cfg.gdn_use_gate
        if self.use_gate:
            self.g_proj = dense(cfg.d_model, hv * dv, ("embed", "heads"), rngs)
            self.o_norm = GatedRMSNorm(dv, cfg.norm_eps, activation=cfg.gdn_gate_activation)
        else:
            self.o_norm = RMSNorm(dv, cfg.norm_eps, axis_name="kv")
        self.o_proj = dense(hv * dv, cfg.d_model, ("heads", "embed"), rngs)

    def _project(self, x, ctx, conv):
        inp = super()._project(x, ctx, conv)
        inp["g"] = gdn_gate(self.a_proj(x), self.A_log[...], self.dt_bias[...])
        return inp

    def _output(self, o, x, extras):
        if self.use_gate:
            o = self.o_norm(o, _heads(self.g_proj(x), self.num_v_heads))
        else:
            o = self.o_norm(o)
        return self.o_proj(o.reshape(o.shape[:2] + (-1,)))
