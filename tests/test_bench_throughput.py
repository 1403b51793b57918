"""The training-throughput benchmark: FLOP counts checked by hand and against the models' own
parameters, the cell order and goals, and a CPU smoke run end to end (with a tiny compile-depth
section)."""

import doctest
import json
import math

import jax
import pytest
from flax import nnx

from experiments.bench import flops
from experiments.bench import train_throughput as tt
from lolax.models import ModelConfig

TINY = {"vocab_size": 100, "d_model": 64, "num_layers": 2, "num_heads": 4, "mlp_hidden": 96, "chunk_size": 16}


def _param_sizes(cfg: ModelConfig) -> dict[str, int]:
    """``{"a/b/kernel": size}`` of the abstract model's parameters."""
    state = nnx.state(flops.abstract_model(cfg), nnx.Param)
    leaves = jax.tree_util.tree_flatten_with_path(state)[0]
    return {"/".join(str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey)): math.prod(x.shape)
            for path, x in leaves}


@pytest.mark.parametrize("kv_heads", [None, 2])
def test_softmax_matmul_flops_are_six_times_the_weight_matrices(kv_heads):
    cfg = ModelConfig(pattern="S", num_kv_heads=kv_heads, **TINY)
    sizes = _param_sizes(cfg)
    matrices = sum(n for path, n in sizes.items() if path.endswith("kernel"))      # projections, MLP, head
    assert not any("embed" in p and p.endswith("kernel") for p in sizes)           # the lookup is not a matmul
    d, h, dh, kv, f, V = 64, 4, 16, kv_heads or 4, 96, 100
    by_hand = 2 * (2 * d * h * dh + 2 * d * kv * dh + 3 * d * f) + d * V
    assert matrices == by_hand
    result = flops.train_flops_per_token(cfg, 128)
    assert result["matmul"] == 6 * matrices
    assert result["matmul_weights"] == matrices


def test_softmax_mixer_flops_by_hand():
    cfg = ModelConfig(pattern="S", **TINY)
    T, H, Dh, layers = 256, 4, 16, 2
    # causal: T/2 keys per query on average; QK^T and PV, 2 FLOPs per multiply-add; 3 passes
    per_layer_forward = 2 * 2 * (T / 2) * H * Dh
    result = flops.train_flops_per_token(cfg, T)
    assert result["mixer"] == 3 * layers * per_layer_forward
    assert result["total"] == result["matmul"] + result["mixer"]
    assert result["forward"] * 3 == result["total"]
    # a sliding window of w << T keys: about w keys per query instead of T / 2
    swa = flops.train_flops_per_token(ModelConfig(pattern="W", window=32, **TINY), 4096)
    w = 32
    assert swa["mixer"] == 3 * layers * 2 * 2 * (w - w * w / (2 * 4096)) * H * Dh


def test_linear_and_delta_mixer_flops_by_hand():
    C, K, V, H, layers, T = 16, 16, 16, 4, 2, 256
    # diagonal chunk form: C (K + V) intra-chunk + 2 K V state update + 2 K V state read, per head
    lin = flops.train_flops_per_token(ModelConfig(pattern="L", **TINY), T)
    assert lin["mixer"] == 3 * layers * H * (C * (K + V) + 4 * K * V)
    # delta rule: + the UT transform (C^2 / 3), W and U, Q_eff, and the W S correction in the scan
    delta = flops.train_flops_per_token(ModelConfig(pattern="D", **TINY), T)
    assert delta["mixer"] == pytest.approx(3 * layers * H * (4 * C * K + 2 * C * V + C * C / 3 + 6 * K * V))
    gla = flops.train_flops_per_token(ModelConfig(pattern="G", **TINY), T)
    assert gla["mixer"] == 3 * layers * H * (C * (K // 2 + V) + 4 * (K // 2) * V)     # gla_expand_k = 0.5


@pytest.mark.parametrize("pattern, options", [("E", {}), ("G", {}), ("D", {}), ("R", {}), ("L", {}), ("S", {}),
                                              ("W", {}), ("EEES", {}), ("N", {}), ("E", {"gdn_use_gate": False}),
                                              ("R", {"retnet_expand_v": 2})])
def test_weight_formulas_match_the_models(pattern, options):
    """Every dense kernel and short-conv tap of the model, counted from its parameter tree."""
    cfg = ModelConfig(pattern=pattern, **{**TINY, "num_layers": 4, **options})
    sizes = _param_sizes(cfg)
    weights = sum(n for p, n in sizes.items() if p.endswith("kernel") or "_conv/" in p)
    assert flops.matmul_weight_count(cfg) == weights
    assert flops.param_count(cfg) == sum(sizes.values())


@pytest.mark.parametrize("pattern", ["L", "R", "G", "D", "E"])
def test_linear_families_grow_linearly_and_attention_quadratically(pattern):
    def per_sequence(p, T):
        return flops.train_flops_per_token(ModelConfig(pattern=p, **TINY), T)["mixer"] * T
    for T in (256, 1024):
        assert per_sequence(pattern, 2 * T) == pytest.approx(2 * per_sequence(pattern, T))
        assert per_sequence("S", 2 * T) == pytest.approx(4 * per_sequence("S", T))


def test_docstring_examples():
    for module in (flops, tt):
        result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
        assert result.failed == 0 and result.attempted > 0, module.__name__


def test_cell_order_and_goals():
    cells = tt.plan_cells(tuple(tt.FAMILIES), tt.FULL_SEQ_LENS, tt.FULL_TOKENS, quick=False)
    assert [(c.family, c.T) for c in cells[:3]] == [("gdn_softmax", 8192), ("gdn_softmax", 32768), ("softmax", 32768)]
    assert len(cells) == len(tt.FAMILIES) * 3 and len({(c.family, c.T) for c in cells}) == len(cells)
    assert {c.T: c.B for c in cells} == {2048: 16, 8192: 4, 32768: 1}
    assert tt.peak_flops("NVIDIA H200")[0] == 989e12 and tt.peak_flops("TPU v5 lite")[0] == 197e12

    def cell(family, T, tps_x, tps_k, mfu_k):
        return {"family": family, "T": T, "kernels_vs_xla": tps_k / tps_x,
                "impls": {"xla": {"tokens_per_s": tps_x, "mfu": None},
                          "kernels": {"tokens_per_s": tps_k, "mfu": mfu_k}}}
    measured = [cell("gdn_softmax", 8192, 100.0, 160.0, 0.4), cell("gdn_softmax", 32768, 50.0, 90.0, 0.3),
                cell("softmax", 32768, 40.0, 50.0, 0.2)]
    goals = tt.goal_summary(measured, 8192, 32768, evaluated=True)["goals"]
    assert goals["hybrid_mfu"]["met"] and goals["hybrid_kernels_vs_xla"]["met"]
    long = goals["hybrid_vs_softmax_long"]
    assert long["value"] == pytest.approx(1.8) and long["met"] is False


def test_quick_run_end_to_end_on_cpu(tmp_path):
    """A smoke run: one tiny cell, both implementations compiled, timed and written out."""
    report = tt.run(["--quick", "--out", str(tmp_path), "--families", "softmax", "--seq-lens", "64",
                     "--remat", "none"])
    data = json.loads((tmp_path / "train_throughput.json").read_text())
    assert data == json.loads(json.dumps(report))
    for key in ("smoke_test", "environment", "peak_flops", "config", "families", "impls", "timing", "cells",
                "skipped_cells", "goals", "compile_depth", "elapsed_s"):
        assert key in data, key
    assert data["smoke_test"] and data["impls"] == {"xla": "xla", "kernels": None}
    assert data["families"]["softmax"]["params"] > 0
    (cell,) = data["cells"]
    assert (cell["family"], cell["T"], cell["B"]) == ("softmax", 64, 4)
    assert cell["flops_per_token"]["total"] > 0
    for impl in ("xla", "kernels"):
        s = cell["impls"][impl]
        assert s["error"] is None, s["error"]
        assert s["median_s"] > 0 and s["tokens_per_s"] > 0 and s["compile_s"] > 0 and len(s["samples_s"]) == 2
        assert s["path"]["ran"] == "xla"                          # no kernels on CPU unless forced
        assert s["memory"]["total_bytes"] > 0
        assert s["mfu"] is None                                   # no peak figure for a CPU
    assert cell["kernels_vs_xla"] > 0
    md = (tmp_path / "train_throughput.md").read_text()
    assert "NOT a speed measurement" in md and "| softmax |" in md
    assert (tmp_path / "train_throughput.png").stat().st_size > 0


@pytest.mark.slow          # the committed CPU figures come from the full --compile-depth-only run
def test_compile_depth_tiny(tmp_path):
    """Scanned and unrolled compiles of 1 and 2 layers (d_model 32) all take a positive time."""
    data = tt.run(["--compile-depth-only", "--out", str(tmp_path), "--remat", "none", "--depth-d-model", "32",
                   "--depth-heads", "2", "--depth-pattern", "S", "--depth-layers", "1", "2", "--depth-seq-len", "64",
                   "--no-depth-warmup"])
    assert not data["throughput_run"] and data["cells"] == []
    rows = data["compile_depth"]["rows"]
    assert [(r["layers"], r["scan_layers"]) for r in rows] == [(1, True), (1, False), (2, True), (2, False)]
    assert all(r["error"] is None and r["lower_s"] > 0 and r["compile_s"] > 0 for r in rows)
    assert all(v > 0 for v in data["compile_depth"]["ratios"].values())
    md = (tmp_path / "train_throughput.md").read_text()
    assert "Compile time" in md and "| 2 |" in md
