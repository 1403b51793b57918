"""Named model presets: one per mixer family plus a few hybrids.

A preset fixes the layer pattern and the family's options; sizes (``d_model``, ``num_layers``,
``num_heads``, ...) stay those of the job config.  Use them from the training script with

    python -m experiments.train --config.model.preset=gdn [--config.model.d_model=256 ...]

which calls ``apply_preset(config.model.to_dict(), base=<the job's default model dict>)`` before
``ModelConfig.from_dict``: preset values replace the defaults, while keys changed on the command
line (differing from ``base``) win over the preset.  With ``base=None`` the preset wins outright.
"""

from __future__ import annotations

from typing import Any, Mapping

PRESETS: dict[str, dict[str, Any]] = {
    # single families
    "transformer": {"pattern": "S"},
    "swa": {"pattern": "W", "window": 64},
    "linear_attn": {"pattern": "L", "feature_map": "elu_plus_one"},
    "hedgehog": {"pattern": "H", "hedgehog_form": "fla"},
    "based": {"pattern": "BW", "based_feature_dim": 16, "window": 64},   # Taylor linear + SWA layers
    "retnet": {"pattern": "R"},
    "lightning": {"pattern": "N", "lightning_decay": "alibi_slopes"},
    "gla": {"pattern": "G", "gla_expand_k": 0.5, "gla_gate_rank": 16, "gla_gate_normalizer": 16.0},
    "deltanet": {"pattern": "D", "conv_size": 4},
    "gdn": {"pattern": "E", "conv_size": 4, "gdn_expand_v": 1},
    "gdn_neg": {"pattern": "E", "conv_size": 4, "allow_neg_eigval": True},
    "mom": {"pattern": "M", "mom_num_memories": 4, "mom_topk": 2, "mom_shared_memory": True,
            "aux_loss_weight": 0.01},
    # hybrids (one softmax / window layer in four or two)
    "llls": {"pattern": "LLLS"},
    "gdn_hybrid": {"pattern": "EEES", "conv_size": 4},
    "gla_hybrid": {"pattern": "GGGS"},
    "gdn_swa": {"pattern": "EW", "conv_size": 4, "window": 64},
}


def apply_preset(model: Mapping[str, Any], base: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Returns ``model`` with its ``preset`` key (if any, and not empty) expanded and removed."""
    values = dict(model)
    name = values.pop("preset", None)
    if not name:
        return values
    if name not in PRESETS:
        raise ValueError(f"model.preset = {name!r} is not a preset; known: {sorted(PRESETS)}")
    for key, value in PRESETS[name].items():
        if base is None or key not in values or values[key] == base.get(key):
            values[key] = value
    return values
