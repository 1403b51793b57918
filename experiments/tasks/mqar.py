"""Multi-query associative recall (MQAR) with the Zoology generator's semantics.

An example lists ``D`` key-value pairs, then queries some of the keys again at power-law
distributed gaps; the model must output each queried key's value at the query position.

    context  = k1 v1 k2 v2 ... kD vD          (repeated ``num_passes`` times)
    queries  = the D keys, key i at offset 2 * gap_i of the remaining region, 0 elsewhere
    labels   = value of the key at each query position, IGNORE everywhere else

Keys come from ``[1, V/2)`` and values from ``[V/2, V)``, each drawn without replacement per
example (0 marks filler). With ``random_non_queries`` every filler 0 in the inputs becomes a
uniform random token of ``[0, V)``, which may coincide with a key or value (intended noise).
"""

from __future__ import annotations

import numpy as np

from experiments.tasks.common import IGNORE


def _check(vocab_size: int, seq_len: int, num_pairs: int, num_passes: int) -> None:
    if seq_len % 2:
        raise ValueError(f"MQAR seq_len must be even, got {seq_len}")
    if vocab_size <= seq_len:
        raise ValueError(f"MQAR needs vocab_size > seq_len, got vocab_size={vocab_size}, seq_len={seq_len}")
    if num_pairs < 1 or 2 * num_pairs * num_passes + 2 * num_pairs > seq_len:
        raise ValueError(f"MQAR needs 1 <= num_pairs and 2*D*passes + 2*D <= seq_len, got D={num_pairs}, "
                         f"passes={num_passes}, seq_len={seq_len}")
    if num_pairs > vocab_size // 2 - 1:
        raise ValueError(f"num_pairs={num_pairs} exceeds the {vocab_size // 2 - 1} distinct keys of "
                         f"vocab_size={vocab_size}")


def power_law_gap_probs(space: int, power_a: float) -> np.ndarray:
    """``p(g) ∝ a (g + 1)^(a - 1)`` for ``g = 0 .. space - 1``."""
    p = power_a * np.arange(1, space + 1, dtype=np.float64) ** (power_a - 1)
    return p / p.sum()


def generate_mqar(num_examples: int, vocab_size: int = 8192, seq_len: int = 64, num_pairs: int = 8,
                  *, num_passes: int = 1, power_a: float = 0.01, random_non_queries: bool = True,
                  seed: int = 0) -> dict[str, np.ndarray]:
    """Returns ``inputs [N, seq_len]`` and ``labels [N, seq_len]`` (next-token targets, IGNORE-masked)."""
    _check(vocab_size, seq_len, num_pairs, num_passes)
    rng = np.random.default_rng(seed)
    half = vocab_size // 2
    context = 2 * num_pairs * num_passes
    space = (seq_len - context) // 2
    probs = power_law_gap_probs(space, power_a)

    inputs = np.zeros((num_examples, seq_len + 1), np.int64)
    labels = np.full((num_examples, seq_len + 1), IGNORE, np.int64)
    for n in range(num_examples):
        keys = rng.choice(np.arange(1, half), size=num_pairs, replace=False)
        values = rng.choice(np.arange(half, vocab_size), size=num_pairs, replace=False)
        pairs = np.empty(2 * num_pairs, np.int64)
        pairs[0::2], pairs[1::2] = keys, values
        inputs[n, :context] = np.tile(pairs, num_passes)
        gaps = rng.choice(space, size=num_pairs, replace=False, p=probs)
        query_pos = context + 2 * gaps
        inputs[n, query_pos] = keys
        labels[n, query_pos + 1] = values        # target of position query_pos (shifted below)
    inputs, labels = inputs[:, :-1], labels[:, 1:]
    if random_non_queries:
        noise = rng.integers(0, vocab_size, size=inputs.shape)
        inputs = np.where(inputs == 0, noise, inputs)
    return {"inputs": inputs.astype(np.int32), "labels": labels.astype(np.int32)}
