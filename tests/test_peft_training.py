"""Fine-tuning through the training script: init_from, adapter-only checkpoints with the base's
fingerprint, resume, refusal of a different base, merge into an ordinary run, and a low-rank
optimizer on adapters."""

import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx
from test_train import tiny_config

from experiments import finetune
from experiments.checkpoint import Checkpointer
from experiments.merge import merge_run
from experiments.trainer import train
from lolax.models import peft


def run(c, workdir):
    return train(c, str(workdir), show_progress=False)


def adapter_config(data, base, steps, method="dora", **peft_fields):
    c = tiny_config(data, steps=steps)
    c.train.checkpoint_every, c.train.eval_every = 5, 5
    c.init_from = str(base)
    c.peft.method, c.peft.rank = method, 2
    for k, v in peft_fields.items():
        c.peft[k] = v
    return c


@pytest.fixture(scope="module")
def pretrained(text_file, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("runs") / "pre"
    c = tiny_config(text_file, steps=10)
    c.model.pattern = "LLLS"
    c.model.num_layers = 4
    run(c, workdir)
    return workdir


def test_adapter_run_resume_refusal_and_merge(text_file, pretrained, tmp_path, capsys):
    workdir = tmp_path / "dora"
    c = adapter_config(text_file, pretrained, steps=5)
    c.model.pattern = "LS"          # ignored: the model comes from the checkpoint
    run(c, workdir)
    out = capsys.readouterr().out
    assert f"starting from {pretrained} (step 10)" in out
    model, saved, step, _ = finetune.restore_adapted(str(workdir))
    assert step == 5 and saved["model"]["pattern"] == "LLLS"
    counts = peft.count(model)
    # 4 layers x (q, k, v, o) 32 -> 32: r (in + out) + out = 2 * 64 + 32 each
    assert counts["trainable"] == 16 * (2 * 64 + 32)
    assert f"adapters: dora rank 2 on 16 layers, {counts['trainable']:,} trainable values" in out
    assert re.search(rf"^mu\s+{counts['trainable']:,}\s", out, re.M)   # optimizer state: adapters only

    # checkpoints hold the adapters alone, plus the base's fingerprint
    checkpointer = Checkpointer(str(workdir), create=False)
    meta = checkpointer.meta(5)
    checkpointer.close()
    base = finetune.load_base(str(pretrained))
    assert meta["base_fingerprint"] == peft.fingerprint(base.params)
    tree = ocp.StandardCheckpointer().metadata(str(workdir / "checkpoints" / "5" / "state")).item_metadata
    saved = {jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]}
    params = {p for p in saved if p.startswith("['params']")}
    assert len(params) == 16 * 3 and all(re.search(r"\['(lora_a|lora_b|magnitude)'\]\['value'\]$", p) for p in params)
    # the base did not move
    for path, kernel in nnx.to_flat_state(peft.base_state(model)):
        ref = base.params
        for key in path:
            ref = ref[key]
        np.testing.assert_array_equal(np.asarray(kernel[...]), np.asarray(ref[...]))

    # resume continues from step 5
    c.train.steps = 8
    summary = run(c, workdir)
    assert summary["step"] == 8 and "resumed from step 5" in capsys.readouterr().out

    # merge writes an ordinary run whose model computes what the adapted one does
    merged_dir = tmp_path / "merged"
    merge_run(str(workdir), str(merged_dir))
    adapted, *_ = finetune.restore_adapted(str(workdir))
    merged = finetune.load_base(str(merged_dir))
    assert json.load(open(merged_dir / "config.json"))["peft"]["method"] == ""
    x = jnp.asarray(np.arange(40).reshape(2, 20) % 97)
    model_m, _ = finetune.build_model(merged.model, 0, merged, None)
    np.testing.assert_allclose(np.asarray(model_m(x)), np.asarray(adapted(x)), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="already holds checkpoints"):
        merge_run(str(workdir), str(merged_dir))

    # the adapters refuse a different base
    c.init_from, c.train.steps = str(merged_dir), 10
    with pytest.raises(ValueError, match="trained on a different base model"):
        run(c, workdir)
    # an adapter run is not a base; a merged one is
    with pytest.raises(ValueError, match="is an adapter run"):
        finetune.load_base(str(workdir))
    full = tiny_config(text_file, steps=2)
    full.init_from = str(merged_dir)
    assert run(full, tmp_path / "full")["step"] == 2


def test_low_rank_optimizer_on_adapters(text_file, pretrained, tmp_path, capsys):
    c = adapter_config(text_file, pretrained, steps=3, method="lora", rank=4)
    c.optim.name, c.optim.rank, c.optim.update_proj_gap = "galore", 2, 2
    summary = run(c, tmp_path / "galore")
    assert np.isfinite(summary["train_loss"])
    assert "lowrank/projector" in capsys.readouterr().out


def test_init_from_errors(tmp_path):
    with pytest.raises(ValueError, match="is not a lolax run folder"):
        finetune.load_base(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"model": {}, "peft": {"method": ""}}))
    with pytest.raises(ValueError, match="holds no checkpoints"):
        finetune.load_base(str(tmp_path))
    assert not os.path.exists(tmp_path / "checkpoints")


def test_runs_saved_before_a_field_existed_still_resume(tmp_path):
    """A config.json without the adapter or SLTrain fields means their defaults: resumable, and
    refused as soon as one of them is set to something else."""
    from experiments.checkpoint import check_compatible
    from experiments.configs.lm_shakespeare import get_config

    current = get_config().to_dict()
    old = {k: v for k, v in current.items() if k not in ("peft", "init_from")}
    old["model"] = {k: v for k, v in current["model"].items() if not k.startswith("sltrain")}
    (tmp_path / "config.json").write_text(json.dumps(old))
    check_compatible(str(tmp_path), current)
    current["peft"]["method"] = "lora"
    with pytest.raises(ValueError, match="peft.method: checkpoint has None, config has 'lora'"):
        check_compatible(str(tmp_path), current)
    current["peft"]["method"], current["model"]["sltrain_rank"] = "", 8
    with pytest.raises(ValueError, match="model.sltrain_rank"):
        check_compatible(str(tmp_path), current)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["eva", "lora_sb", "nola"])
def test_data_driven_and_seeded_adapters_resume_and_merge(text_file, pretrained, tmp_path, method):
    """Data-driven inits are recomputed on resume (then overwritten by the checkpoint); seeded
    bases are regenerated; merging reproduces the adapted model."""
    workdir = tmp_path / method
    c = adapter_config(text_file, pretrained, steps=5, method=method, rank=4, init_batches=2)
    run(c, workdir)
    c.train.steps = 7
    assert run(c, workdir)["step"] == 7
    adapted, *_ = finetune.restore_adapted(str(workdir))
    merge_run(str(workdir), str(tmp_path / "merged"))
    merged = finetune.load_base(str(tmp_path / "merged"))
    model_m, _ = finetune.build_model(merged.model, 0, merged, None)
    x = jnp.asarray(np.arange(40).reshape(2, 20) % 97)
    np.testing.assert_allclose(np.asarray(model_m(x)), np.asarray(adapted(x)), rtol=1e-5, atol=1e-5)


def test_sltrain_model_trains_through_the_script(text_file, tmp_path):
    c = tiny_config(text_file, steps=4)
    c.model.sltrain_rank, c.model.sltrain_density = 4, 0.05
    summary = run(c, tmp_path / "sltrain")
    assert summary["step"] == 4 and np.isfinite(summary["train_loss"])
    dense = tiny_config(text_file, steps=1)
    assert summary["trainable_params"] < run(dense, tmp_path / "dense")["trainable_params"]


def test_merge_and_base_errors(pretrained, tmp_path):
    with pytest.raises(ValueError, match="is not an adapter run"):
        finetune.restore_adapted(str(pretrained))
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "config.json").write_text((pretrained / "config.json").read_text())
    with pytest.raises(ValueError, match="holds no checkpoint"):
        finetune.load_base(str(tmp_path))


def test_an_adapter_without_delta_says_so():
    class Unfinished(peft.AdaptedLinear):
        method = "unfinished"

    layer = Unfinished(nnx.Linear(4, 3, rngs=nnx.Rngs(0)), peft.PeftConfig(rank=2), nnx.Rngs(0), 0, "q_proj")
    with pytest.raises(NotImplementedError, match=r"Unfinished \(peft.method = 'unfinished'\) must define delta"):
        layer(jnp.ones((1, 4)))
