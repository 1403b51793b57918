"""``PeftConfig``: which adapter, its size, and the linear layers it wraps."""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Mapping

METHOD_NAMES = ("lora", "rslora", "dora", "dylora", "nola", "randlora", "lora_sb", "eva", "svfit",
                "loldu")


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


@dataclasses.dataclass(frozen=True)
class PeftConfig:
    """An adapter method and its hyperparameters (validated on construction; errors name the field).

    Common fields:
      method: one of ``METHOD_NAMES``.
      rank: adapter rank ``r`` (for ``nola``/``randlora`` the rank of each random basis; for
        ``svfit``/``loldu`` how many singular / LDU directions train; for ``eva`` the average
        rank of the global budget ``rank x layers``).
      alpha: numerator of the scaling, ``alpha / r`` (``rslora``: ``alpha / sqrt(r)``,
        ``dylora``: ``alpha / b`` for the rank ``b`` in use). Unused by ``lora_sb``, ``svfit``,
        ``loldu``.
      targets: which ``nnx.Linear`` layers to wrap: a tuple of names, each matching one
        component of a layer's path exactly (``("q_proj", "v_proj")`` wraps every
        ``.../q_proj`` and ``.../v_proj``), or one string, a regular expression searched in
        the ``/``-joined path (``r"layers/[0-3]/attn/(q|v)_proj"``).
      dropout: dropout on the adapter branch's input, active only inside ``peft.training(key)``.
      seed: seed of the frozen random bases (``nola``, ``randlora``), regenerated in the
        forward pass from ``fold_in(key(seed), layer_id)``.

    Method fields (ignored by the others):
      dora_detach_norm: DoRA treats the column norm as a constant in the backward pass.
      dylora_min_rank: DyLoRA samples the rank ``b`` uniformly from ``[dylora_min_rank, rank]``
        each training step.
      num_bases: NOLA's number of random bases for each of A and B (``k = l``); RandLoRA's
        number of bases ``n`` (0 = ``ceil(min(in, out) / rank)``, enough for a full-rank update).
      init_batches: batches the data-driven inits (``eva``, ``lora_sb``) read at most.
      eva_threshold: EVA stops reading a layer's activations once every one of its top
        components has cosine similarity at least this with the previous estimate.
      eva_rho: EVA's cap on a layer's rank, ``eva_rho * rank``.
      lora_sb_init_step: LoRA-SB's core starts at ``lora_sb_init_step * S_r`` (the paper's
        approximation of one full fine-tuning step of that size, which changes the model at
        step 0) instead of 0 (the default, which leaves the model unchanged).
    """

    method: str = "lora"
    rank: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] | str = ("q_proj", "k_proj", "v_proj", "o_proj")
    dropout: float = 0.0
    seed: int = 0
    dora_detach_norm: bool = True
    dylora_min_rank: int = 1
    num_bases: int = 0
    init_batches: int = 8
    eva_threshold: float = 0.99
    eva_rho: float = 2.0
    lora_sb_init_step: float = 0.0

    def __post_init__(self):
        if self.method not in METHOD_NAMES:
            raise ValueError(f"peft.method must be one of {METHOD_NAMES}, got {self.method!r}")
        if not _positive_int(self.rank):
            raise ValueError(f"peft.rank must be a positive int, got {self.rank!r}")
        if not isinstance(self.alpha, (int, float)) or isinstance(self.alpha, bool) or self.alpha <= 0:
            raise ValueError(f"peft.alpha must be a positive number, got {self.alpha!r}")
        if isinstance(self.targets, str):
            if not self.targets:
                raise ValueError("peft.targets must name at least one layer, got ''")
            try:
                re.compile(self.targets)
            except re.error as e:
                raise ValueError(f"peft.targets = {self.targets!r} is not a valid regular expression: {e}") from e
        else:
            targets = tuple(self.targets)
            if not targets or not all(isinstance(t, str) and t for t in targets):
                raise ValueError(f"peft.targets must be a non-empty tuple of layer names or a regex "
                                 f"string, got {self.targets!r}")
            object.__setattr__(self, "targets", targets)
        if not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"peft.dropout must be in [0, 1), got {self.dropout!r}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise ValueError(f"peft.seed must be an int, got {self.seed!r}")
        if not isinstance(self.dora_detach_norm, bool):
            raise ValueError(f"peft.dora_detach_norm must be a bool, got {self.dora_detach_norm!r}")
        if not _positive_int(self.dylora_min_rank) or self.dylora_min_rank > self.rank:
            raise ValueError(f"peft.dylora_min_rank must be an int in [1, peft.rank = {self.rank}], "
                             f"got {self.dylora_min_rank!r}")
        if not isinstance(self.num_bases, int) or isinstance(self.num_bases, bool) or self.num_bases < 0:
            raise ValueError(f"peft.num_bases must be an int >= 0 (0 = the method's default), "
                             f"got {self.num_bases!r}")
        if not _positive_int(self.init_batches):
            raise ValueError(f"peft.init_batches must be a positive int, got {self.init_batches!r}")
        if not isinstance(self.eva_threshold, (int, float)) or not 0.0 < self.eva_threshold <= 1.0:
            raise ValueError(f"peft.eva_threshold must be in (0, 1], got {self.eva_threshold!r}")
        if not isinstance(self.eva_rho, (int, float)) or self.eva_rho < 1.0:
            raise ValueError(f"peft.eva_rho must be >= 1, got {self.eva_rho!r}")
        if not isinstance(self.lora_sb_init_step, (int, float)) or self.lora_sb_init_step < 0:
            raise ValueError(f"peft.lora_sb_init_step must be >= 0, got {self.lora_sb_init_step!r}")

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "PeftConfig":
        """From a config section; ``targets`` may be a comma-separated string of names
        (``"q_proj,v_proj"``) or ``re:<regex>`` for a regular expression."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown peft config key(s) {unknown}; known: {sorted(known)}")
        values = dict(values)
        targets = values.get("targets")
        if isinstance(targets, str):
            if targets.startswith("re:"):
                values["targets"] = targets[3:]
            else:
                values["targets"] = tuple(t.strip() for t in targets.split(",") if t.strip())
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
