"""Synthetic benchmark tasks, deterministic by seed: MQAR, state tracking and ListOps.

Every generator returns numpy arrays ``inputs [N, L]`` int32 and ``labels [N, L]`` int32 with
``IGNORE = -100`` wherever there is nothing to predict, so one masked cross-entropy trains all.
"""

from experiments.tasks.common import IGNORE
from experiments.tasks.listops import LISTOPS_VOCAB, evaluate_listops, generate_listops, listops_tree
from experiments.tasks.mqar import generate_mqar
from experiments.tasks.state_tracking import STATE_TASKS, generate_state_tracking

__all__ = ["IGNORE", "LISTOPS_VOCAB", "STATE_TASKS", "evaluate_listops", "generate_listops",
           "generate_mqar", "generate_state_tracking", "listops_tree"]
