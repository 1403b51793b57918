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


def _counting_runs(monkeypatch):
    """Replaces the trainer with a stub that records (lr, seed) and scores lr 1e-2 best."""
    from experiments.tasks import sweeps
    from experiments.tasks.runner import TaskResult

    calls = []

    def fake_train(cfg, sample, evals, *, steps, learning_rate, seed, **kwargs):
        calls.append((learning_rate, seed))
        acc = {1e-3: 0.1, 1e-2: 0.5}[learning_rate] + 0.01 * seed
        return TaskResult(train_loss=1.0, steps=steps, seconds=0.0, accuracy={"test": acc}, num_params=1)

    monkeypatch.setattr(sweeps, "train_on_task", fake_train)
    return calls


def test_mqar_first_seed_selection_sweeps_rates_on_the_first_seed_only(monkeypatch):
    calls = _counting_runs(monkeypatch)
    partial = []
    rows = mqar_sweep(["linear_attn"], [16, 32], 64, [(16, 2)], steps=2, batch=4, lrs=[1e-3, 1e-2],
                      train_examples=16, test_examples=8, seed=0, log=lambda s: None, seeds=[0, 1, 2],
                      lr_selection="first_seed", on_row=lambda r: partial.append(len(r)))
    # per width: both rates on seed 0, then the better rate (1e-2) on seeds 1 and 2
    assert calls == [(1e-3, 0), (1e-2, 0), (1e-2, 1), (1e-2, 2)] * 2
    assert partial == [1, 2]                                   # called as each row completes
    row = rows[0]
    assert row["learning_rate"] == 1e-2 and row["lr_selection"] == "first_seed"
    assert row["accuracies"] == pytest.approx([0.50, 0.51, 0.52])
    assert row["by_lr"] == {"0.001": pytest.approx(0.1), "0.01": pytest.approx(0.5)}
    with pytest.raises(ValueError, match="lr_selection"):
        mqar_sweep(["linear_attn"], [16], 64, [(16, 2)], steps=2, batch=4, lrs=[1e-3], train_examples=16,
                   test_examples=8, seed=0, lr_selection="best")


def test_mqar_fixed_rates_skip_the_sweep_for_the_pairs_they_name(monkeypatch):
    calls = _counting_runs(monkeypatch)
    rows = mqar_sweep(["linear_attn"], [16, 32], 64, [(16, 2)], steps=2, batch=4, lrs=[1e-3, 1e-2],
                      train_examples=16, test_examples=8, seed=0, log=lambda s: None, seeds=[0, 1],
                      fixed_lrs={("linear_attn", 16): 1e-3})
    assert calls[:2] == [(1e-3, 0), (1e-3, 1)]                 # width 16: the given rate on every seed
    assert calls[2:] == [(1e-3, 0), (1e-2, 0), (1e-3, 1), (1e-2, 1)]   # width 32: the full sweep
    assert [r["lr_selection"] for r in rows] == ["fixed", "all_seeds"]
    assert [r["learning_rate"] for r in rows] == [1e-3, 1e-2]


def test_mqar_merge_combines_runs_and_later_rows_win(tmp_path):
    from experiments.mqar import merge

    def row(mixer, seq_len, acc):
        return {"mixer": mixer, "d_model": 16, "seq_len": seq_len, "num_pairs": 2, "learning_rate": 1e-3,
                "state_size": 256, "accuracy": acc, "accuracy_std": 0.0, "accuracies": [acc]}

    for name, rows in {"a": [row("gla", 16, 0.2), row("gla", 32, 0.3)], "b": [row("gla", 32, 0.9)]}.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "mqar.json").write_text(json.dumps({"vocab_size": 64, "command": name, "rows": rows}))
    merge([str(tmp_path / "a"), str(tmp_path / "b")], str(tmp_path / "out"))
    record = json.loads((tmp_path / "out" / "mqar.json").read_text())
    assert sorted((r["seq_len"], r["accuracy"]) for r in record["rows"]) == [(16, 0.2), (32, 0.9)]
    assert set(record["merged_from"]) == {str(tmp_path / "a"), str(tmp_path / "b")}
    assert (tmp_path / "out" / "mqar_L16.png").stat().st_size > 0 and (tmp_path / "out" / "mqar_L32.png").exists()
    assert "| 32 | gla | 16 | 256 | 0.001 | 0.900 ± 0.000 | 0.900 |" in (tmp_path / "out" / "mqar.md").read_text()
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "mqar.json").write_text(json.dumps({"vocab_size": 128, "rows": []}))
    with pytest.raises(ValueError, match="one vocabulary"):
        merge([str(tmp_path / "a"), str(tmp_path / "c")], str(tmp_path / "out"))



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
