"""LRA ListOps with the long-range-arena generator's semantics.

A tree's root sits at depth 1. Below ``max_depth`` a node is an operator with probability 0.25,
else a digit leaf (always a leaf at ``max_depth``); an operator takes ``U{2..max_args}`` children.
Operators: ``[MIN``, ``[MAX``, ``[MED`` (median, ``int(np.median)``), ``[SM`` (sum mod 10); each
closes with ``]``. Length counts tokens: 2 per operator plus its children, 1 per leaf. Trees are
kept when ``min_length < length < max_length`` and deduplicated.
"""

from __future__ import annotations

import random

import numpy as np

from experiments.tasks.common import IGNORE

OPERATORS = ("[MIN", "[MAX", "[MED", "[SM")
# Token ids: 0 is padding; the classification target is one of the 10 digits.
LISTOPS_VOCAB = ("<pad>",) + OPERATORS + ("]",) + tuple(str(d) for d in range(10))
_TOKEN_ID = {t: i for i, t in enumerate(LISTOPS_VOCAB)}
OPERATOR_PROB = 0.25


def listops_tree(rng: random.Random, max_depth: int, max_args: int, depth: int = 1):
    """Returns ``(tree, length)``; a tree is an int leaf or ``(operator, [children])``."""
    if depth >= max_depth or rng.random() >= OPERATOR_PROB:
        return rng.randrange(10), 1
    children, length = [], 2
    for _ in range(rng.randint(2, max_args)):
        child, child_length = listops_tree(rng, max_depth, max_args, depth + 1)
        children.append(child)
        length += child_length
    return (rng.choice(OPERATORS), children), length


def evaluate_listops(tree) -> int:
    if isinstance(tree, int):
        return tree
    op, children = tree
    values = [evaluate_listops(c) for c in children]
    if op == "[MIN":
        return min(values)
    if op == "[MAX":
        return max(values)
    if op == "[MED":
        return int(np.median(values))
    return sum(values) % 10


def tokens(tree) -> list[str]:
    if isinstance(tree, int):
        return [str(tree)]
    op, children = tree
    return [op] + [t for c in children for t in tokens(c)] + ["]"]


def generate_listops(num_examples: int, *, max_depth: int = 10, max_args: int = 10, min_length: int = 500,
                     max_length: int = 2000, pad_to: int | None = None, seed: int = 0,
                     max_attempts: int = 10_000_000) -> dict[str, np.ndarray]:
    """Distinct ListOps trees as padded token ids with the answer as the label of the last token.

    Returns ``inputs [N, pad_to]`` (0-padded on the right), ``labels [N, pad_to]`` (IGNORE except
    the answer digit's token id at the final real token, for causal models), ``answers [N]`` in
    0..9 and ``lengths [N]``.
    """
    if not 1 <= min_length + 1 < max_length:
        raise ValueError(f"need 0 <= min_length < max_length - 1, got {min_length}, {max_length}")
    if max_depth < 2 or max_args < 2:
        raise ValueError(f"max_depth and max_args must be >= 2, got {max_depth}, {max_args}")
    pad_to = pad_to or max_length - 1
    if pad_to < max_length - 1:
        raise ValueError(f"pad_to = {pad_to} is shorter than the longest allowed tree ({max_length - 1})")
    rng = random.Random(seed)
    seen, trees = set(), []
    for _ in range(max_attempts):
        if len(trees) == num_examples:
            break
        tree, length = listops_tree(rng, max_depth, max_args)
        if not min_length < length < max_length:
            continue
        key = " ".join(tokens(tree))
        if key not in seen:
            seen.add(key)
            trees.append(tree)
    if len(trees) < num_examples:
        raise ValueError(f"found only {len(trees)} distinct trees with {min_length} < length < {max_length} "
                         f"in {max_attempts} attempts; widen the length range or depth")
    inputs = np.zeros((num_examples, pad_to), np.int32)
    labels = np.full((num_examples, pad_to), IGNORE, np.int32)
    answers = np.empty(num_examples, np.int32)
    lengths = np.empty(num_examples, np.int32)
    for n, tree in enumerate(trees):
        ids = [_TOKEN_ID[t] for t in tokens(tree)]
        inputs[n, :len(ids)] = ids
        answers[n], lengths[n] = evaluate_listops(tree), len(ids)
        labels[n, len(ids) - 1] = _TOKEN_ID[str(answers[n])]
    return {"inputs": inputs, "labels": labels, "answers": answers, "lengths": lengths}
