"""State-tracking tasks: parity, counting modulo m, and composition in the groups S3 and S5.

Each input is a sequence of group elements; the label at position t is the running product
(the state after reading tokens 0..t), so every position is supervised and the last label is the
answer of the classic sequence-level task.

- ``parity``: tokens {0, 1}, label = number of ones so far mod 2.
- ``mod3`` / ``mod5``: tokens {0, 1}, label = number of ones so far mod m.
- ``s3`` / ``s5``: tokens index the permutations of 3 / 5 elements (in lexicographic order); the
  label indexes the composition ``x_t ∘ ... ∘ x_1`` of all permutations so far.
"""

from __future__ import annotations

import itertools

import numpy as np

STATE_TASKS = ("parity", "mod3", "mod5", "s3", "s5")


def permutation_table(n: int) -> tuple[list[tuple[int, ...]], np.ndarray]:
    """Permutations of ``range(n)`` in lexicographic order and their composition table.

    ``table[a, b]`` indexes ``perm[a] ∘ perm[b]`` (apply b first, then a).
    """
    perms = list(itertools.permutations(range(n)))
    index = {p: i for i, p in enumerate(perms)}
    table = np.empty((len(perms), len(perms)), np.int64)
    for a, pa in enumerate(perms):
        for b, pb in enumerate(perms):
            table[a, b] = index[tuple(pa[pb[i]] for i in range(n))]
    return perms, table


def task_vocab(task: str) -> tuple[int, int]:
    """``(input vocabulary, number of states)`` of a task."""
    return {"parity": (2, 2), "mod3": (2, 3), "mod5": (2, 5), "s3": (6, 6), "s5": (120, 120)}[task]


def generate_state_tracking(task: str, num_examples: int, length: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Returns ``inputs [N, length]`` and ``labels [N, length]`` (the running state)."""
    if task not in STATE_TASKS:
        raise ValueError(f"task must be one of {STATE_TASKS}, got {task!r}")
    if length < 1 or num_examples < 1:
        raise ValueError(f"length and num_examples must be >= 1, got {length} and {num_examples}")
    rng = np.random.default_rng(seed)
    vocab, states = task_vocab(task)
    inputs = rng.integers(0, vocab, size=(num_examples, length))
    if task in ("parity", "mod3", "mod5"):
        labels = np.cumsum(inputs, axis=1) % states
    else:
        _, table = permutation_table(3 if task == "s3" else 5)
        labels = np.empty_like(inputs)
        acc = inputs[:, 0]
        labels[:, 0] = acc
        for t in range(1, length):
            acc = table[inputs[:, t], acc]
            labels[:, t] = acc
    return {"inputs": inputs.astype(np.int32), "labels": labels.astype(np.int32)}
