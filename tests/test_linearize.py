"""Linearisation: student building, attention transfer, the whole pipeline and its resume."""

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from test_train import tiny_config

from experiments import finetune, transfer
from experiments.configs.linearize import get_config as linearize_config
from experiments.data import load_corpus
from experiments.linearize import linearize, load_teacher
from experiments.trainer import train
from lolax.models import LanguageModel, ModelConfig, generate

TEACHER = ModelConfig(d_model=32, num_layers=2, pattern="S", num_heads=4, num_kv_heads=2, chunk_size=16)


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory, text_file):
    """A two-layer softmax teacher with grouped-query heads, trained for a few steps."""
    c = tiny_config(text_file, steps=30)
    c.model.pattern, c.model.num_heads, c.model.num_kv_heads = "S", 4, 2
    workdir = tmp_path_factory.mktemp("teacher")
    train(c, str(workdir), show_progress=False)
    return workdir


def tiny_linearize(teacher_dir, text_file, method, **changes):
    c = linearize_config()
    c.teacher, c.method = str(teacher_dir), method
    c.data.path, c.data.seq_len, c.data.batch_size = str(text_file), 32, 4
    c.window, c.mesh.data = 8, 1
    c.transfer.steps, c.transfer.log_every, c.transfer.eval_every, c.transfer.checkpoint_every = 6, 2, 3, 3
    c.transfer.eval_batches = 1
    c.recovery.steps, c.recovery.log_every, c.recovery.eval_every, c.recovery.checkpoint_every = 4, 2, 4, 2
    c.recovery.eval_batches, c.recovery.sample_tokens = 1, 0
    for key, value in changes.items():
        c[key] = value
    return c


def test_student_copies_the_teacher_and_widens_grouped_heads():
    teacher = LanguageModel(TEACHER, nnx.Rngs(0))
    cfg = transfer.student_config(TEACHER, "transfer", "gated_deltanet")
    student = transfer.build_student(teacher, cfg, seed=1)
    assert cfg.layer_kinds == ("gated_deltanet",) * 2 and student.replaced == (0, 1)
    assert "layers/0/attn/q_proj/kernel" in student.copied and "embed/embedding" in student.copied
    assert "layers/0/attn/A_log" in student.new and "layers/1/attn/k_conv/weight" in student.new
    t_attn, s_attn = teacher.layers[0].attn, student.model.layers[0].attn
    k_t = np.asarray(t_attn.k_proj.kernel[...]).reshape(32, 2, 8)
    k_s = np.asarray(s_attn.k_proj.kernel[...]).reshape(32, 4, 8)
    np.testing.assert_array_equal(k_s[:, 0], k_t[:, 0])
    np.testing.assert_array_equal(k_s[:, 1], k_t[:, 0])      # query heads 0, 1 share kv head 0
    np.testing.assert_array_equal(k_s[:, 3], k_t[:, 1])
    conv = np.asarray(s_attn.k_conv.weight[...])
    np.testing.assert_array_equal(conv[-1], 1.0)
    np.testing.assert_array_equal(conv[:-1], 0.0)
    np.testing.assert_array_equal(np.asarray(student.model.layers[1].mlp.up_proj.kernel[...]),
                                  np.asarray(teacher.layers[1].mlp.up_proj.kernel[...]))


@pytest.mark.parametrize("method, target, message", [
    ("hedgehogify", "gla", "method = 'hedgehogify' is unknown"),
    ("transfer", "mom", "target = 'mom'"),
    ("transfer", "gla,gla", "target = 'gla,gla'"),
])
def test_bad_settings_are_named(method, target, message):
    with pytest.raises(ValueError, match=message):
        transfer.student_config(TEACHER, method, target)


def test_teacher_without_softmax_layers_is_refused():
    with pytest.raises(ValueError, match="no softmax layers"):
        transfer.student_config(ModelConfig(d_model=32, num_layers=2, pattern="E", num_heads=4), "lolcats")


def test_transfer_lowers_the_layer_mse_and_trains_only_new_parameters(teacher_dir, text_file):
    teacher = load_teacher(str(teacher_dir), {})
    cfg = transfer.student_config(teacher.config, "transfer", "gated_deltanet")
    student = transfer.build_student(teacher, cfg)
    tx = optax.adam(1e-2)
    graphdef, state = transfer.init_transfer(student, tx)
    step = transfer.transfer_step(graphdef, teacher, tx, student.new, student.replaced)
    mse = transfer.transfer_eval(graphdef, teacher, student.replaced)
    tokens = jnp.asarray(load_corpus(str(text_file)).train[:4 * 32].reshape(4, 32).astype(np.int32))
    before = float(mse(state.params, tokens))
    start = state.params
    for _ in range(15):
        state, _ = step(state, tokens)
    assert float(mse(state.params, tokens)) < 0.7 * before
    moved = {"/".join(map(str, p)) for p, v in nnx.to_flat_state(state.params)
             if not np.array_equal(np.asarray(v[...]), np.asarray(_get(start, p)[...]))}
    assert moved and moved <= set(student.new)


def _get(state, path):
    for key in path:
        state = state[key]
    return state


def test_pipeline_resumes_and_ends_in_an_ordinary_run(teacher_dir, text_file, tmp_path, capsys):
    c = tiny_linearize(teacher_dir, text_file, "transfer", target="gla")
    summary = linearize(c, str(tmp_path / "gla"), show_progress=False)
    assert summary["student_pattern"] == "gla,gla"
    assert summary["tokens"] == {"transfer": 6 * 4 * 32, "recovery": 4 * 4 * 32, "total": 10 * 4 * 32}
    for key in ("teacher_val_bpb", "student_val_bpb", "final_val_bpb", "val_mse"):
        assert np.isfinite(summary[key]), key
    saved = json.load(open(tmp_path / "gla" / "linearize.json"))
    assert saved["final_val_bpb"] == summary["final_val_bpb"]
    # the result is an ordinary run folder: it loads, generates and can be a new run's init_from
    final = finetune.load_base(str(tmp_path / "gla" / "final"))
    assert final.model.layer_kinds == ("gla", "gla")
    model, _ = finetune.build_model(final.model, 0, final, None)
    tokens = generate(model, jnp.zeros((1, 3), jnp.int32), 5, temperature=0.0)
    assert tokens.shape == (1, 5)
    # rerunning finds every stage finished and reports the same figures
    again = linearize(c, str(tmp_path / "gla"), show_progress=False)
    assert again["final_val_bpb"] == pytest.approx(summary["final_val_bpb"])
    # other settings in the same workdir are refused
    with pytest.raises(ValueError, match="method: workdir has 'transfer'"):
        linearize(tiny_linearize(teacher_dir, text_file, "liger"), str(tmp_path / "gla"), show_progress=False)


FIXTURES = Path(__file__).parent / "fixtures" / "hf"


def test_hugging_face_teacher_builds_a_student_and_transfers(text_file):
    teacher = load_teacher(str(FIXTURES / "qwen3"), {})
    assert teacher.config.qk_norm and teacher.config.head_size == 32
    cfg = transfer.student_config(teacher.config, "transfer", "gated_deltanet")
    student = transfer.build_student(teacher, cfg)
    assert "layers/1/attn/v_proj/kernel" in student.copied and "layers/1/attn/q_norm/scale" not in student.copied
    tx = optax.adam(1e-2)
    graphdef, state = transfer.init_transfer(student, tx)
    step = transfer.transfer_step(graphdef, teacher, tx, student.new, student.replaced)
    tokens = jnp.asarray(load_corpus(str(text_file)).train[:2 * 24].reshape(2, 24).astype(np.int32))
    losses = [float(step(state, tokens)[1])]
    for _ in range(5):
        state, loss = step(state, tokens)
        losses.append(float(loss))
    assert np.isfinite(losses).all() and losses[-1] < losses[0]


def test_training_starts_from_a_hugging_face_checkpoint(text_file, tmp_path):
    c = tiny_config(text_file, steps=3)
    c.init_from = str(FIXTURES / "llama3")
    c.peft.method, c.peft.rank, c.peft.targets = "lora", 2, "q_proj,v_proj"
    summary = train(c, str(tmp_path / "lora"), show_progress=False)
    assert summary["step"] == 3 and np.isfinite(summary["val_loss"])
    saved = json.load(open(tmp_path / "lora" / "config.json"))
    assert saved["model"]["rope_scaling"] == "llama3" and saved["init_from"].endswith("llama3")


@pytest.mark.parametrize("method", ["lolcats", "liger"])
def test_lolcats_and_liger_pipelines_decode_with_a_constant_state(teacher_dir, text_file, tmp_path, method):
    c = tiny_linearize(teacher_dir, text_file, method)
    summary = linearize(c, str(tmp_path / method), show_progress=False)
    assert summary["student_pattern"] == f"{method},{method}"
    if method == "liger":     # nothing new to transfer: stage 1 is skipped
        assert summary["new"] == [] and summary["tokens"]["transfer"] == 0
    else:
        assert {n.rsplit("/", 1)[-1] for n in summary["new"]} == {"q_map", "k_map", "window_factor"}
        assert summary["val_mse"] < summary["train_mse"] * 10 and np.isfinite(summary["val_mse"])
    final = finetune.load_base(str(tmp_path / method / "final"))
    model, _ = finetune.build_model(final.model, 0, final, None)
    sizes = [sum(x.size for x in jax.tree.leaves(model.prefill(jnp.zeros((1, 4), jnp.int32), max_len=n)[1]))
             for n in (64, 1024)]
    assert sizes[0] == sizes[1]
    assert generate(model, jnp.zeros((1, 3), jnp.int32), 4, temperature=0.0).shape == (1, 4)


def test_repro_measures_state_and_speed_and_writes_its_table(tmp_path):
    from experiments import linearize_repro as repro

    teacher = LanguageModel(TEACHER, nnx.Rngs(0))
    student = transfer.build_student(teacher, transfer.student_config(TEACHER, "lolcats", window=8)).model
    grows = [repro.decode_state_bytes(teacher, n) for n in (64, 256)]
    assert grows[1] > 3 * grows[0]                       # the KV cache grows with the context
    assert repro.decode_state_bytes(student, 64) == repro.decode_state_bytes(student, 256)
    speeds = repro.decode_speeds({"teacher": teacher, "student": student}, context=96, repeats=1, short=2, long=6)
    assert all(np.isfinite(v) and v > 0 for v in speeds.values())
    row = lambda tokens, bpb: {"tokens": tokens, "val_bpb": bpb, "pattern": "2 x softmax",
                               "state_bytes": {"256": 2048, "4096": 4096},
                               "decode_tokens_per_s": {"256": 100.0, "4096": 90.0}}
    result = {"window": 8, "teacher_tokens": 1000,
              "rows": {"teacher (softmax)": row(1000, 2.0), "lolcats": {**row(250, 2.1), "after_transfer_bpb": 2.5}}}
    repro.write_results(result, str(tmp_path))
    table = (tmp_path / "linearize.md").read_text()
    assert "| lolcats | 2 x softmax | 250 (25% of the teacher's) | 2.100 | 2.500 | 2 KiB / 4 KiB | 100 / 90 |" in table
    assert (tmp_path / "linearize.png").stat().st_size > 0
    assert json.loads((tmp_path / "linearize.json").read_text()) == result


@pytest.mark.parametrize("target", transfer.TRANSFER_TARGETS)
def test_every_transfer_target_takes_the_teachers_projections(target):
    teacher = LanguageModel(TEACHER, nnx.Rngs(0))
    student = transfer.build_student(teacher, transfer.student_config(TEACHER, "transfer", target))
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        assert f"layers/1/attn/{name}/kernel" in student.copied, (target, name)
    x = jax.random.normal(jax.random.key(0), (1, 12, 32))
    assert np.isfinite(np.asarray(student.model.layers[0].attn(x))).all()


def test_teacher_errors_are_clear(tmp_path):
    from experiments.linearize import export_run, stage_config

    with pytest.raises(ValueError, match="config.teacher is empty"):
        load_teacher("", {})
    cfg = ModelConfig(d_model=32, num_layers=2, pattern="S", num_heads=4, scan_layers=True)
    params = nnx.state(LanguageModel(cfg, nnx.Rngs(0)), nnx.Param)
    export_run(str(tmp_path / "scanned"), params, cfg, stage_config(linearize_config(), ""))
    with pytest.raises(ValueError, match="scan_layers = True"):
        load_teacher(str(tmp_path / "scanned"), {})
    with pytest.raises(ValueError, match="scan_layers = False"):
        transfer.build_student(LanguageModel(cfg, nnx.Rngs(0)), transfer.student_config(cfg, "liger"))
