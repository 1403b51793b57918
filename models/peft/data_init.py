"""Adapters initialised from data: EVA and LoRA-SB.

Both read at most ``peft.init_batches`` batches of ``data`` through the frozen model, via
``loss_fn(model, batch)`` (``peft.apply``'s ``loss_fn``, next-token cross-entropy by default),
once, inside :func:`lolax.models.peft.apply`; ``loss_fn`` runs under ``jax.jit`` there, so it
must be traceable. Both leave the model exactly unchanged at initialisation (by default) and
merge exactly.

``eva`` (explained variance adaptation)
    A LoRA (``lora_a [in, r_l]``, ``lora_b [r_l, out] = 0``) whose ``lora_a`` holds the top
    right-singular vectors of the layer's *inputs*, so the first updates of ``lora_b`` act on the
    directions in which the inputs vary most. Each layer keeps a running truncated SVD of its
    inputs ``X [tokens, in]`` (no centering): with ``cap = min(floor(eva_rho * rank), in, out)``
    components ``(S, Vt)``, a new batch updates them to the top ``cap`` of
    ``svd(concat([diag(S) Vt, X]))``. A layer stops reading once each of its ``cap`` components
    has ``|cos| >= eva_threshold`` with the same component one batch earlier (so never after
    its first batch); reading stops when every layer has stopped or ``init_batches`` are read.
    The ranks are then redistributed: of the ``rank * layers`` budget, every layer gets its
    first component, and the rest go to the components with the largest explained-variance
    ratios ``sigma_i^2 / sum(X^2)`` (over the inputs the layer read), pooled over all layers,
    at most ``cap`` per layer. ``lora_a`` and ``lora_b`` are then rebuilt with the layer's rank
    ``r_l`` (``layer.rank``); ``layer.eva_batches`` is how many batches it read and
    ``layer.eva_explained`` the share of its input's energy its ``r_l`` directions hold.
    The inputs are recorded while ``loss_fn`` is traced, so a target layer must not run inside
    a transform of its own (``jax.checkpoint``, ``lax.scan``); a language model's ``remat`` is
    switched off for the capture (nothing is differentiated there).
    Trainable values per layer: ``r_l * (in + out)``.

    Scaling: ``alpha / peft.rank`` for every layer, whatever ``r_l`` (our choice). With
    ``alpha / r_l`` a layer cut to rank 1 would update its direction ``rank`` times faster than
    a uniform LoRA, and one grown to ``cap`` more slowly; keeping the uniform LoRA's factor
    leaves the step size per direction independent of the redistribution.

``lora_sb`` (LoRA-SB)
    ``dW = sb_in @ sb_core @ sb_out`` with ``sb_in [in, r]`` and ``sb_out [r, out]`` frozen
    (:class:`~lolax.models.peft.AdapterBuffer`) and only ``sb_core [r, r]`` trainable, so a layer
    trains ``r * r`` values. The kernel gradient ``G [in, out]`` of ``loss_fn``, averaged over
    the batches read, is factored as ``-G ~ U_r diag(S_r) V_r^T``; ``sb_in = U_r``,
    ``sb_out = V_r^T`` and ``sb_core = lora_sb_init_step * diag(S_r)``. With the default step 0
    the model is unchanged; with a step ``eta > 0`` the adapter starts at
    ``-eta * (rank-r truncation of G)``, the best rank-``r`` approximation of one plain gradient
    step of size ``eta`` on the full kernels. No ``alpha`` scaling.

How this module departs from the two papers
-------------------------------------------
*EVA*: the paper streams minibatches of activation vectors through an incremental SVD, checks
convergence by the cosine similarity of successive estimates and redistributes a rank budget by
explained variance, as here. Computed as an incremental PCA, the decomposition would subtract a
running mean and measure explained variance about it; here the raw inputs are decomposed
without centering and the ratio is relative to their raw sum of squares, so a large mean input
shows up as a leading direction. Every position of a batch counts (no padding mask: the capture
sees the layer's input, not the batch). Convergence is checked on all ``cap`` candidate
components of a layer, not only on the ones it ends up with. The scaling of the redistributed
ranks (``alpha / peft.rank`` throughout) is our choice.

*LoRA-SB*: the paper uses the fixed-``B``, trainable ``r x r`` core, fixed-``A`` architecture of
LoRA-XS and initialises it from the truncated SVD of an estimate of the first full fine-tuning
*update*: gradients accumulated over a sample of the training set, passed through the
optimizer's first step (for Adam-type optimizers not simply proportional to the gradient) and
multiplied by the learning rate, so the adapted model starts already moved by that approximate
step. Here the factors come from the plain averaged gradient (the direction of an SGD step, no
optimizer transform), and the core starts at 0 unless ``peft.lora_sb_init_step > 0``, which
reproduces the paper's "start one step in" for an SGD step of that size. The bases depend only
on the direction of ``-G``, so they are the same for every step size.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import itertools
import math
from typing import Any, Iterable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .config import PeftConfig
from .core import AdaptedLinear, register
from .lora import LoRA

_CAPTURE = contextvars.ContextVar("lolax_peft_eva_capture", default=None)


def _batches(data: Iterable, limit: int, method: str):
    """At most ``limit`` batches of ``data`` (lazily); ValueError if ``data`` is None."""
    if data is None:
        raise ValueError(f"peft.method = {method!r} initialises from data: pass data= (batches)")
    return itertools.islice(iter(data), limit)


@contextlib.contextmanager
def _capturing(record: dict):
    token = _CAPTURE.set(record)
    try:
        yield
    finally:
        _CAPTURE.reset(token)


@contextlib.contextmanager
def _without_remat(model: nnx.Module):
    """Runs ``model`` without ``config.remat`` (a language model's checkpointing) meanwhile: the
    capture records each layer's input while tracing, which a ``jax.checkpoint`` around the
    layer would hide. Only the forward pass runs, so remat would not save anything anyway."""
    cfg = getattr(model, "config", None)
    if not (dataclasses.is_dataclass(cfg) and getattr(cfg, "remat", "none") != "none"):
        yield
        return
    model.config = dataclasses.replace(cfg, remat="none")
    try:
        yield
    finally:
        model.config = cfg


def _svd(m: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    return jnp.linalg.svd(m.astype(jnp.float32), full_matrices=False)


def allocate_ranks(ratios: list[np.ndarray], budget: int) -> list[int]:
    """EVA's rank redistribution: ``ratios[l]`` are layer ``l``'s candidate explained-variance
    ratios (in decreasing order, as many as it may take); every layer gets its first one and
    the remaining ``budget - layers`` go to the largest ratios pooled over the layers (ties:
    earlier layer, then earlier component). Fewer than ``budget`` in all only if the layers
    hold fewer candidates than that.

    >>> allocate_ranks([np.array([0.7, 0.2, 0.1]), np.array([0.25, 0.25, 0.25, 0.25])], 4)
    [1, 3]
    """
    ranks = [min(1, len(r)) for r in ratios]
    pool = [(-float(r[i]), layer, i) for layer, r in enumerate(ratios) for i in range(1, len(r))]
    pool.sort()
    for _, layer, _ in pool[:max(0, budget - sum(ranks))]:
        ranks[layer] += 1
    return ranks


@register
class EVA(LoRA):
    """LoRA with ``lora_a`` = the top right-singular vectors of the layer's inputs and a rank
    per layer chosen by explained variance (see the module docstring). Scaling ``alpha / rank``
    with ``rank = peft.rank`` for every layer."""

    method = "eva"
    needs_data = True

    def __init__(self, base: nnx.Linear, cfg: PeftConfig, rngs: nnx.Rngs, layer_id: int, path: str):
        super().__init__(base, cfg, rngs, layer_id, path)
        self.eva_batches = 0
        self.eva_explained = 0.0

    def __call__(self, x: jax.Array) -> jax.Array:
        record = _CAPTURE.get()
        if record is not None:
            record.setdefault(self.layer_id, []).append(jnp.reshape(x, (-1, self.in_features)))
        return super().__call__(x)

    def set_components(self, vt: jax.Array) -> None:
        """Sets ``lora_a = vt.T [in, r_l]``, ``lora_b = 0 [r_l, out]`` and ``rank = r_l``."""
        r = int(vt.shape[0])
        self.lora_a = self.adapter_param(jnp.transpose(vt), self.in_name, "lora_rank")
        self.lora_b = self.adapter_param(jnp.zeros((r, self.out_features)), "lora_rank", self.out_name)
        self.rank = r

    @classmethod
    def initialize(cls, model: nnx.Module, layers: list[AdaptedLinear], cfg: PeftConfig,
                   data: Any, loss_fn) -> None:
        batches = _batches(data, cfg.init_batches, cls.method)
        caps = {l.layer_id: min(math.floor(cfg.eva_rho * cfg.rank), l.in_features, l.out_features)
                for l in layers}
        by_id = {l.layer_id: l for l in layers}

        def update(graphdef, state, batch, svd_state, active):
            record: dict[int, list[jax.Array]] = {}
            with _capturing(record):
                loss_fn(nnx.merge(graphdef, state), batch)
            missing = sorted(by_id[i].path for i in svd_state if i not in record)
            if missing:
                raise ValueError(f"eva: loss_fn(model, batch) never called the target layer(s) {missing}")
            out = {}
            for i, (s, vt, sumsq) in svd_state.items():
                x = jnp.concatenate(record[i], axis=0).astype(jnp.float32)
                cap = caps[i]

                def step(_, s=s, vt=vt, sumsq=sumsq, x=x, cap=cap):
                    _, s_new, vt_new = _svd(jnp.concatenate([s[:, None] * vt, x], axis=0))
                    s_new, vt_new = s_new[:cap], vt_new[:cap]
                    cos = jnp.abs(jnp.sum(vt_new * vt, axis=1))
                    return s_new, vt_new, sumsq + jnp.sum(jnp.square(x)), cos

                def keep(_, s=s, vt=vt, sumsq=sumsq):
                    return s, vt, sumsq, jnp.ones_like(s)

                out[i] = jax.lax.cond(active[i], step, keep, None) + (x.shape[0],)
            return out

        run = jax.jit(update, static_argnums=0)
        svd_state = {i: (jnp.zeros((caps[i],)), jnp.zeros((caps[i], by_id[i].in_features)), jnp.zeros(()))
                     for i in by_id}
        active = {i: True for i in by_id}
        rows = {i: 0 for i in by_id}
        read = 0
        with _without_remat(model):
            graphdef, state = nnx.split(model)
            for batch in batches:
                try:
                    out = run(graphdef, state, batch, svd_state, {i: jnp.asarray(a) for i, a in active.items()})
                except jax.errors.UnexpectedTracerError as e:
                    raise ValueError("eva: a target layer runs inside a JAX transform (scan, checkpoint) "
                                     "of loss_fn, so its inputs cannot be captured; run the model "
                                     "without it for the initialisation") from e
                read += 1
                for i in by_id:
                    s, vt, sumsq, cos, n = out[i]
                    svd_state[i] = (s, vt, sumsq)
                    if not active[i]:
                        continue
                    rows[i] += int(n)
                    by_id[i].eva_batches = read
                    if rows[i] >= caps[i] and read > 1 and bool(jnp.all(cos >= cfg.eva_threshold)):
                        active[i] = False
                if not any(active.values()):
                    break
        if read == 0:
            raise ValueError("peft.method = 'eva': data gave no batches")

        ratios = []
        for i in by_id:
            s, _, sumsq = (np.asarray(a, np.float64) for a in svd_state[i])
            k = min(caps[i], rows[i])
            ratios.append(np.square(s[:k]) / sumsq if sumsq > 0 else np.zeros(k))
        ranks = allocate_ranks(ratios, cfg.rank * len(by_id))
        for (i, layer), r, ratio in zip(by_id.items(), ranks, ratios):
            layer.set_components(svd_state[i][1][:r])
            layer.eva_explained = float(np.sum(ratio[:r]))


@register
class LoRASB(AdaptedLinear):
    """``y = x W0 + b + x sb_in sb_core sb_out``: frozen gradient bases around a trainable
    ``r x r`` core (see the module docstring)."""

    method = "lora_sb"
    needs_data = True

    def __init__(self, base: nnx.Linear, cfg: PeftConfig, rngs: nnx.Rngs, layer_id: int, path: str):
        super().__init__(base, cfg, rngs, layer_id, path)
        r = cfg.rank
        self.sb_in = self.buffer(jnp.zeros((self.in_features, r)), self.in_name, "lora_rank")
        self.sb_out = self.buffer(jnp.zeros((r, self.out_features)), "lora_rank", self.out_name)
        self.sb_core = self.adapter_param(jnp.zeros((r, r)), "lora_rank", "lora_rank")
        self.sb_batches = 0

    def delta(self) -> jax.Array:
        return self.sb_in[...] @ self.sb_core[...] @ self.sb_out[...]

    def adapter(self, x: jax.Array) -> jax.Array:
        b, core, a = (v[...].astype(x.dtype) for v in (self.sb_in, self.sb_core, self.sb_out))
        return ((x @ b) @ core) @ a

    @classmethod
    def initialize(cls, model: nnx.Module, layers: list[AdaptedLinear], cfg: PeftConfig,
                   data: Any, loss_fn) -> None:
        batches = _batches(data, cfg.init_batches, cls.method)
        wanted = {id(l) for l in layers}
        kernel_paths = {tuple(path) + ("kernel",): layer for path, layer in nnx.iter_modules(model)
                        if id(layer) in wanted}

        def is_target_kernel(path, _value) -> bool:
            return tuple(path) in kernel_paths

        grad_fn = nnx.jit(nnx.grad(loss_fn, argnums=nnx.DiffState(0, is_target_kernel)))
        total = None
        read = 0
        for batch in batches:
            grads = {tuple(p): jnp.asarray(v[...] if isinstance(v, nnx.Variable) else v, jnp.float32)
                     for p, v in nnx.to_flat_state(grad_fn(model, batch))}
            total = grads if total is None else {p: total[p] + g for p, g in grads.items()}
            read += 1
        if read == 0:
            raise ValueError("peft.method = 'lora_sb': data gave no batches")
        for path, layer in kernel_paths.items():
            u, s, vt = _svd(-total[path] / read)
            r = layer.rank
            layer.sb_in = layer.buffer(u[:, :r], layer.in_name, "lora_rank")
            layer.sb_out = layer.buffer(vt[:r], "lora_rank", layer.out_name)
            layer.sb_core = layer.adapter_param(cfg.lora_sb_init_step * jnp.diag(s[:r]), "lora_rank", "lora_rank")
            layer.sb_batches = read
