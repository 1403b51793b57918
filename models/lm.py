"""Decoder-only language model whose per-layer mixer comes from the config's layer pattern."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import checkify

from ..ops.common.checks import is_concrete
from .config import ModelConfig
from .layers import RMSNorm, SwiGLU, dense, dtypes, logical, sltrain
from .mixers import MIXERS
from .mixers.base import default_positions


def check_token_ids(name: str, tokens: jax.Array | np.ndarray, vocab_size: int,
                    valid: jax.Array | np.ndarray | None = None) -> None:
    """Every id of ``tokens`` (where ``valid`` is True, when given) must lie in ``[0, vocab_size)``.

    Out of range, the embedding lookup would return NaN rows (ids >= vocab_size) or silently wrap
    around (negative ids).  Concrete ids are checked here and raise a ``ValueError`` naming ``name``;
    traced ids (under ``jit``, ``vmap``, ``scan``, ``grad``) get a ``checkify.debug_check``, which
    compiles to nothing unless the caller wraps the traced function with
    ``jax.experimental.checkify.checkify`` (docs/models.md, "Checking token ids").

    >>> check_token_ids("tokens", np.array([[0, 5, 9]]), 10)
    >>> check_token_ids("tokens", np.array([[0, 10, -1]]), 10)
    Traceback (most recent call last):
    ValueError: tokens must be token ids in [0, vocab_size) = [0, 10), got min -1 and max 10
    """
    dtype = tokens.dtype if hasattr(tokens, "dtype") else np.asarray(tokens).dtype
    if not jnp.issubdtype(dtype, jnp.integer):
        raise ValueError(f"{name} must be an integer array of token ids, got dtype {dtype}")
    expected = f"token ids in [0, vocab_size) = [0, {vocab_size})"
    if is_concrete(tokens) and (valid is None or is_concrete(valid)):
        ids = np.asarray(tokens)
        if valid is not None:
            ids = ids[np.broadcast_to(np.asarray(valid, bool), ids.shape)]
        if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
            raise ValueError(f"{name} must be {expected}, got min {ids.min()} and max {ids.max()}")
        return
    ids = jnp.asarray(tokens)
    if ids.size == 0:
        return
    info = jnp.iinfo(ids.dtype)
    lo = ids.min() if valid is None else jnp.where(valid, ids, info.max).min()
    hi = ids.max() if valid is None else jnp.where(valid, ids, info.min).max()
    checkify.debug_check((lo >= 0) & (hi < vocab_size), f"{name} must be {expected}, got min {{lo}} and max {{hi}}",
                         lo=lo, hi=hi)


class Block(nnx.Module):
    """Pre-norm residual block: ``x + attn(attn_norm(x))`` then ``x + mlp(mlp_norm(x))``."""

    def __init__(self, cfg: ModelConfig, kind: str, rngs: nnx.Rngs, layer_idx: int = 0):
        self.kind = kind
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = MIXERS[kind](cfg, rngs, layer_idx)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = SwiGLU(cfg.d_model, cfg.hidden_size, rngs)

    def forward(self, x, positions, mask=None, cu_seqlens=None):
        y, aux = self.attn.forward(self.attn_norm(x), positions, mask=mask, cu_seqlens=cu_seqlens)
        x = x + y
        return x + self.mlp(self.mlp_norm(x)), aux

    def __call__(self, x, positions=None, *, mask=None, cu_seqlens=None):
        return self.forward(x, positions, mask, cu_seqlens)[0]

    def prefill(self, x, positions, mask, max_len):
        y, cache = self.attn.prefill(self.attn_norm(x), positions, mask=mask, max_len=max_len)
        x = x + y
        return x + self.mlp(self.mlp_norm(x)), cache

    def step(self, x, cache, positions, index):
        y, cache = self.attn.step(self.attn_norm(x), cache, positions=positions, index=index)
        x = x + y
        return x + self.mlp(self.mlp_norm(x)), cache


REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}
"""``model.remat`` -> what the backward pass keeps from the forward of each layer (or scanned
repeat): ``none`` keeps everything autodiff saves, ``full`` keeps only the layer's input and
recomputes the rest, ``dots`` keeps the outputs of the weight matmuls (the products without a
batch dimension) and recomputes the cheap elementwise work around them."""


class LayerGroup(nnx.Module):
    """One repeat of the layer pattern: ``len(pattern)`` blocks, the unit a scanned model stacks."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, first_layer: int):
        kinds = cfg.layer_kinds[first_layer:first_layer + cfg.pattern_length]
        self.blocks = nnx.List([Block(cfg, kind, rngs, first_layer + i) for i, kind in enumerate(kinds)])

    def forward(self, x, positions, mask=None, cu_seqlens=None):
        aux = jnp.zeros((), jnp.float32)
        for block in self.blocks:
            x, block_aux = block.forward(x, positions, mask, cu_seqlens)
            aux = aux + block_aux
        return x, aux


def stack_modules(modules: list[nnx.Module], what: str) -> nnx.Module:
    """Modules of one structure -> one module whose arrays gain a leading axis (logical ``layers``)."""
    graphdefs, states = zip(*(nnx.split(m) for m in modules))
    if any(g != graphdefs[0] for g in graphdefs[1:]):
        raise ValueError(f"model.scan_layers = True needs every repeat of the pattern to have the same "
                         f"structure and static settings, but the {what} differ; set model.scan_layers = False")
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *states)
    for _, var in nnx.to_flat_state(stacked):
        names = var.get_metadata().get("out_sharding")
        if names is not None:
            var.set_metadata(out_sharding=("layers",) + tuple(names))
    return nnx.merge(graphdefs[0], stacked)


def _with_remat(fn, policy: str):
    """``fn(state, *args)`` under ``model.remat``'s checkpoint policy."""
    if policy == "none":
        return fn
    return jax.checkpoint(fn, policy=REMAT_POLICIES[policy], prevent_cse=False)


class LanguageModel(nnx.Module):
    """Embedding, a stack of mixer blocks, a final RMSNorm and an output head (tied optionally).

    ``model.dtype`` is the compute dtype of every projection and of the residual stream,
    ``model.param_dtype`` the dtype the parameters are stored in; norms, gates, the sequence ops'
    internals and the logits are float32 whatever the compute dtype.  With
    ``model.scan_layers`` the ``num_layers / len(pattern)`` repeats of the pattern are stacked
    (``self.stack``: one :class:`LayerGroup` whose arrays lead with the repeat axis, logical name
    ``layers``) and run under one ``lax.scan``, so compile time does not grow with depth;
    otherwise ``self.layers`` holds the blocks.  Both build the same parameters from the same
    seed.  ``model.remat`` recomputes each layer (or repeat) in the backward pass.  With
    ``model.sltrain_rank > 0`` every projection of the blocks whose sides both exceed the rank is an
    SLTrain layer (:mod:`lolax.models.sltrain`); the embedding and the output head stay dense.

    >>> from flax import nnx
    >>> import jax.numpy as jnp
    >>> model = LanguageModel(ModelConfig(d_model=32, num_layers=2, pattern="LS", num_heads=2), nnx.Rngs(0))
    >>> model(jnp.zeros((1, 10), jnp.int32)).shape
    (1, 10, 256)
    >>> scanned = LanguageModel(ModelConfig(d_model=32, num_layers=4, pattern="LS", num_heads=2,
    ...                                     scan_layers=True, dtype="bfloat16"), nnx.Rngs(0))
    >>> scanned.stack.blocks[0].attn.q_proj.kernel.shape     # [repeats, d_model, heads * head_dim]
    (2, 32, 32)
    >>> scanned(jnp.zeros((1, 10), jnp.int32)).dtype
    dtype('float32')
    """

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.config = cfg
        with dtypes(cfg.compute_dtype, cfg.params_dtype):
            self.embed = nnx.Embed(cfg.vocab_size, cfg.d_model,
                                   embedding_init=logical(nnx.initializers.normal(0.02), "vocab", "embed"),
                                   dtype=cfg.compute_dtype, param_dtype=cfg.params_dtype, rngs=rngs)
            # SLTrain (model.sltrain_rank > 0) re-parameterises the blocks' projections only.
            with sltrain(cfg.sltrain_rank, cfg.sltrain_density, cfg.sltrain_alpha, seed=0):
                if cfg.scan_layers:
                    p = cfg.pattern_length
                    groups = [LayerGroup(cfg, rngs, r * p) for r in range(cfg.num_layers // p)]
                    self.stack = stack_modules(groups, "layer groups")
                else:
                    self.layers = nnx.List([Block(cfg, kind, rngs, i) for i, kind in enumerate(cfg.layer_kinds)])
            self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
            self.lm_head = None if cfg.tie_embeddings else dense(
                cfg.d_model, cfg.vocab_size, ("embed", "vocab"), rngs, init=nnx.initializers.normal(0.02))

    def _logits(self, x):
        x = self.norm(x)
        if self.lm_head is None:
            return self.embed.attend(x).astype(jnp.float32)
        return self.lm_head(x).astype(jnp.float32)

    def blocks(self) -> list[Block]:
        """The blocks in depth order (for a scanned model, views of one repeat's slice each)."""
        if not self.config.scan_layers:
            return list(self.layers)
        graphdef, state = nnx.split(self.stack)
        repeats = self.config.num_layers // self.config.pattern_length
        out = []
        for r in range(repeats):
            group = nnx.merge(graphdef, jax.tree.map(lambda a, r=r: a[r], state))
            out.extend(group.blocks)
        return out

    def _run_layers(self, x, positions, mask, cu_seqlens):
        cfg = self.config

        def run(state, graphdef, x):
            return nnx.merge(graphdef, state).forward(x, positions, mask, cu_seqlens)

        aux = jnp.zeros((), jnp.float32)
        if cfg.scan_layers:
            graphdef, stacked = nnx.split(self.stack)
            group = _with_remat(lambda state, x: run(state, graphdef, x), cfg.remat)

            def body(carry, state):
                x, aux = carry
                x, group_aux = group(state, x)
                return (x, aux + group_aux), None

            (x, aux), _ = jax.lax.scan(body, (x, aux), stacked)
            return x, aux
        for layer in self.layers:
            if cfg.remat == "none":
                x, layer_aux = layer.forward(x, positions, mask, cu_seqlens)
            else:
                graphdef, state = nnx.split(layer)
                x, layer_aux = _with_remat(lambda state, x, g=graphdef: run(state, g, x), cfg.remat)(state, x)
            aux = aux + layer_aux
        return x, aux

    def __call__(self, tokens: jax.Array, positions: jax.Array | None = None, *, mask=None,
                 cu_seqlens=None, return_aux: bool = False):
        """``tokens [B, T]`` int -> float32 logits ``[B, T, vocab]``.

        ``mask [B, T]`` bool marks real tokens in a padded batch; ``cu_seqlens [N + 1]`` packs N
        sequences into one row (B == 1).  Positions default to 0.. per sequence (counting only
        real tokens).  With ``return_aux=True`` returns ``(logits, aux_loss)``: the weighted sum
        of the layers' auxiliary losses (MoM load balancing; 0 otherwise), to add to the loss.

        Every id must lie in ``[0, vocab_size)``: concrete ``tokens`` outside raise a ``ValueError``;
        traced ones are checked only under ``checkify.checkify`` (see :func:`check_token_ids`).
        """
        check_token_ids("tokens", tokens, self.config.vocab_size)
        x, aux = self._run_layers(self.embed(tokens), positions, mask, cu_seqlens)
        logits = self._logits(x)
        return (logits, aux) if return_aux else logits

    def aux_loss(self, tokens, positions=None, *, mask=None, cu_seqlens=None) -> jax.Array:
        """The auxiliary loss alone (runs the forward pass; prefer ``return_aux=True``)."""
        return self(tokens, positions, mask=mask, cu_seqlens=cu_seqlens, return_aux=True)[1]

    def prefill(self, tokens: jax.Array, *, mask=None, max_len: int):
        """Runs the prompt ``tokens [B, P]`` (left-padded; ``mask`` marks real tokens) with the
        chunk ops and returns ``(logits [B, P, V], caches)`` for decoding up to ``max_len`` slots."""
        check_token_ids("tokens", tokens, self.config.vocab_size)
        b, p = tokens.shape
        valid = None if mask is None else jnp.asarray(mask, bool)
        positions = default_positions(b, p, valid)
        x = self.embed(tokens)
        caches = []
        for layer in self.blocks():
            x, cache = layer.prefill(x, positions, valid, max_len)
            caches.append(cache)
        return self._logits(x), caches

    def decode_step(self, token: jax.Array, caches, *, positions: jax.Array, index):
        """One token per row ``token [B]`` at ``positions [B]`` (slot ``index`` of the shared
        timeline) -> ``(logits [B, V], caches)``."""
        check_token_ids("token", token, self.config.vocab_size)
        x = self.embed(token[:, None])
        pos = positions[:, None]
        new = []
        for layer, cache in zip(self.blocks(), caches):
            x, cache = layer.step(x, cache, pos, index)
            new.append(cache)
        return self._logits(x)[:, 0], new


def count_params(model: nnx.Module) -> int:
    """Number of trainable parameter values (tied embeddings counted once)."""
    return sum(int(x.size) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
