"""Document packing: boundaries as fixed-shape cu_seqlens per row, a packed forward pass equal to
running every document on its own (empty padding segments included), and a loss that never
scores a document's first token against the previous document."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from experiments import train_state
from experiments.data import BatchIterator, eval_windows
from experiments.data.packing import boundaries_in_window, flat_cu_seqlens, pack_windows, row_segments
from experiments.train_state import evaluate, init_state, make_eval_step, make_train_step, model_logits
from lolax.models import LanguageModel, ModelConfig


def test_row_segments_by_hand():
    cu, mask = row_segments(np.array([3, 6]), seq_len=8, max_segments=4)
    assert cu.tolist() == [0, 3, 6, 8, 8] and cu.dtype == np.int32
    assert mask.tolist() == [True, True, False, True, True, False, True, True]
    # a document starting at the window's last token: its target is masked, the inputs are not cut
    cu, mask = row_segments(np.array([8]), 8, 3)
    assert cu.tolist() == [0, 8, 8, 8] and mask.tolist() == [True] * 7 + [False]
    # more documents than segments: the last segment takes the rest, every start is still masked
    cu, mask = row_segments(np.array([1, 2, 3, 4]), 6, 3)
    assert cu.tolist() == [0, 1, 2, 6] and (~mask).nonzero()[0].tolist() == [0, 1, 2, 3]
    with pytest.raises(ValueError, match=r"boundaries must lie in \[1, 8\]"):
        row_segments(np.array([0]), 8, 2)
    with pytest.raises(ValueError, match="max_segments must be >= 1, got 0"):
        row_segments(np.array([], int), 8, 0)


def test_boundaries_and_flat_layout():
    starts = np.array([0, 5, 9, 20, 21])
    assert boundaries_in_window(starts, 0, 8).tolist() == [5]
    assert boundaries_in_window(starts, 9, 12).tolist() == [11, 12]
    assert boundaries_in_window(starts, 10, 5).tolist() == []
    batch = pack_windows(np.arange(18).reshape(2, 9), [np.array([3]), np.array([], int)], 3)
    assert batch["cu_seqlens"].tolist() == [[0, 3, 8, 8], [0, 8, 8, 8]]
    assert flat_cu_seqlens(batch["cu_seqlens"], 8).tolist() == [0, 3, 8, 8, 16, 16, 16]


def test_packed_batch_iterator_marks_every_document_start():
    tokens = np.arange(1000) % 251
    starts = np.array([0, 7, 8, 100, 333, 334, 600])
    it = BatchIterator(tokens, batch_size=4, seq_len=32, seed=3, doc_starts=starts, max_segments=8)
    plain = BatchIterator(tokens, batch_size=4, seq_len=32, seed=3)
    for _ in range(10):
        window_start = it._epoch_starts()[it.index] if it.index < len(it._epoch_starts()) else None
        batch, reference = next(it), next(plain)
        assert np.array_equal(batch["inputs"], reference["inputs"])         # same windows as unpacked
        assert batch["cu_seqlens"].shape == (4, 9) and batch["loss_mask"].shape == (4, 32)
        if window_start is not None:
            expected = [r for r in starts - window_start if 1 <= r <= 32]
            assert (~batch["loss_mask"][0]).nonzero()[0].tolist() == [r - 1 for r in expected]
    evals = eval_windows(tokens, 2, 32, 3, doc_starts=starts, max_segments=4)
    assert evals[0]["cu_seqlens"].tolist() == [[0, 7, 8, 32, 32], [0, 32, 32, 32, 32]]
    assert evals[1]["cu_seqlens"][1].tolist() == [0, 1, 32, 32, 32]                # 100 = 3 * 33 + 1


def _batch(L=24, K=4):
    """Two rows: three documents (one of a single token) with an empty padding segment, and one
    row holding a single document."""
    rng = np.random.default_rng(0)
    inputs = rng.integers(0, 256, (2, L)).astype(np.int32)
    cu = np.array([[0, 9, 10, L, L], [0, L, L, L, L]], np.int32)
    assert cu.shape == (2, K + 1)
    return inputs, cu


def check_packed_forward(pattern: str, flat: bool) -> None:
    """Packed logits (rows under vmap, and with ``flat`` the batch as one row) equal each document's
    logits alone. Alone = every document right-padded to L in one ordinary batch: the models are
    causal, so padding after a document does not change its logits."""
    cfg = ModelConfig(d_model=16, num_layers=len(pattern), pattern=pattern, num_heads=2, chunk_size=8, window=5)
    model = LanguageModel(cfg, nnx.Rngs(0))
    inputs, cu = _batch()
    L = inputs.shape[1]
    docs = [(row, int(s), int(e)) for row in range(2) for s, e in zip(cu[row, :-1], cu[row, 1:]) if e > s]
    alone = np.zeros((len(docs) + 1, L), np.int32)
    for i, (row, s, e) in enumerate(docs):
        alone[i, :e - s] = inputs[row, s:e]
    alone[-1] = inputs[0]                               # and the first row unpacked, in the same call
    reference = jax.jit(model)(alone)
    packed, _ = jax.jit(lambda b: model_logits(model, b))({"inputs": inputs, "cu_seqlens": cu})
    layouts = [packed]
    if flat:
        run_flat = jax.jit(lambda x, c: model(x.reshape(1, -1), cu_seqlens=c))
        layouts.append(run_flat(inputs, flat_cu_seqlens(cu, L)).reshape(packed.shape))
    for logits in layouts:
        for i, (row, s, e) in enumerate(docs):
            np.testing.assert_allclose(logits[row, s:e], reference[i, :e - s], atol=2e-5, rtol=1e-5,
                                       err_msg=f"{pattern}: row {row}, document [{s}, {e})")
    # the boundaries matter: the first row unpacked differs after its first document
    assert not np.allclose(reference[-1, 9:], packed[0, 9:], atol=1e-3)


def test_packed_softmax_forward_equals_each_document_alone():
    check_packed_forward("S", flat=True)


def test_packed_hybrid_forward_equals_each_document_alone():
    """Softmax + Gated DeltaNet, whose short convolution must not reach across documents."""
    check_packed_forward("SE", flat=False)


@pytest.mark.slow
@pytest.mark.parametrize("letter", list("WLHBRNGDEMCOI"))
def test_every_mixer_kind_takes_empty_padding_segments(letter):
    """Rows padded with empty segments at their end, and the flattened batch with empty segments
    in the middle, give each document's own logits for every mixer kind."""
    check_packed_forward(letter, flat=True)


def test_loss_ignores_cross_document_targets():
    rng = np.random.default_rng(1)
    logits = jnp.asarray(rng.normal(size=(2, 6, 11)), jnp.float32)
    targets = rng.integers(0, 11, (2, 6)).astype(np.int32)
    mask = np.ones((2, 6), bool)
    mask[0, 2] = mask[1, 4] = False
    loss = train_state.next_token_loss(logits, {"targets": targets, "loss_mask": mask})
    logp = jax.nn.log_softmax(logits)
    kept = [-float(logp[b, t, targets[b, t]]) for b in range(2) for t in range(6) if mask[b, t]]
    assert float(loss) == pytest.approx(np.mean(kept), rel=1e-6)        # normalised by the 10 real targets
    changed = targets.copy()
    changed[0, 2], changed[1, 4] = (changed[0, 2] + 1) % 11, (changed[1, 4] + 5) % 11
    assert float(train_state.next_token_loss(logits, {"targets": changed, "loss_mask": mask})) == float(loss)
    assert float(train_state.next_token_loss(logits, {"targets": targets})) != float(loss)


def test_packed_train_and_eval_steps_ignore_masked_targets():
    cfg = ModelConfig(d_model=16, num_layers=1, pattern="S", num_heads=2)
    tx = optax.sgd(0.1)
    graphdef, state = init_state(cfg, tx, seed=0)
    inputs, cu = _batch()
    targets = np.roll(inputs, -1, axis=1)
    mask = np.ones_like(inputs, bool)
    mask[0, [8, 9]] = False                             # targets 9 and 10 start documents
    batch = {"inputs": inputs, "targets": targets, "cu_seqlens": cu, "loss_mask": mask}
    other = {**batch, "targets": np.where(mask, targets, (targets + 7) % 256)}
    step = make_train_step(graphdef, tx, donate=False)
    (_, m1), (_, m2) = step(state, batch), step(state, other)
    assert float(m1["loss"]) == float(m2["loss"]) and float(m1["grad_norm"]) == float(m2["grad_norm"])

    eval_step = make_eval_step(graphdef)
    total = float(eval_step(state.params, batch))
    assert total == pytest.approx(float(m1["loss"]) * mask.sum(), rel=1e-5)
    target_bytes = np.full(inputs.shape, 2, np.int32)
    target_bytes[~mask] = 1000                          # masked targets' bytes are not counted
    result = evaluate(eval_step, state.params, [{**batch, "target_bytes": target_bytes}])
    assert result["loss"] == pytest.approx(total / mask.sum(), rel=1e-6)
    assert result["bpb"] == pytest.approx(total / (2 * mask.sum()) / math.log(2), rel=1e-6)


@pytest.mark.slow
def test_packed_step_on_eight_data_parallel_devices_equals_one():
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from lolax.parallelism import rules as prules

    cfg = ModelConfig(d_model=16, num_layers=2, pattern="ES", num_heads=2, chunk_size=8)
    tx = optax.adamw(1e-2)
    rng = np.random.default_rng(2)
    windows = rng.integers(0, 256, (8, 25)).astype(np.int32)
    bounds = [np.sort(rng.choice(np.arange(1, 25), int(rng.integers(0, 4)), replace=False)) for _ in range(8)]
    batch = pack_windows(windows, bounds, 3)
    results = []
    for n in (1, 8):
        mesh = jax.make_mesh((n,), ("data",), axis_types=(jax.sharding.AxisType.Auto,), devices=jax.devices()[:n])
        graphdef, state = init_state(cfg, tx, seed=0)
        state = jax.device_put(state, NamedSharding(mesh, P()))
        placed = jax.device_put(batch, prules.batch_sharding(mesh))
        assert len(placed["cu_seqlens"].sharding.device_set) == n
        with jax.set_mesh(mesh):
            _, metrics = make_train_step(graphdef, tx, donate=False)(state, placed)
        results.append(metrics)
    np.testing.assert_allclose(results[1]["loss"], results[0]["loss"], rtol=1e-5)
    np.testing.assert_allclose(results[1]["grad_norm"], results[0]["grad_norm"], rtol=1e-4)


def test_a_warning_when_rows_hold_more_documents_than_segments(capsys):
    from experiments.data.pipeline import warn_if_segments_short
    assert not warn_if_segments_short(0.5, 2) and capsys.readouterr().out == ""
    assert warn_if_segments_short(2.4, 2)
    assert "--config.data.max_segments=5" in capsys.readouterr().out
