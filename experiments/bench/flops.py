"""Model FLOPs of a training step, per token, from a :class:`lolax.models.ModelConfig`.

    from experiments.bench.flops import train_flops_per_token, param_count
    f = train_flops_per_token(cfg, seq_len=8192)   # {"matmul", "mixer", "total", "forward", "mixer_by_kind", ...}
    mfu = f["total"] * tokens_per_s / peak_flops_per_s

The convention is the usual one for model FLOP utilisation (MFU):

* only multiply-adds of products count, two FLOPs each; norms, gates, activations, softmax
  exponentials, rotary embeddings, the optimizer and the loss are left out;
* a training step costs three forward passes (the backward pass computes two products for each
  product of the forward: one for the gradient of each operand);
* recomputation under ``model.remat`` is not counted (it is work the hardware does, not work the
  model needs), so MFU is comparable between remat policies;
* causal masking halves whatever it masks: a query attends on average ``T / 2`` earlier keys,
  an intra-chunk score matrix is half a square, a triangular matrix times a block is half a
  dense product.  This is the model's count, not the hardware's: the XLA chunk form multiplies
  full C x C squares and masks them afterwards.

The two parts:

* ``matmul``: 2 FLOPs per weight a token passes through once, forward: every projection, the
  MLP, the output head (tied or not), and the short causal convolutions' taps (a depthwise
  convolution is also one multiply-add per weight per token); the embedding lookup is a gather
  and costs nothing.  Three forward passes make the familiar ``6 N`` per token.
* ``mixer``: the sequence mixing itself, per layer by its kind (:func:`mixer_forward_flops`),
  which depends on the sequence length for softmax attention and on the chunk size for the
  linear families.
"""

from __future__ import annotations

import math
from typing import Any

import jax
from flax import nnx

from lolax.models import LanguageModel, ModelConfig

TRAIN_MULTIPLIER = 3
"""A training step = forward + backward = three forward passes of products."""

SUPPORTED_KINDS = ("softmax", "swa", "linear_attn", "retnet", "lightning", "gla", "deltanet", "gated_deltanet")


def _unsupported(kind: str) -> ValueError:
    return ValueError(f"no FLOP formula for mixer {kind!r}; supported: {SUPPORTED_KINDS}")


def mixer_weight_count(cfg: ModelConfig, kind: str) -> int:
    """Weights of one layer's mixer a token passes through once (dense kernels and conv taps;
    no biases, norm scales or per-head gate constants), from the layer definitions in
    ``models/mixers``."""
    d, h, dh = cfg.d_model, cfg.num_heads, cfg.head_size
    if kind in ("softmax", "swa"):
        kv = cfg.kv_heads
        return d * h * dh + 2 * d * kv * dh + h * dh * d                  # q, k, v, o
    if kind == "linear_attn":
        return 4 * d * h * dh                                             # q, k, v, o
    if kind in ("retnet", "lightning"):
        e = cfg.retnet_expand_v if kind == "retnet" else 1
        return 2 * d * h * dh + 3 * d * h * dh * e                        # q, k; v, output gate, o (x expand_v)
    if kind == "gla":
        dk = int(cfg.gla_expand_k * dh)
        r = cfg.gla_gate_rank
        # q, k at the key dim; v, output gate, o at the head size; the low-rank key gate d -> r -> h*dk
        return 2 * d * h * dk + 3 * d * h * dh + d * r + r * h * dk
    if kind == "deltanet":
        conv = cfg.conv_size * 3 * h * dh
        return 4 * d * h * dh + d * h + conv                              # q, k, v, o, beta; q/k/v convs
    if kind == "gated_deltanet":
        hv = cfg.gdn_num_v_heads or h
        dv = dh * cfg.gdn_expand_v
        conv = cfg.conv_size * (2 * h * dh + hv * dv)
        gate = d * hv * dv if cfg.gdn_use_gate else 0
        # q, k; v, o (and the output gate g) at hv * dv; the decay a and the step beta per value head
        return 2 * d * h * dh + 2 * d * hv * dv + gate + 2 * d * hv + conv
    raise _unsupported(kind)


def matmul_weight_count(cfg: ModelConfig) -> int:
    """Every weight a token passes through once: the mixers, the SwiGLU MLPs (3 d x hidden each)
    and the output head (d x vocab, also when tied to the embedding)."""
    mlp = 3 * cfg.d_model * cfg.hidden_size
    layers = sum(mixer_weight_count(cfg, kind) + mlp for kind in cfg.layer_kinds)
    return layers + cfg.d_model * cfg.vocab_size


def softmax_forward_flops(seq_len: int, heads: int, head_dim: int, window: int | None = None) -> float:
    """Causal softmax attention, forward, per token: ``2 (products) * 2 FLOPs * keys * H * Dh``.

    A query at position t (0-based) attends ``t + 1`` keys, so over a sequence of T tokens the mean
    is ``T / 2`` (the usual convention, dropping the ``+ 1/2``); QKᵀ costs ``2 Dh`` FLOPs per
    (query, key) pair and so does PV: ``2 * 2 * Dh * H * T / 2 = 2 T H Dh`` per token.

    A sliding window of w keys (including the query's own) caps that count at ``min(t + 1, w)``;
    with ``w' = min(w, T)`` the mean over the sequence is ``w' - w'^2 / (2 T)`` (the ramp of the
    first ``w'`` queries, then ``w'`` keys each), which is ``T / 2`` at ``w' = T`` and tends to
    ``w`` for ``T >> w``.
    """
    T = seq_len
    keys = T / 2 if window is None else (lambda w: w - w * w / (2 * T))(min(window, T))
    return 2 * 2 * keys * heads * head_dim


def diagonal_forward_flops(chunk: int, key_dim: int, value_dim: int) -> float:
    """One head of the diagonal-decay chunk form (``linear_attn``, ``simple_gla``, ``gla``;
    ``ops/common/diagonal.py``), forward, per token, chunk size C, key dim K, value dim V.

    Per chunk of C tokens:

    * phase 1, intra-chunk: the scores ``Q Kᵀ`` (C x C x K multiply-adds, of which the causal
      half is needed: ``C^2 K`` FLOPs) and the outputs ``(scores ⊙ decay) V`` (again half:
      ``C^2 V``); the chunk's contribution to the state ``ΔS = (K ⊙ decay)ᵀ V`` (``2 C K V``);
    * phase 2, the scan over chunks, ``S <- decay ⊙ S + ΔS``: elementwise, not counted;
    * phase 3, the state read ``(Q ⊙ decay) S_in`` (``2 C K V``).

    Divided by C: ``C (K + V) + 4 K V``.  GLA's per-key-dimension gates split the intra-chunk
    scores into sub-chunk blocks (real products off the diagonal, elementwise sums on it); the
    multiply-adds are the same ``C^2 K / 2`` per chunk, so the count is the same.
    """
    C, K, V = chunk, key_dim, value_dim
    return C * (K + V) + 4 * K * V


def delta_forward_flops(chunk: int, key_dim: int, value_dim: int, value_heads_per_key_head: int = 1) -> float:
    """One value head of the delta-rule chunk form (DeltaNet, Gated DeltaNet;
    ``ops/common/delta.py``), forward, per token, chunk size C, key dim K, value dim V.

    Per chunk of C tokens, with the decays (Gated DeltaNet) elementwise and not counted:

    * ``A = strictly-lower(β K Kᵀ ⊙ D)``: the causal half of a C x C x K product, ``C^2 K``;
    * ``T = (I + A)^{-1}`` by forward substitution: row i of the inverse combines, for each
      column c < i, the ``i - c`` rows between them, about ``C^3 / 6`` multiply-adds in all, i.e.
      ``C^3 / 3`` FLOPs (``C^2 / 3`` per token, the "triangular inverse" term);
    * ``W = T (β K ⊙ exp G)`` and ``U = T (β V)``: triangular times dense, ``C^2 K`` and ``C^2 V``;
    * ``P = Q Kᵀ ⊙ D``: ``C^2 K``;  ``Q_eff = Q ⊙ exp G - P W``: ``C^2 K``;  ``O_loc = P U``:
      ``C^2 V``;
    * the scan's state step ``S <- decay S + K_decᵀ (U - W S)``: ``W S`` and ``K_decᵀ (.)``,
      ``2 C K V`` each;
    * the state read ``Q_eff S_in``: ``2 C K V``.

    Divided by C: ``4 C K + 2 C V + C^2 / 3 + 6 K V``.  When several value heads share a key head
    (``gdn_num_v_heads > num_heads``) the two Gram products ``K Kᵀ`` and ``Q Kᵀ`` are computed once
    per key head, so per value head they count ``2 C K / g`` instead of ``2 C K``
    (``g = value_heads_per_key_head``); everything else is per value head.
    """
    C, K, V, g = chunk, key_dim, value_dim, value_heads_per_key_head
    gram = 2 * C * K / g                      # K Kᵀ and Q Kᵀ, causal halves, shared by g value heads
    per_value_head = 2 * C * K + 2 * C * V    # W, Q_eff (C K each); U, O_loc (C V each)
    return gram + per_value_head + C * C / 3 + 6 * K * V


def mixer_forward_flops(cfg: ModelConfig, kind: str, seq_len: int) -> float:
    """The sequence mixing of one layer of ``kind``, forward, per token (all heads); the
    projections around it are in ``matmul``.  The chunk size is ``min(cfg.chunk_size, T)``."""
    h, dh, T = cfg.num_heads, cfg.head_size, seq_len
    C = min(cfg.chunk_size, T)
    if kind == "softmax":
        return softmax_forward_flops(T, h, dh)
    if kind == "swa":
        return softmax_forward_flops(T, h, dh, cfg.window)
    if kind in ("linear_attn", "retnet", "lightning"):
        return h * diagonal_forward_flops(C, dh, dh)
    if kind == "gla":
        return h * diagonal_forward_flops(C, int(cfg.gla_expand_k * dh), dh)
    if kind == "deltanet":
        return h * delta_forward_flops(C, dh, dh)
    if kind == "gated_deltanet":
        hv = cfg.gdn_num_v_heads or h
        return hv * delta_forward_flops(C, dh, dh * cfg.gdn_expand_v, hv // h)
    raise _unsupported(kind)


def train_flops_per_token(cfg: ModelConfig, seq_len: int) -> dict[str, Any]:
    """Model FLOPs of one training step per token at sequence length ``seq_len``.

    Returns ``{"matmul", "mixer", "total"}`` (training: 3x forward), ``"forward"`` (the forward
    total), ``"mixer_by_kind"`` (training FLOPs of the mixing summed over the layers of each kind)
    and ``"matmul_weights"`` (the weight count behind ``matmul = 6 x weights``).

    >>> cfg = ModelConfig(d_model=64, num_layers=2, pattern="S", num_heads=2, vocab_size=100)
    >>> f = train_flops_per_token(cfg, 128)
    >>> f["mixer"] == 3 * 2 * (2 * 128 * 2 * 32)          # 3 passes x 2 layers x 2 T H Dh
    True
    """
    weights = matmul_weight_count(cfg)
    by_kind: dict[str, float] = {}
    for kind in cfg.layer_kinds:
        by_kind[kind] = by_kind.get(kind, 0.0) + TRAIN_MULTIPLIER * mixer_forward_flops(cfg, kind, seq_len)
    matmul = TRAIN_MULTIPLIER * 2 * weights
    mixer = sum(by_kind.values())
    return {"matmul": float(matmul), "mixer": float(mixer), "total": float(matmul + mixer),
            "forward": float(matmul + mixer) / TRAIN_MULTIPLIER, "mixer_by_kind": by_kind,
            "matmul_weights": weights, "seq_len": seq_len}


def abstract_model(cfg: ModelConfig) -> LanguageModel:
    """The model with ``jax.ShapeDtypeStruct`` leaves (``nnx.eval_shape``: nothing allocated)."""
    return nnx.eval_shape(lambda: LanguageModel(cfg, nnx.Rngs(0)))


def param_count(cfg: ModelConfig) -> int:
    """Trainable parameter values of ``LanguageModel(cfg)`` (tied embeddings once), counted on
    the abstract model, so a 350M-parameter config costs no memory.

    >>> param_count(ModelConfig(d_model=32, num_layers=2, pattern="S", num_heads=2, vocab_size=100))
    33184
    """
    return count_params(abstract_model(cfg))


def count_params(model) -> int:
    """Parameter values of a model, concrete or abstract (``nnx.Param`` leaves' sizes)."""
    return sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
