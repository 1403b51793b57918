"""Exact semantics of the synthetic task generators."""

import random

import numpy as np
import pytest

from experiments.tasks import (
    IGNORE,
    LISTOPS_VOCAB,
    evaluate_listops,
    generate_listops,
    generate_mqar,
    generate_state_tracking,
    listops_tree,
)
from experiments.tasks.listops import tokens
from experiments.tasks.mqar import power_law_gap_probs
from experiments.tasks.state_tracking import permutation_table


def test_mqar_layout_keys_values_and_labels():
    V, L, D = 256, 64, 8
    data = generate_mqar(50, V, L, D, random_non_queries=False, seed=1)
    x, y = data["inputs"], data["labels"]
    assert x.shape == y.shape == (50, L) and x.dtype == np.int32
    for n in range(50):
        keys, values = x[n, 0:2 * D:2], x[n, 1:2 * D:2]
        assert np.all((1 <= keys) & (keys < V // 2)) and len(set(keys)) == D
        assert np.all((V // 2 <= values) & (values < V)) and len(set(values)) == D
        answer = dict(zip(keys, values))
        query_pos = np.nonzero(y[n] != IGNORE)[0]
        assert len(query_pos) == D                          # every key queried exactly once
        assert np.all(query_pos >= 2 * D) and np.all((query_pos - 2 * D) % 2 == 0)
        for p in query_pos:
            assert y[n, p] == answer[x[n, p]]               # target at the key is its value
        region = np.delete(x[n, 2 * D:], query_pos - 2 * D)
        assert np.all(region == 0)                          # no values in the query region


def test_mqar_is_deterministic_noise_fills_zeros_and_gaps_favour_small():
    a = generate_mqar(20, 512, 128, 16, seed=3)
    b = generate_mqar(20, 512, 128, 16, seed=3)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    clean = generate_mqar(20, 512, 128, 16, seed=3, random_non_queries=False)
    assert np.array_equal(a["labels"], clean["labels"])
    filled = clean["inputs"] == 0
    assert np.array_equal(a["inputs"][~filled], clean["inputs"][~filled])
    assert (a["inputs"][filled] != 0).mean() > 0.9
    p = power_law_gap_probs(48, 0.01)
    assert p[0] > p[1] > p[-1] and abs(p.sum() - 1) < 1e-12
    np.testing.assert_allclose(p[1] / p[0], 2.0 ** (0.01 - 1))


@pytest.mark.parametrize("kwargs, match", [
    (dict(vocab_size=256, seq_len=63, num_pairs=4), "even"),
    (dict(vocab_size=64, seq_len=64, num_pairs=4), "vocab_size > seq_len"),
    (dict(vocab_size=256, seq_len=64, num_pairs=17), "2\\*D\\*passes"),
])
def test_mqar_rejects_bad_sizes(kwargs, match):
    with pytest.raises(ValueError, match=match):
        generate_mqar(1, **kwargs)


@pytest.mark.parametrize("task, modulus", [("parity", 2), ("mod3", 3), ("mod5", 5)])
def test_counting_tasks_label_running_count(task, modulus):
    data = generate_state_tracking(task, 30, 41, seed=2)
    x, y = data["inputs"], data["labels"]
    assert set(np.unique(x)) <= {0, 1}
    for n in range(30):
        count = 0
        for t in range(41):
            count += int(x[n, t])
            assert y[n, t] == count % modulus


@pytest.mark.parametrize("task, n", [("s3", 3), ("s5", 5)])
def test_permutation_tasks_label_the_running_composition(task, n):
    perms, _ = permutation_table(n)
    data = generate_state_tracking(task, 10, 12, seed=0)
    for row_x, row_y in zip(data["inputs"], data["labels"]):
        state = tuple(range(n))
        for tok, lab in zip(row_x, row_y):
            g = perms[tok]
            state = tuple(g[state[i]] for i in range(n))     # apply the new element last
            assert perms[lab] == state
    assert not np.array_equal(generate_state_tracking(task, 10, 12, seed=1)["inputs"], data["inputs"])


def test_s3_is_non_abelian():
    _, table = permutation_table(3)
    assert not np.array_equal(table, table.T)


def test_listops_operators_and_generator_semantics():
    assert evaluate_listops(("[MIN", [3, ("[MAX", [1, 9]), 4])) == 3
    assert evaluate_listops(("[MED", [1, 2, 7, 9])) == 4           # int(median 4.5)
    assert evaluate_listops(("[SM", [7, 8, ("[SM", [9, 9])])) == 3  # (7 + 8 + 8) % 10
    assert tokens(("[MAX", [2, ("[MIN", [4, 7])])) == ["[MAX", "2", "[MIN", "4", "7", "]", "]"]
    rng = random.Random(0)
    for _ in range(200):
        tree, length = listops_tree(rng, max_depth=4, max_args=5)
        assert len(tokens(tree)) == length
        depth_ok = _depth(tree) <= 4
        assert depth_ok and _max_args(tree) <= 5


def _depth(tree):
    return 1 if isinstance(tree, int) else 1 + max(_depth(c) for c in tree[1])


def _max_args(tree):
    if isinstance(tree, int):
        return 0
    assert len(tree[1]) >= 2
    return max([len(tree[1])] + [_max_args(c) for c in tree[1]])


def test_listops_dataset_lengths_dedup_and_labels():
    data = generate_listops(40, max_depth=6, max_args=5, min_length=20, max_length=100, seed=0)
    x, y, answers, lengths = data["inputs"], data["labels"], data["answers"], data["lengths"]
    assert x.shape == (40, 99) and np.all((20 < lengths) & (lengths < 100))
    assert len({row.tobytes() for row in x}) == 40
    for n in range(40):
        assert np.all(x[n, lengths[n]:] == 0) and np.all(x[n, :lengths[n]] != 0)
        assert np.nonzero(y[n] != IGNORE)[0].tolist() == [lengths[n] - 1]
        assert LISTOPS_VOCAB[y[n, lengths[n] - 1]] == str(answers[n])
    again = generate_listops(40, max_depth=6, max_args=5, min_length=20, max_length=100, seed=0)
    assert np.array_equal(again["inputs"], x)
