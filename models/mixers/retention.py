"""Fixed-decay layers on ``simple_gla``: RetNet's multi-scale retention and Lightning Attention.

Both keep one ``[K, V]`` state per head that decays by a constant factor per token (``g_gamma``,
log space) and differ in their decay schedule, feature map and output path.  Each class
docstring lists what matches the published layer (the paper and its released code) and
flash-linear-attention's (FLA's) version, and what does not.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ...ops.simple_gla import lightning_g_gamma, retnet_g_gamma
from ..config import ModelConfig
from ..layers import RMSNorm, dense, rms_normalize, rotary
from .linear import F32, RecurrentMixer, _heads


def group_normalize(x: jax.Array, eps: float) -> jax.Array:
    """``(x - mean) / sqrt(var + eps)`` over the last axis (one head), float32: a GroupNorm with one
    group per head and no learned affine."""
    x32 = x.astype(F32)
    centred = x32 - jnp.mean(x32, axis=-1, keepdims=True)
    return centred * jax.lax.rsqrt(jnp.mean(centred * centred, axis=-1, keepdims=True) + eps)


def _g_gamma(schedule, *args) -> tuple[float, ...]:
    """``schedule(*args)`` as a static tuple of per-head log decays (concrete even while the
    module is built under a trace, e.g. ``nnx.eval_shape``)."""
    with jax.ensure_compile_time_eval():
        return tuple(float(g) for g in np.asarray(schedule(*args)))


class RetNet(RecurrentMixer):
    """RetNet multi-scale retention: rotary q/k, per-head decay ``gamma_h = 1 - 2^(-5-h)``,
    a per-head norm of the output, then the gate ``swish(g_proj x)`` and ``o_proj``.

    ``y = o_proj( norm_h(o) * swish(g_proj x) )`` with ``o`` the retention output of head h,
    ``o_t = sum_{s<=t} gamma_h^(t-s) (q_t . k_s / sqrt(K)) v_s``.

    Compared with the paper (and its released code) and FLA's ``MultiScaleRetention``:

    * decay ``1 - 2^(-5-h)`` for h = 0..H-1: as both;
    * key dim per head ``d_model / H`` (the head size), scale ``K^-1/2``: as both;
    * output gate ``swish(g_proj x)`` on the normed output, then ``o_proj``: as both;
    * head norm: ``retnet_norm="group"`` (default) as the paper's GroupNorm with one group per head
      (mean and variance per head; the released code's LayerNorm per head without affine);
      ``"rms"`` as FLA (RMSNorm per head with a learned scale);
    * value and gate width: the paper's and FLA's are ``2 d_model`` (value heads twice as wide as
      the key heads); here ``retnet_expand_v`` times the head size, default 1 (see below);
    * rotary: FLA's (half-split channel pairs, frequencies ``rope_theta^(-2i/K)``); the released
      code pairs adjacent channels with frequencies ``10000^(-i/(K/2-1))``;
    * the paper's normalised decay mask and retention scores (parallel form): not done, as in FLA;
    * initialisation: LeCun normal, not the released code's scaled Xavier.

    Where they differ, and why it does or does not matter:

    * The paper's decay-mask and score normalisations divide each (head, position) row by one
      number, which the per-head norm removes (up to its epsilon); they do not change the layer.
    * The frequency spacing of the released code's rotary differs slightly from the usual one;
      which channels are paired is a fixed permutation of q and k, which a trained projection
      absorbs.  Not changed.
    * ``retnet_norm``: the paper's GroupNorm subtracts each head's mean; FLA's RMSNorm does not.
      That changes the layer, so it is an option.  The default is the paper's; ``"rms"`` is the
      layer lolax had before (and FLA's).  A learned per-channel scale would be redundant before
      ``o_proj`` (the gate multiplies elementwise), so ``"group"`` has none and no ``o_norm``.
    * ``retnet_expand_v``: the paper's value and gate width is twice the key width; the default
      stays 1 because the FLOP formulas of ``experiments/bench/flops.py`` and attention transfer
      (``experiments/transfer.py``, which copies a softmax teacher's ``v_proj``/``o_proj``) assume
      value heads as wide as the key heads.  Set ``retnet_expand_v=2`` for the paper's layout.
    """

    family = "simple_gla"

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, layer_idx: int = 0):
        h, d = cfg.num_heads, cfg.head_size
        dv = d * cfg.retnet_expand_v
        self.num_heads, self.chunk_size, self.rope_theta = h, cfg.chunk_size, cfg.rope_theta
        self.implementation, self.norm, self.eps = cfg.implementation, cfg.retnet_norm, cfg.norm_eps
        self.g_gamma = _g_gamma(retnet_g_gamma, h)
        self.q_proj = dense(cfg.d_model, h * d, ("embed", "heads"), rngs)
        self.k_proj = dense(cfg.d_model, h * d, ("embed", "heads"), rngs)
        self.v_proj = dense(cfg.d_model, h * dv, ("embed", "heads"), rngs)
        self.g_proj = dense(cfg.d_model, h * dv, ("embed", "heads"), rngs)
        if self.norm == "rms":
            self.o_norm = RMSNorm(dv, cfg.norm_eps, axis_name="kv")
        self.o_proj = dense(h * dv, cfg.d_model, ("heads", "embed"), rngs)

    def _project(self, x, ctx, conv):
        q = rotary(_heads(self.q_proj(x), self.num_heads), ctx.positions, self.rope_theta)
        k = rotary(_heads(self.k_proj(x), self.num_heads), ctx.positions, self.rope_theta)
        v = _heads(self.v_proj(x), self.num_heads)
        return {"q": q, "k": k, "v": v, "g_gamma": jnp.asarray(self.g_gamma, F32)}

    def _output(self, o, x, extras):
        if self.norm == "rms":
            n = rms_normalize(o, self.eps) * self.o_norm.scale[...]
        else:
            n = group_normalize(o, self.eps)
        y = (n * jax.nn.silu(_heads(self.g_proj(x), self.num_heads).astype(F32))).astype(o.dtype)
        return self.o_proj(y.reshape(y.shape[:2] + (-1,)))


class Lightning(RecurrentMixer):
    """Lightning Attention as the TransNormerLLM layer uses it: SiLU q/k, a fixed decay per head
    that depends on the layer's depth, then a norm, an output gate and ``o_proj``.

    With the defaults, ``y = o_proj( srms(o) * (u_proj x) )``: ``o`` is all heads' outputs
    concatenated, ``srms(z) = z / sqrt(mean(z^2) + eps)`` over that whole width (no learned scale)
    and the gate ``u = u_proj x`` has no activation.  The decay per head and layer is
    ``cfg.lightning_decay`` (:func:`lolax.ops.simple_gla.lightning_g_gamma`):

    * ``"alibi_slopes"`` (default, the released code): ``log gamma_h = -s_h (1 - l/(L-1) + 1e-5)``
      with ALiBi's slopes ``s_h = 2^(-8(h+1)/H)`` (H a power of two) for layer l of L, so the
      first layer decays fastest and the last hardly at all;
    * ``"fla_linear"`` (FLA's ``chunk_lightning_attn``): ``log gamma_h = -(8/H)(1 - l/L) h``;
      head 0 never decays.

    l and L count every layer of the model (softmax layers of a hybrid included), as the
    released code counts its decoder layers.

    Compared with TransNormerLLM (paper and released code; FLA has the op, not a layer):

    * decay: ``lightning_decay`` (default the release's schedule); FLA's op uses ``"fla_linear"``;
    * q, k = ``silu(x W)``, v = ``x W_v`` of width ``d_model`` (head size x H): as the release;
    * q.k scale: none in the release, ``K^-1/2`` here (FLA's op default); one factor for every
      head, which the norm removes up to its epsilon;
    * norm: ``lightning_norm="srms"`` (default) as the release (SRMSNorm over all heads, no
      scale); ``"rms"``: RMSNorm per head with a learned scale;
    * gate: ``lightning_gate="identity"`` (default) as the release (``u = u_proj x`` times the
      normed output); ``"swish"``: ``swish(g_proj x)``;
    * relative positions (the release's optional LRPE, per layer): not implemented.

    ``lightning_norm="rms", lightning_gate="swish"`` is the layer lolax had before (FLA's usual
    gated RMSNorm on a per-head output).  The identity gate's projection is named ``u_proj``, the
    swish gate's ``g_proj``, so a checkpoint of one never loads into the other.
    """

    family = "simple_gla"

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, layer_idx: int = 0):
        h, d = cfg.num_heads, cfg.head_size
        self.num_heads, self.chunk_size, self.implementation = h, cfg.chunk_size, cfg.implementation
        self.norm, self.gate, self.eps = cfg.lightning_norm, cfg.lightning_gate, cfg.norm_eps
        self.g_gamma = _g_gamma(lightning_g_gamma, h, layer_idx, cfg.num_layers, cfg.lightning_decay)
        self.q_proj = dense(cfg.d_model, h * d, ("embed", "heads"), rngs)
        self.k_proj = dense(cfg.d_model, h * d, ("embed", "heads"), rngs)
        self.v_proj = dense(cfg.d_model, h * d, ("embed", "heads"), rngs)
        if self.gate == "identity":
            self.u_proj = dense(cfg.d_model, h * d, ("embed", "heads"), rngs)
        else:
            self.g_proj = dense(cfg.d_model, h * d, ("embed", "heads"), rngs)
        if self.norm == "rms":
            self.o_norm = RMSNorm(d, cfg.norm_eps, axis_name="kv")
        self.o_proj = dense(h * d, cfg.d_model, ("heads", "embed"), rngs)

    def _project(self, x, ctx, conv):
        q = jax.nn.silu(_heads(self.q_proj(x), self.num_heads))
        k = jax.nn.silu(_heads(self.k_proj(x), self.num_heads))
        v = _heads(self.v_proj(x), self.num_heads)
        return {"q": q, "k": k, "v": v, "g_gamma": jnp.asarray(self.g_gamma, F32)}

    def _output(self, o, x, extras):
        width = o.shape[:2] + (-1,)
        if self.norm == "rms":
            n = (rms_normalize(o, self.eps) * self.o_norm.scale[...]).reshape(width)
        else:
            n = rms_normalize(o.reshape(width), self.eps)
        if self.gate == "identity":
            gate = self.u_proj(x).astype(F32)
        else:
            gate = jax.nn.silu(self.g_proj(x).astype(F32))
        return self.o_proj((n * gate).astype(o.dtype))
