"""experiments/bench/projector_quality.py: its error measures and its refresh-state helper."""

import jax
import numpy as np

from experiments.bench import projector_quality as pq
from lolax import optim


def test_subspace_errors_measure_angle_and_energy():
    rng = np.random.default_rng(0)
    g = rng.normal(size=(6, 9))
    exact = np.linalg.svd(g)[0][:, :2]
    assert np.allclose(pq.subspace_errors(exact, exact, g), (0.0, 1.0))
    other = np.linalg.svd(g)[0][:, 2:4]          # orthogonal to the exact subspace
    sin2, energy = pq.subspace_errors(other, exact, g)
    assert np.isclose(sin2, 1.0) and 0 < energy < 1


def test_at_step_puts_every_step_counter_on_a_refresh():
    params = {"w": {"kernel": np.zeros((4, 6), np.float32)}}
    tx = optim.galore(1e-2, rank=2, update_proj_gap=200)
    state = tx.update(params, tx.init(params), params)[1]
    flat = jax.tree_util.tree_flatten_with_path(pq.at_step(state, 200))[0]
    counts = {jax.tree_util.keystr(p): int(x) for p, x in flat if jax.tree_util.keystr(p).endswith("count")}
    assert counts and all(v == 200 for k, v in counts.items() if k.endswith(".count"))
