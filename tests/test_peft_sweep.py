"""The adaptation sweep script: its data split, its report, and (slow) a miniature run."""

import json
import os

import pytest

from experiments import peft_sweep


def test_split_keeps_the_poems_out_of_pretraining(tmp_path):
    plays, poems = peft_sweep.split_corpus(str(tmp_path))
    held = sorted(os.listdir(poems))
    assert held and all(name.startswith(peft_sweep.HELD_OUT) for name in held)
    assert not set(held) & set(os.listdir(plays)) and len(os.listdir(plays)) > 60
    assert peft_sweep.split_corpus(str(tmp_path)) == (plays, poems)          # idempotent


def test_report_files(tmp_path):
    rows = [{"name": "pretrained, not adapted", "trainable": 0, "val_bpb": 2.7, "minutes": 1.0},
            {"name": "lora r=8", "trainable": 32768, "val_bpb": 2.5, "minutes": 2.0}]
    peft_sweep.write_results(rows, str(tmp_path))
    assert json.load(open(tmp_path / "peft_sweep.json")) == rows
    assert "| lora r=8 | 32,768 | 2.5000 | 2.0 |" in (tmp_path / "peft_sweep.md").read_text()
    assert (tmp_path / "peft_sweep.png").stat().st_size > 10_000


@pytest.mark.slow
def test_miniature_sweep(tmp_path):
    results = peft_sweep.sweep(str(tmp_path), str(tmp_path), steps=2, pretrain_steps=2,
                               only=["lora r=8", "dylora r<=8"])
    names = [r["name"] for r in results]
    assert names == ["pretrained, not adapted", "lora r=8", "dylora r<=8", "dylora cut to r=1",
                     "dylora cut to r=2", "dylora cut to r=4"]
    assert results[1]["trainable"] == 4 * 4 * 8 * 256
    assert all(r["val_bpb"] == r["val_bpb"] for r in results)              # no NaN
    again = peft_sweep.sweep(str(tmp_path), str(tmp_path), steps=2, pretrain_steps=2, only=["lora r=8"])
    assert again[1]["val_bpb"] == results[1]["val_bpb"]                     # finished runs are reported again


def test_scripts_import_together():
    """The scripts' flags are defined only when run, so their modules import side by side
    (the test suite imports them into one process)."""
    import importlib

    for name in ("experiments.train", "experiments.merge", "experiments.peft_sweep", "experiments.generate",
                 "experiments.linearize", "experiments.linearize_repro"):
        importlib.import_module(name)
    from absl import flags

    assert "pretrain_steps" not in flags.FLAGS and "step" not in flags.FLAGS
    assert "prompt" not in flags.FLAGS and "max_new_tokens" not in flags.FLAGS
    assert "transfer_steps" not in flags.FLAGS and "window" not in flags.FLAGS
