"""Orbax checkpoints of the train state plus the data iterator's position.

Orbax writes each step to a temporary folder and renames it when complete, so a run killed
mid-save keeps its previous checkpoints intact and resumes from the newest complete one. A
complete step whose files were damaged later (truncated, deleted) is moved aside by
``Checkpointer.restore_latest``, which then resumes from the newest step that still reads.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
from typing import Any, Callable

import jax
import orbax.checkpoint as ocp

from lolax.models import ModelConfig, peft

CONFIG_FILE = "config.json"
UNREADABLE_DIR = "checkpoints_unreadable"  # where restore_latest moves steps it cannot read
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
        except (ValueError, KeyError, TypeError, OSError) as e:
            if _is_read_error(e):
                raise ValueError(f"checkpoint {step} in {self.directory} could not be read: {_brief(e)}") from e
            raise ValueError(
                f"checkpoint {step} in {self.directory} does not match the current model/optimizer "
                f"state ({type(e).__name__}: {str(e)[:500]}). Use a new --workdir, or the config it was "
                "saved with.") from e
        return restored.state, restored.data

    def restore_latest(self, abstract_state, check_meta: Callable[[dict | None], None] | None = None,
                       warn: Callable[[str], None] = print) -> tuple[int, Any, dict, dict | None] | None:
        """Restores the newest checkpoint that reads: ``(step, state, data_position, meta)``, or None
        when there is no checkpoint.

        A step that cannot be read (files truncated or deleted after it was written) while an
        older one can is moved to ``WORKDIR/checkpoints_unreadable/STEP``, so that the resumed run
        can save that step again, and ``warn`` gets one line about it. ``check_meta(meta)`` runs
        on each step's ``meta`` before its state is read; what it raises propagates. When no step
        reads, the ValueError lists each step's error.
        """
        steps = sorted(self.manager.all_steps(), reverse=True)
        if not steps:
            return None
        _quiet_orbax_read_errors()
        failures: list[tuple[int, Exception]] = []
        for step in steps:
            try:
                meta = self.meta(step)
            except Exception as e:  # noqa: BLE001 - any failure to read makes the step unusable
                failures.append((step, e))
                continue
            if check_meta is not None:
                check_meta(meta)
            try:
                state, position = self.restore(step, abstract_state)
            except ValueError as e:
                failures.append((step, e.__cause__ if e.__cause__ is not None else e))
                continue
            for bad, error in failures:
                moved = self._move_aside(bad)
                warn(f"warning: checkpoint {bad} could not be read ({_brief(error, 160)}); moved it to {moved} "
                     f"and resumed from checkpoint {step}")
            return step, state, position, meta
        listing = "\n  ".join(f"step {step}: {type(e).__name__}: {_brief(e)}" for step, e in failures)
        raise ValueError(
            f"no checkpoint in {self.directory} could be restored:\n  {listing}\nIf the model or optimizer "
            "config changed since they were saved, use a new --workdir or the config they were saved with; if "
            "their files are damaged, move the checkpoints folder away to start afresh.")

    def _move_aside(self, step: int) -> str:
        """Moves step ``step``'s folder out of the manager's directory; returns where it went."""
        target_dir = os.path.join(os.path.dirname(self.directory), UNREADABLE_DIR)
        os.makedirs(target_dir, exist_ok=True)
        target = os.path.join(target_dir, str(step))
        suffix = 1
        while os.path.exists(target):
            target, suffix = os.path.join(target_dir, f"{step}.{suffix}"), suffix + 1
        shutil.move(os.path.join(self.directory, str(step)), target)
        self.manager.reload()
        return target

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


# Tensorstore's error codes, which orbax passes on in its messages for files it cannot read.
_READ_ERROR_CODES = ("DATA_LOSS", "OUT_OF_RANGE", "NOT_FOUND", "FAILED_PRECONDITION", "UNKNOWN", "INTERNAL")


def _is_read_error(error: BaseException) -> bool:
    """A damaged or missing file, as against a checkpoint of another shape or structure."""
    if isinstance(error, (OSError, json.JSONDecodeError)):
        return True
    if isinstance(error, KeyError) and "was not found in the checkpoint" in str(error):
        return True                                  # an item's folder (state/, data/) is gone
    return any(str(error).startswith(code + ":") for code in _READ_ERROR_CODES)


def _brief(error: BaseException, limit: int = 300) -> str:
    text = " ".join(str(error).split())
    return text if len(text) <= limit else text[:limit] + " ..."


class _DropOrbaxReadNoise(logging.Filter):
    """Drops asyncio's 'Task exception was never retrieved' records of orbax's array reads: when
    one read of a restore fails, each of the others that failed too is logged with a traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not (message.startswith("Task exception was never retrieved") and "async_deserialize" in message)


def _quiet_orbax_read_errors() -> None:
    """Keeps a failed restore to its one exception (process-wide, installed once).

    When one array of a restore fails to read, orbax closes its event loop while tensorstore
    still completes the other reads; each completion then reports ``RuntimeError('Event loop is
    closed')`` through ``sys.unraisablehook`` and asyncio logs every unretrieved failure, hundreds
    of tracebacks for a real model, some of them after the restore has returned. Both are dropped;
    every other unraisable exception and log record passes through.
    """
    if getattr(sys.unraisablehook, "_lolax_quiet", False):
        return
    previous = sys.unraisablehook

    def hook(unraisable) -> None:
        error = unraisable.exc_value
        if isinstance(error, RuntimeError) and str(error) == "Event loop is closed":
            return
        previous(unraisable)

    hook._lolax_quiet = True
    sys.unraisablehook = hook
    logging.getLogger("asyncio").addFilter(_DropOrbaxReadNoise())


def abstract_like(state):
    """ShapeDtypeStructs (with shardings) describing ``state``, for restoring into."""
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
