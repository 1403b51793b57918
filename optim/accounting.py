"""Exact optimizer-state accounting through ``jax.eval_shape`` (nothing is allocated).

Example:
  >>> import jax, jax.numpy as jnp
  >>> from lolax import optim
  >>> params = {'attn': {'q_proj': {'kernel': jax.ShapeDtypeStruct((64, 128), jnp.float32)}},
  ...           'norm': {'scale': jax.ShapeDtypeStruct((64,), jnp.float32)}}
  >>> b = optim.state_bytes(optim.galore(1e-2, rank=8), params)
  >>> b['lowrank/mu']['values'], b['lowrank/projector']['values'], b['adam/mu']['values']
  (1024, 512, 64)
  >>> print(optim.format_state_bytes(b))  # doctest: +SKIP
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
import optax

STATE_FIELDS = ("mu", "nu", "projector", "history", "prev_norm", "key", "count", "moment_count")


def _component(path) -> str:
    branch, field = None, None
    for i, k in enumerate(path):
        prev = path[i - 1] if i else None
        if (isinstance(k, jax.tree_util.DictKey) and isinstance(prev, jax.tree_util.GetAttrKey)
            and prev.name == "inner_states"):
            branch = str(k.key)
        if isinstance(k, jax.tree_util.GetAttrKey) and k.name in STATE_FIELDS:
            field = k.name
    field = field or "other"
    if field in ("count", "moment_count"):
        field = "count"
    return f"{branch}/{field}" if branch else field


def state_bytes(tx: optax.GradientTransformation, params: Any) -> dict[str, Any]:
    """Bytes and values of ``tx.init(params)``, by component, without allocating.

    ``params`` may hold arrays or ``jax.ShapeDtypeStruct``s. Components are
    ``'<branch>/<field>'`` (branch ``lowrank``/``adam`` of the
    ``optax.partition`` used by every low-rank alias of :mod:`optim`; field
    ``mu``, ``nu``, ``projector``, ``history``, ``prev_norm``, ``key``,
    ``count``); a transformation without a partition, such as ``optim.adamw``
    (``optax.adamw``), gives the bare fields ``mu``, ``nu``, ``count``. Returns
    ``{component: {'bytes', 'values', 'leaves'}, 'total': {...}}``.
    """
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), params)
    state = jax.eval_shape(tx.init, abstract)
    out: dict[str, dict[str, int]] = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
        c = _component(path)
        size = int(np.prod(leaf.shape))
        d = out.setdefault(c, {"bytes": 0, "values": 0, "leaves": 0})
        d["bytes"] += size * np.dtype(leaf.dtype).itemsize
        d["values"] += size
        d["leaves"] += 1
    out = dict(sorted(out.items()))
    out["total"] = {k: sum(v[k] for v in out.values()) for k in ("bytes", "values", "leaves")}
    return out


def param_bytes(params: Any) -> int:
    """Total bytes of a pytree of arrays / ShapeDtypeStructs."""
    return int(sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize
                   for x in jax.tree.leaves(params)))


def _human(b: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if b < 1024 or unit == "GiB":
            return f"{b:.2f} {unit}" if unit != "B" else f"{int(b)} B"
        b /= 1024


def format_state_bytes(breakdown: dict[str, Any]) -> str:
    """A small fixed-width table of :func:`state_bytes` output, for logs."""
    lines = [f"{'component':<20}{'values':>16}{'bytes':>14}"]
    for k, v in breakdown.items():
        if k == "total":
            continue
        lines.append(f"{k:<20}{v['values']:>16,}{_human(v['bytes']):>14}")
    t = breakdown["total"]
    lines.append(f"{'total':<20}{t['values']:>16,}{_human(t['bytes']):>14}")
    return "\n".join(lines)


# LLaMA shapes of the GaLore and APOLLO papers' pre-training runs: (hidden, ffn, heads, layers)
# and the rank each paper uses at that size.
LLAMA_CONFIGS = {
    "60M": dict(hidden=512, ffn=1376, heads=8, layers=8, galore_rank=128, apollo_rank=128),
    "130M": dict(hidden=768, ffn=2048, heads=12, layers=12, galore_rank=256, apollo_rank=192),
    "350M": dict(hidden=1024, ffn=2736, heads=16, layers=24, galore_rank=256, apollo_rank=256),
    "1B": dict(hidden=2048, ffn=5461, heads=32, layers=24, galore_rank=512, apollo_rank=512),
    "7B": dict(hidden=4096, ffn=11008, heads=32, layers=32, galore_rank=1024, apollo_rank=256),
}


def llama_abstract_params(hidden: int, ffn: int, layers: int, vocab: int = 32000,
                          dtype=np.float32, sltrain_rank: int = 0, sltrain_density: float = 0.03, **_) -> dict:
    """ShapeDtypeStructs of a LLaMA with untied embeddings, Flax ``(in, out)`` kernels and
    the module names of :mod:`models` (``attn.q_proj``, ``mlp.gate_proj``, ...).

    With ``sltrain_rank > 0`` every attention / MLP projection ``(m, n)`` with ``min(m, n) >
    sltrain_rank`` holds the leaves of an SLTrain layer (``models/sltrain.py``) instead of its
    kernel: ``lora_a (m, r)``, ``lora_b (r, n)`` and ``sparse_values (round(density m n),)``;
    the embedding, norms and head stay as they are.

    >>> p = llama_abstract_params(hidden=64, ffn=128, layers=1, vocab=10, sltrain_rank=8)
    >>> {k: v.shape for k, v in p["layers"]["layers_0"]["mlp"]["up_proj"].items()}
    {'lora_a': (64, 8), 'lora_b': (8, 128), 'sparse_values': (246,)}
    """
    s = lambda *shape: jax.ShapeDtypeStruct(shape, dtype)

    def proj(m, n):
        if not 0 < sltrain_rank < min(m, n):
            return {"kernel": s(m, n)}
        # the count of models.sltrain.sltrain_nnz (optim does not import models)
        nnz = max(1, round(sltrain_density * m * n))
        return {"lora_a": s(m, sltrain_rank), "lora_b": s(sltrain_rank, n), "sparse_values": s(nnz)}

    layer = lambda: {
        "attn": {n: proj(hidden, hidden) for n in ("q_proj", "k_proj", "v_proj", "o_proj")},
        "mlp": {"gate_proj": proj(hidden, ffn), "up_proj": proj(hidden, ffn),
                "down_proj": proj(ffn, hidden)},
        "attn_norm": {"scale": s(hidden)}, "mlp_norm": {"scale": s(hidden)},
    }
    return {"embed": {"embedding": s(vocab, hidden)},
            "layers": {f"layers_{i}": layer() for i in range(layers)},
            "norm": {"scale": s(hidden)},
            "lm_head": {"kernel": s(hidden, vocab)}}
