"""Orbax checkpoints of the train state plus the data iterator's position.

Orbax writes each step to a temporary folder and renames it when complete, so a run killed
mid-save keeps its previous checkpoints intact and resumes from the newest complete one.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import orbax.checkpoint as ocp

from lolax.models import ModelConfig, peft

CONFIG_FILE = "config.json"
# Config sections whose change makes saved state unusable (shapes or optimizer-state layout,
# or what the token ids mean).
STATE_DEFINING = ("model", "optim.name", "optim.rank", "peft", "data.tokenizer")


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, name + "."))
        else:
            out[name] = value
    return out


def _field_defaults() -> dict[str, Any]:
    """Defaults of the model and adapter fields (``model.<f>``, ``peft.<f>``; no adapters) and of
    ``data.tokenizer`` (bytes): what a config written before a field existed meant by leaving
    it out."""
    out = {f"model.{k}": v for k, v in ModelConfig().to_dict().items()}
    out.update({f"peft.{k}": v for k, v in peft.PeftConfig().to_dict().items()})
    out["peft.method"] = ""
    out["data.tokenizer"] = "byte"
    return out


def check_compatible(workdir: str, config: dict) -> None:
    """Raises ValueError if ``workdir`` holds a run whose state-defining config differs.

    A field missing from the saved config (written before the field existed) counts as its
    default, so adding a model or adapter option does not lock older runs out.
    """
    path = os.path.join(workdir, CONFIG_FILE)
    if not os.path.exists(path):
        return
    with open(path) as f:
        saved = _flatten(json.load(f))
    current = _flatten(config)
    defaults = _field_defaults()
    for key in set(current) - set(saved):
        if key in defaults and _same(current[key], defaults[key]):
            saved[key] = current[key]
    diffs = []
    for key in sorted(set(saved) | set(current)):
        if any(key == p or key.startswith(p + ".") for p in STATE_DEFINING) and saved.get(key) != current.get(key):
            diffs.append(f"{key}: checkpoint has {saved.get(key)!r}, config has {current.get(key)!r}")
    if diffs:
        raise ValueError(
            f"workdir {workdir!r} holds checkpoints from an incompatible config:\n  " + "\n  ".join(diffs)
            + "\nUse a new --workdir, or the same settings to resume.")


def _same(value, default) -> bool:
    if isinstance(default, tuple):            # peft.targets: a tuple in PeftConfig, a string in configs
        return value in (default, ",".join(default), list(default))
    return value == default


def write_config(workdir: str, config: dict) -> None:
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, CONFIG_FILE), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)


class Checkpointer:
    """Keeps the last ``keep`` checkpoints of ``(state, data position)`` under ``workdir/checkpoints``."""

    def __init__(self, workdir: str, keep: int = 3, create: bool = True):
        self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
        if not create and not os.path.isdir(self.directory):
            raise ValueError(f"{workdir!r} holds no checkpoints ({self.directory} does not exist)")
        self.manager = ocp.CheckpointManager(
            self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=create))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state, data_position: dict[str, int], meta: dict | None = None) -> None:
        """Saves ``state`` and the data position; ``meta`` (JSON) rides along when given."""
        items = {"state": ocp.args.StandardSave(state), "data": ocp.args.JsonSave(data_position)}
        if meta is not None:
            items["meta"] = ocp.args.JsonSave(meta)
        self.manager.save(step, args=ocp.args.Composite(**items))

    def meta(self, step: int) -> dict | None:
        """The ``meta`` saved with checkpoint ``step``, or None if it has none."""
        if not os.path.isdir(os.path.join(self.directory, str(step), "meta")):
            return None
        return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta

    def restore(self, step: int, abstract_state):
        """Restores ``(state, data_position)``; ``abstract_state`` gives structure, shapes, shardings."""
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(
                f"checkpoint {step} in {self.directory} does not match the current model/optimizer "
                f"state ({type(e).__name__}: {str(e)[:500]}). Use a new --workdir, or the config it was "
                "saved with.") from e
        return restored.state, restored.data

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def abstract_like(state):
    """ShapeDtypeStructs (with shardings) describing ``state``, for restoring into."""
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
