"""Training that notices trouble: config values out of range, a diverging loss, damaged checkpoints,
a stop request before any evaluation, TensorBoard event files, and task scripts that keep out of
docs/results unless told."""

import glob
import os
import shutil
import signal
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from tensorboardX.proto import event_pb2
from test_train import tiny_config as train_config

from experiments import guards
from experiments.configs.lm_shakespeare import get_config
from experiments.metrics import MetricsWriter, read_metrics
from experiments.trainer import final_line, train

REPO = Path(__file__).resolve().parents[1]
CONFIG = str(REPO / "experiments" / "configs" / "lm_shakespeare.py")
ENV = {**os.environ, "JAX_PLATFORMS": "cpu"}


def tiny_config(data_path, steps=10):
    """test_train's tiny run, shorter: evaluated at step 10, checkpoints every 5 steps."""
    c = train_config(data_path, steps)
    c.optim.warmup_steps = 2
    c.train.eval_every, c.train.eval_batches, c.train.checkpoint_every = 10, 1, 5
    return c


def checkpoint_steps(workdir) -> list[int]:
    return sorted(int(s) for s in os.listdir(Path(workdir) / "checkpoints") if s.isdigit())


@pytest.fixture(scope="module")
def trained_run(text_file, tmp_path_factory):
    """A 10-step run with checkpoints 5 and 10; tests copy it before changing it."""
    workdir = tmp_path_factory.mktemp("trained") / "run"
    train(tiny_config(text_file), str(workdir), show_progress=False)
    return workdir


# --- config values out of range ----------------------------------------------------------------

@pytest.mark.parametrize("key, value, expected", [
    ("train.log_every", 0, "an integer >= 1"),
    ("train.eval_every", 0, "an integer >= 1"),
    ("train.checkpoint_every", 0, "an integer >= 1"),
    ("train.steps", 0, "an integer >= 1"),
    ("train.steps", -5, "an integer >= 1"),
    ("train.keep_checkpoints", 0, "an integer >= 1"),
    ("data.val_fraction", 0.0, "a number strictly between 0 and 1"),
    ("data.val_fraction", 1.0, "a number strictly between 0 and 1"),
    ("optim.learning_rate", -1e-3, "a finite number > 0"),
    ("data.batch_size", 0, "an integer >= 1"),
    ("data.seq_len", -1, "an integer >= 1"),
])
def test_out_of_range_values_are_refused_before_anything_is_read(key, value, expected, tmp_path):
    c = tiny_config(tmp_path / "no_such_corpus.txt")      # validation comes before the data is read
    section, field = key.split(".")
    c[section][field] = value
    with pytest.raises(ValueError, match=rf"^{key} = {value!r} is out of range: expected {expected}.*"
                                         rf"set --config.{key}="):
        train(c, str(tmp_path / "run"), show_progress=False)
    assert not (tmp_path / "run").exists()


def test_every_bad_value_is_listed_at_once(tmp_path):
    c = tiny_config(tmp_path / "corpus.txt")
    c.train.log_every, c.optim.learning_rate = 0, 0.0
    with pytest.raises(ValueError, match=r"2 config values are out of range:\n  train.log_every = 0 .*\n  "
                                         r"optim.learning_rate = 0.0 "):
        guards.check_train_config(c)
    guards.check_train_config(get_config())               # the defaults pass


def test_bad_value_on_the_command_line_is_one_line_and_exit_status_1(tmp_path):
    result = subprocess.run([sys.executable, "-m", "experiments.train", f"--config={CONFIG}",
                             f"--workdir={tmp_path}", "--config.train.checkpoint_every=0"],
                            cwd=REPO, capture_output=True, text=True, timeout=120, env=ENV)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "error: train.checkpoint_every = 0 is out of range: expected an integer >= 1 (save every N steps) "
        "(set --config.train.checkpoint_every=...)"]


# --- a diverging run ---------------------------------------------------------------------------

def _diverge(c):
    """A learning rate near float32's largest value: the first update throws the weights out of range."""
    c.optim.learning_rate, c.optim.warmup_steps = 1e38, 0
    c.train.steps = 30
    return c


def test_nan_at_a_logged_step_stops_and_keeps_the_good_checkpoints(trained_run, text_file, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(trained_run, workdir)                                  # checkpoints 5 and 10, finite
    with pytest.raises(guards.TrainingDiverged, match=r"training diverged at step 1[12]: training loss .*"
                                                      r"gradient norm nan.*last good checkpoint is step 10 in "):
        train(_diverge(tiny_config(text_file)), str(workdir), show_progress=False)
    assert checkpoint_steps(workdir) == [5, 10]
    logged = [r for r in read_metrics(str(workdir / "metrics.jsonl")) if r["split"] == "train"]
    assert logged[-1]["step"] in (11, 12) and logged[-1]["grad_norm"] != logged[-1]["grad_norm"]  # NaN, logged


def test_nan_between_logged_steps_is_caught_before_the_save(trained_run, text_file, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(trained_run, workdir)
    c = _diverge(tiny_config(text_file))
    c.train.log_every, c.train.eval_every, c.train.checkpoint_every = 50, 50, 10     # only the save looks
    with pytest.raises(guards.TrainingDiverged, match=r"at step 20: the state to be saved .* holds NaN or Inf"):
        train(c, str(workdir), show_progress=False)
    assert checkpoint_steps(workdir) == [5, 10]


def test_a_run_that_diverges_before_any_checkpoint_says_so():
    error = guards.diverged("training loss nan, gradient norm nan", 3, None, "runs/x")
    assert str(error).endswith("Stopped without saving this state; no checkpoint has been saved yet")


@pytest.mark.slow
def test_diverging_script_exits_non_zero_with_one_line(text_file, tmp_path):
    c = _diverge(tiny_config(text_file))
    args = [f"--config.{s}.{k}={v}" for s in ("data", "model", "optim", "train", "mesh")
            for k, v in c[s].items() if v is not None]
    result = subprocess.run([sys.executable, "-m", "experiments.train", f"--config={CONFIG}",
                             f"--workdir={tmp_path}", *args], cwd=REPO, capture_output=True, text=True,
                            timeout=300, env=ENV)
    assert result.returncode == 1
    assert "error: training diverged at step" in result.stderr and "no checkpoint has been saved yet" in result.stderr
    assert "Traceback" not in result.stderr
    assert checkpoint_steps(tmp_path) == []


# --- damaged checkpoints -----------------------------------------------------------------------

def _truncate_arrays(step_dir: Path) -> None:
    for path in glob.glob(str(step_dir / "state" / "**" / "d" / "*"), recursive=True):
        with open(path, "r+b") as f:
            f.truncate(7)


def _delete_data_position(step_dir: Path) -> None:
    os.remove(step_dir / "data" / "metadata")


def _delete_state_metadata(step_dir: Path) -> None:
    os.remove(step_dir / "state" / "_METADATA")


@pytest.mark.parametrize("damage", [_truncate_arrays, _delete_data_position, _delete_state_metadata])
def test_damaged_newest_checkpoint_falls_back_to_the_previous_one(damage, trained_run, text_file, tmp_path, capfd):
    workdir = tmp_path / "run"
    shutil.copytree(trained_run, workdir)
    damage(workdir / "checkpoints" / "10")
    capfd.readouterr()
    summary = train(tiny_config(text_file, steps=12), str(workdir), show_progress=False)
    out, err = capfd.readouterr()
    warnings = [line for line in (out + err).splitlines() if "could not be read" in line]
    assert len(warnings) == 1 and warnings[0].startswith("warning: checkpoint 10 could not be read (")
    assert warnings[0].endswith(f"moved it to {workdir / 'checkpoints_unreadable' / '10'} and resumed from "
                                "checkpoint 5")
    assert "resumed from step 5" in out and "Event loop is closed" not in out + err
    assert summary["step"] == 12
    assert checkpoint_steps(workdir) == [5, 10, 12]          # step 10 trained and saved again
    assert (workdir / "checkpoints_unreadable" / "10").is_dir()


def test_no_readable_checkpoint_lists_each_step(trained_run, text_file, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(trained_run, workdir)
    for step in ("5", "10"):
        _truncate_arrays(workdir / "checkpoints" / step)
    with pytest.raises(ValueError, match=r"no checkpoint in .* could be restored:\n  step 10: .*\n  step 5: "):
        train(tiny_config(text_file, steps=12), str(workdir), show_progress=False)
    assert checkpoint_steps(workdir) == [5, 10]              # nothing moved when nothing reads


# --- a stop request ----------------------------------------------------------------------------

def test_stop_before_any_evaluation_reports_real_numbers_and_saves(text_file, tmp_path, monkeypatch):
    """Ctrl-C (SIGINT to this process) at the third logged step, long before the first evaluation."""
    write = MetricsWriter.write

    def write_then_interrupt(self, record):
        write(self, record)
        if record["split"] == "train" and record["step"] == 3:
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(MetricsWriter, "write", write_then_interrupt)
    c = tiny_config(text_file, steps=1000)
    c.train.eval_every, c.train.checkpoint_every = 1000, 1000
    c.train.tensorboard = False                           # (the switch, checked here to save a run)
    summary = train(c, str(tmp_path), show_progress=False)
    line = final_line(summary)
    assert line.startswith("final: step 3 (stopped early), training loss ") and "(step 3)" in line
    assert "not evaluated yet" in line and "nan" not in line
    assert checkpoint_steps(tmp_path) == [3]
    assert (tmp_path / "metrics.jsonl").exists() and not glob.glob(str(tmp_path / "events.out.tfevents.*"))


def test_final_line_of_a_finished_run():
    summary = {"step": 40, "stopped": False, "train_loss": 1.5, "train_step": 40, "val_loss": 1.25,
               "val_bpb": 1.8, "val_step": 40, "tokens_per_s": 12345.6}
    assert final_line(summary) == ("final: step 40, training loss 1.5000 (step 40), validation loss 1.2500, "
                                   "bits per byte 1.8000 (step 40), 12,346 tokens/s")


# --- TensorBoard -------------------------------------------------------------------------------

def read_events(workdir) -> list:
    """Every event of the TFRecord event files in ``workdir`` (length, CRC, data, CRC; CRCs unchecked)."""
    events = []
    for path in sorted(glob.glob(os.path.join(workdir, "events.out.tfevents.*"))):
        data = Path(path).read_bytes()
        offset = 0
        while offset < len(data):
            (length,) = struct.unpack("<Q", data[offset:offset + 8])
            event = event_pb2.Event()
            event.ParseFromString(data[offset + 12:offset + 12 + length])
            events.append(event)
            offset += 12 + length + 4
    return events


def test_tensorboard_event_files_hold_the_run_scalars(trained_run):
    scalars, texts = {}, set()
    for event in read_events(trained_run):
        for value in event.summary.value:
            if value.HasField("tensor"):
                texts.add(value.tag)
            else:
                scalars.setdefault(value.tag, {})[event.step] = value.simple_value
    for tag in ("train/loss", "train/bpb", "train/grad_norm", "train/learning_rate", "train/tokens_per_s"):
        assert sorted(scalars[tag]) == list(range(1, 11)), tag
    assert sorted(scalars["val/loss"]) == [10] and sorted(scalars["val/bpb"]) == [10]
    assert scalars["optimizer/state_bytes"][0] > 0
    assert "optimizer/state/text_summary" in texts
    logged = {r["step"]: r for r in read_metrics(str(trained_run / "metrics.jsonl")) if r["split"] == "train"}
    assert scalars["train/loss"][4] == pytest.approx(logged[4]["loss"])
    # the rate each step's update used: warm-up from 0 over 2 steps, then the peak
    assert [scalars["train/learning_rate"][s] for s in (1, 2, 3)] == pytest.approx([0.0, 5e-3, 1e-2])


# --- task scripts write to a run folder --------------------------------------------------------

def test_task_scripts_default_to_a_run_folder():
    code = """
import importlib
from absl import flags
for name in ("mqar", "listops", "state_tracking"):
    before = set(flags.FLAGS)
    print(name, importlib.import_module("experiments." + name).OUT.default)
    for flag in set(flags.FLAGS) - before:
        delattr(flags.FLAGS, flag)
from experiments import linearize_repro
linearize_repro.define_flags()
print("linearize_repro", flags.FLAGS["results"].default)
"""
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                            env=ENV)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split("\n")[:4] == ["mqar runs/mqar", "listops runs/listops",
                                             "state_tracking runs/state_tracking", "linearize_repro None"]


@pytest.mark.slow
def test_task_script_without_out_leaves_docs_results_alone(tmp_path):
    args = ["--tasks=parity", "--mixers=deltanet_neg", "--train_length=8", "--test_lengths=8", "--d_model=16",
            "--steps=2", "--batch_size=4", "--test_examples=8"]
    result = subprocess.run([sys.executable, "-m", "experiments.state_tracking", *args], cwd=tmp_path,
                            capture_output=True, text=True, timeout=300, env={**ENV, "PYTHONPATH": str(REPO)})
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "runs" / "state_tracking" / "state_tracking.json").exists()
    assert not (tmp_path / "docs").exists()
