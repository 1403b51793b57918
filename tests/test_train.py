"""End-to-end training: learning, checkpoint resume after a kill, data parallelism, config errors."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from experiments.configs.lm_shakespeare import get_config
from experiments.metrics import read_metrics
from experiments.optimizers import make_optimizer
from experiments.train_state import init_state, make_train_step
from experiments.trainer import model_config, train
from lolax.models import ModelConfig

REPO = Path(__file__).resolve().parents[1]
CONFIG = str(REPO / "experiments" / "configs" / "lm_shakespeare.py")


def tiny_config(data_path, steps=40):
    c = get_config()
    c.data.path = str(data_path)
    c.data.seq_len, c.data.batch_size = 32, 8
    c.model.d_model, c.model.num_layers, c.model.pattern = 32, 2, "LS"
    c.model.num_heads, c.model.chunk_size = 2, 16
    c.optim.learning_rate, c.optim.warmup_steps = 1e-2, 5
    c.train.steps, c.train.log_every, c.train.eval_every = steps, 1, 20
    c.train.eval_batches, c.train.checkpoint_every, c.train.sample_tokens = 2, 10, 0
    c.mesh.data = 1
    return c


def overrides(c) -> list[str]:
    flat = []
    for section in ("data", "model", "optim", "train", "mesh"):
        for key, value in c[section].items():
            if value is not None:
                flat.append(f"--config.{section}.{key}={value}")
    return flat


def train_losses(workdir) -> dict[int, float]:
    """Last logged training loss per step (a resumed run logs its repeated steps again)."""
    return {r["step"]: r["loss"] for r in read_metrics(os.path.join(workdir, "metrics.jsonl"))
            if r["split"] == "train"}


def test_loss_falls_and_run_outputs_are_written(text_file, tmp_path):
    c = tiny_config(text_file)
    c.train.sample_tokens = 20
    summary = train(c, str(tmp_path), show_progress=False)
    losses = train_losses(tmp_path)
    assert losses[1] > 5.0                               # ~ln(256) at initialisation
    assert np.mean([losses[s] for s in range(36, 41)]) < losses[1] - 2.0
    assert summary["val_bpb"] < 5.0 and summary["step"] == 40
    assert len(summary["sample"]) > 0
    assert (tmp_path / "loss.png").stat().st_size > 1000
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["20", "30", "40"]  # keeps the last 3
    assert json.loads((tmp_path / "config.json").read_text())["model"]["pattern"] == "LS"


def test_killed_run_resumes_with_the_uninterrupted_trajectory(text_file, tmp_path):
    c = tiny_config(text_file, steps=120)
    c.train.checkpoint_every = 5
    reference = tmp_path / "reference"
    train(c, str(reference), show_progress=False)

    killed = tmp_path / "killed"
    cmd = [sys.executable, "-m", "experiments.train", f"--config={CONFIG}", f"--workdir={killed}",
           *overrides(c)]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not (killed / "checkpoints" / "10").exists():
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.time() < deadline, "no checkpoint within 120 s"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    done = sorted(int(s) for s in os.listdir(killed / "checkpoints") if s.isdigit())
    assert done[-1] < 120, "the run finished before it could be killed"

    train(c, str(killed), show_progress=False)
    ref, resumed = train_losses(reference), train_losses(killed)
    for step in range(done[-1] + 1, 121):
        np.testing.assert_allclose(resumed[step], ref[step], rtol=1e-6, err_msg=f"step {step}")


def test_eight_device_data_parallel_step_equals_single_device(text_file):
    assert jax.device_count() == 8
    c = tiny_config(text_file)
    cfg = model_config(c.model)
    tx = make_optimizer(c.optim, 10)
    rng = np.random.default_rng(0)
    batch = {"inputs": rng.integers(0, 256, (8, 32), dtype=np.int32),
             "targets": rng.integers(0, 256, (8, 32), dtype=np.int32)}
    results = []
    for n in (1, 8):
        mesh = jax.make_mesh((n,), ("data",), axis_types=(jax.sharding.AxisType.Auto,), devices=jax.devices()[:n])
        graphdef, state = init_state(cfg, tx, seed=0)
        state = jax.device_put(state, NamedSharding(mesh, P()))
        sharded = jax.device_put(batch, NamedSharding(mesh, P("data")))
        assert len(sharded["inputs"].sharding.device_set) == n
        step = make_train_step(graphdef, tx, donate=False)
        state, metrics = step(state, sharded)
        state, metrics = step(state, sharded)
        results.append((metrics, jax.device_get(state.params)))
    (m1, params1), (m8, params8) = results
    np.testing.assert_allclose(m8["loss"], m1["loss"], rtol=1e-5)
    np.testing.assert_allclose(m8["grad_norm"], m1["grad_norm"], rtol=1e-5)
    # Adam divides by sqrt(v): where a gradient is ~0, summation-order noise is amplified up to
    # ~lr-sized parameter differences, hence the absolute tolerance.
    for a, b in zip(jax.tree.leaves(params1), jax.tree.leaves(params8)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-4)


def test_workdir_with_incompatible_checkpoint_is_rejected(text_file, tmp_path):
    c = tiny_config(text_file, steps=10)
    train(c, str(tmp_path), show_progress=False)
    c.model.pattern = "SS"
    with pytest.raises(ValueError,
                       match=r"incompatible config[\s\S]*model.pattern: checkpoint has 'LS', config has 'SS'"):
        train(c, str(tmp_path), show_progress=False)


def _cli(args, tmp_path):
    return subprocess.run([sys.executable, "-m", "experiments.train", f"--config={CONFIG}", *args],
                          cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})


def test_config_overrides_through_flags(text_file, tmp_path):
    c = tiny_config(text_file, steps=3)
    c.train.eval_every = 3
    flags = [f for f in overrides(c) if not f.startswith("--config.model.pattern=")]
    result = _cli([f"--workdir={tmp_path}", *flags, "--config.model.preset=retnet",
                   "--config.model.pattern=RS"], tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model"]["pattern"] == "RS" and saved["train"]["steps"] == 3
    assert "layers retnet,softmax;" in result.stdout     # the flag beats the preset's pattern "R"
    assert "final: step 3" in result.stdout


def test_presets_expand_and_flags_win():
    c = get_config()
    c.model.preset = "gdn"
    assert set(model_config(c.model).layer_kinds) == {"gated_deltanet"}
    c.model.pattern = "ES"
    assert model_config(c.model).layer_kinds == ("gated_deltanet", "softmax") * 2
    c.model.preset = "nope"
    with pytest.raises(ValueError, match="model.preset = 'nope' is not a preset"):
        model_config(c.model)


def test_unknown_config_key_is_a_clear_error(tmp_path):
    result = _cli([f"--workdir={tmp_path}", "--config.train.stepz=5"], tmp_path)
    assert result.returncode != 0
    assert 'unknown config key in a --config override: stepz Did you mean "steps"' in result.stderr
    assert "Traceback" not in result.stderr
    with pytest.raises(ValueError, match=r"unknown model config key\(s\) \['widht'\]"):
        ModelConfig.from_dict({"widht": 3})


def test_missing_data_path_fails_before_training(tmp_path):
    c = tiny_config(tmp_path / "no_such_file.txt")
    with pytest.raises(FileNotFoundError, match="no_such_file.txt"):
        train(c, str(tmp_path / "run"), show_progress=False)


def test_sequence_longer_than_corpus_fails_clearly(tmp_path):
    small = tmp_path / "small.txt"
    small.write_text("To be, or not to be" * 3)
    c = tiny_config(small)
    with pytest.raises(ValueError, match="seq_len = 32 needs at least 33 tokens"):
        train(c, str(tmp_path / "run"), show_progress=False)


def test_low_rank_optimizer_by_config_prints_its_state_memory(text_file, tmp_path, capsys):
    c = tiny_config(text_file, steps=30)
    c.optim.name = "apollo_mini"
    summary = train(c, str(tmp_path), show_progress=False)
    out = capsys.readouterr().out
    assert "optimizer apollo_mini state" in out and "lowrank/mu" in out and "lowrank/projector" not in out
    losses = train_losses(tmp_path)
    assert np.mean([losses[s] for s in range(26, 31)]) < losses[1] - 1.0
    assert np.isfinite(summary["val_loss"])


def test_sigterm_saves_a_checkpoint_before_exiting(text_file, tmp_path):
    c = tiny_config(text_file, steps=100_000)
    c.train.checkpoint_every = 100_000           # only the stop request can save
    cmd = [sys.executable, "-m", "experiments.train", f"--config={CONFIG}", f"--workdir={tmp_path}",
           *overrides(c)]
    proc = subprocess.Popen(cmd, cwd=REPO, env={**os.environ, "JAX_PLATFORMS": "cpu"},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while len(train_losses(tmp_path)) < 3:
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read()[-2000:] if proc.poll() else ""
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]
    saved = [int(s) for s in os.listdir(tmp_path / "checkpoints") if s.isdigit()]
    assert len(saved) == 1 and 3 <= saved[0] < 100_000
    assert f"stopped at step {saved[0]}; checkpoint saved" in out + err
