"""The shared task trainer: masked metrics, learning, state-size accounting and the sweep scripts."""

import json
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from experiments.tasks import IGNORE
from experiments.tasks.runner import decode_state_size, masked_loss_and_accuracy, task_model_config, train_on_task
from experiments.tasks.sweeps import mqar_markdown, mqar_sweep, state_tracking_sweep


def test_masked_loss_and_accuracy_ignore_positions():
    logits = jnp.log(jnp.array([[[0.7, 0.3], [0.2, 0.8], [0.5, 0.5]]]))
    labels = jnp.array([[0, 0, IGNORE]])
    loss, correct, count = masked_loss_and_accuracy(logits, labels)
    np.testing.assert_allclose(loss, -(np.log(0.7) + np.log(0.2)) / 2, rtol=1e-6)
    assert int(correct) == 1 and int(count) == 2


def test_training_learns_an_easy_task_and_reports_accuracy():
    rng = np.random.default_rng(0)

    def sample(i):
        x = rng.integers(0, 16, (16, 12)).astype(np.int32)
        return {"inputs": x, "labels": x}            # echo the current token

    x = np.random.default_rng(1).integers(0, 16, (32, 12)).astype(np.int32)
    labels = np.where(np.arange(12) % 2 == 0, x, IGNORE)
    cfg = task_model_config("linear_attn", 16, 32, num_layers=1)
    result = train_on_task(cfg, sample, {"echo": {"inputs": x, "labels": labels}}, steps=60, learning_rate=1e-2)
    assert result.accuracy["echo"] > 0.9 and result.steps == 60


def test_decode_state_size_counts_states_and_caches():
    lin = task_model_config("linear_attn", 64, 32, num_layers=2, num_heads=2)
    assert decode_state_size(lin, 100) == 2 * 2 * 16 * 16             # layers * H * K * V
    soft = task_model_config("transformer", 64, 32, num_layers=2, num_heads=2)
    assert decode_state_size(soft, 100) == 2 * 2 * 100 * 32          # layers * (k, v) * T * d


def test_conv_hybrid_puts_a_baseconv_layer_before_every_mixer_layer():
    cfg = task_model_config("gla", 64, 32, num_layers=2, num_heads=2, conv_size=3, conv_hybrid=True)
    assert cfg.layer_kinds == ("conv", "gla", "conv", "gla")
    plain = task_model_config("gla", 64, 32, num_layers=2, num_heads=2)
    assert decode_state_size(cfg, 100) == decode_state_size(plain, 100) + 2 * 2 * 32    # layers * taps-1 * d


def test_sweep_functions_return_one_row_per_run():
    rows = mqar_sweep(["linear_attn"], [16], 64, [(16, 2)], steps=3, batch=4, lrs=[1e-3], train_examples=16,
                          test_examples=8, seed=0, log=lambda s: None)
    assert len(rows) == 1 and rows[0]["state_size"] == 2 * 2 * 8 * 8 and 0 <= rows[0]["accuracy"] <= 1
    rows = mqar_sweep(["swa"], [16], 64, [(16, 2)], steps=1, batch=4, lrs=[1e-3], train_examples=16,
                      test_examples=8, seed=0, log=lambda s: None, window=4)
    assert rows[0]["state_size"] == 2 * 2 * 4 * 16                    # the override shrank the preset's window
    # seeds: every rate runs once per seed, the row keeps the rate with the best mean and its spread
    rows = mqar_sweep(["linear_attn"], [16], 64, [(16, 2)], steps=2, batch=4, lrs=[1e-3, 1e-2], train_examples=16,
                      test_examples=8, seed=0, log=lambda s: None, seeds=[0, 1])
    (row,) = rows
    assert row["seeds"] == [0, 1] and len(row["accuracies"]) == 2 and set(row["by_lr"]) == {"0.001", "0.01"}
    assert row["by_lr"][str(row["learning_rate"])] == max(row["by_lr"].values())
    assert row["accuracy"] == pytest.approx(np.mean(row["accuracies"]))
    assert row["accuracy_std"] == pytest.approx(np.std(row["accuracies"]))
    assert "| 16 | linear_attn | 16 |" in mqar_markdown(rows)
    rows = state_tracking_sweep(["parity"], ["deltanet_neg"], 8, [8, 12], 16, 1, steps=3, batch=4, lr=1e-3,
                              seeds=[0], test_examples=8, log=lambda s: None)
    assert [r["length"] for r in rows] == [8, 12] and all(-1 <= r["normalized"] <= 1 for r in rows)


SCRIPT_RUNS = {
    "mqar": (["--mixers=linear_attn,based", "--d_models=16", "--vocab_size=32", "--seq_len=16", "--num_pairs=2",
              "--train_examples=16", "--test_examples=8", "--steps=2", "--batch_size=4", "--conv_size=3",
              "--conv_hybrid", "--seeds=0,1"],
             ["mqar.png", "mqar.md"]),
    "state_tracking": (["--tasks=parity", "--mixers=deltanet_neg", "--train_length=8", "--test_lengths=8,12",
                        "--d_model=16", "--steps=2", "--batch_size=4", "--test_examples=8"],
                       ["state_tracking_parity.png"]),
    "listops": (["--mixers=linear_attn", "--min_length=8", "--max_length=40", "--max_depth=3", "--max_args=3",
                 "--train_examples=16", "--test_examples=8", "--d_model=16", "--steps=2", "--batch_size=4"],
                ["listops.png"]),
}


@pytest.mark.parametrize("script", sorted(SCRIPT_RUNS))
def test_task_scripts_write_results_with_their_command_and_plots(script, tmp_path):
    args, plots = SCRIPT_RUNS[script]
    out = subprocess.run([sys.executable, "-m", f"experiments.{script}", *args, f"--out={tmp_path}"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    record = json.loads((tmp_path / f"{script}.json").read_text())
    assert record["command"].startswith(f"python -m experiments.{script} --") and record["rows"]
    for plot in plots:
        assert (tmp_path / plot).stat().st_size > 0
    if script == "mqar":
        assert record["model_overrides"] == {"window": 16, "conv_size": 3, "conv_hybrid": True}
        assert {r["mixer"] for r in record["rows"]} == {"linear_attn", "based"}
