"""Smoke test of experiments/bench/kernels.py: its CPU path end to end, and the GPU report's
tables and plot from synthetic measurements (the GPU path itself needs a GPU)."""

import json

from experiments.bench import kernels as bench

KEYS = {"smoke_test", "note", "environment", "families", "impls", "tuning", "timing", "budget_s", "elapsed_s",
        "budget_exhausted", "cells", "skipped_cells", "goal", "tuning_sweep"}


def test_cpu_quick_run_writes_outputs(tmp_path):
    bench.main(["--quick", "--families", "gated_delta_rule", "--out", str(tmp_path)])
    for name in ("kernels.json", "kernels.md", "kernels.png"):
        assert (tmp_path / name).stat().st_size > 0
    report = json.loads((tmp_path / "kernels.json").read_text())
    assert KEYS <= set(report)
    assert report["smoke_test"] and report["environment"]["backend"] == "cpu"
    assert report["tuning"]["choice"]["schedule"] in ("fused", "two_phase")
    assert [(c["family"], c["mode"]) for c in report["cells"]] == [("gated_delta_rule", "fwd"),
                                                                   ("gated_delta_rule", "fwdbwd")]
    for cell in report["cells"]:
        assert set(cell["impls"]) == {"pallas", "xla"}
        for stats in cell["impls"].values():
            assert stats["error"] is None and stats["median_s"] > 0 and len(stats["samples_s"]) == 2
        assert cell["ratios"]["xla/pallas"] > 0 and cell["ratios"]["pallas/fla"] is None
    goal = report["goal"]["families"]["gated_delta_rule"]["ratios"]
    assert set(goal) == {"pallas/fla", "xla/pallas", "cudnn/pallas"}
    assert "NOT a speed measurement" in (tmp_path / "kernels.md").read_text()


def _stats(t, error=None):
    return {"median_s": t, "best_s": t, "samples_s": [t] if t else [], "inner": 1, "first_call_s": 1.0,
            "error": error}


def _cell(family, shape, mode, group, times, error=None):
    impls = {i: _stats(t, error if t is None else None) for i, t in times.items()}
    return {"family": family, "shape": list(shape), "mode": mode, "group": group, "impls": impls,
            "ratios": bench.ratios(times)}


def test_gpu_report_tables_goals_and_plot(tmp_path):
    times = {"pallas": 0.010, "xla": 0.030, "fla": 0.009, "cudnn": 0.020}
    cells = [_cell("gla", bench.GOAL_SHAPE, "fwdbwd", "goal", times)]
    cells += [_cell("gla", (1, T, 16, 128), "fwdbwd", "sweep", {"pallas": T * 1e-6, "xla": T * 3e-6, "fla": T * 1e-6,
                                                                "cudnn": None if T > 2048 else T * 4e-6},
                    error="XlaRuntimeError: RESOURCE_EXHAUSTED") for T in (1024, 2048, 4096)]
    goal = bench.goal_summary(cells, ("gla", "simple_gla"))
    gla = goal["families"]["gla"]
    assert gla["ratios"] == {"pallas/fla": 0.010 / 0.009, "xla/pallas": 3.0, "cudnn/pallas": 2.0}
    assert gla["met"] == {"pallas/fla": True, "xla/pallas": True, "cudnn/pallas": False}
    assert goal["families"]["simple_gla"]["met"]["pallas/fla"] is None
    sweep = [{"family": "gla", "shape": list(bench.GOAL_SHAPE), "mode": "fwdbwd", "platform": "gpu",
              "tuning": {"block_v": 64, "num_warps": 4, "num_stages": 1, "schedule": "fused"}, **_stats(0.01),
              "vs_default": 1.0}]
    env = {"backend": "gpu", "device": "NVIDIA H200", "jax": "0.11.2", "jaxlib": "0.11.2", "torch": "2.11.0",
           "triton": "3.6.0", "fla": {"available": True, "version": "0.6.0", "import": "package", "error": None}}
    report = {"smoke_test": False, "environment": env, "families": ["gla", "simple_gla"], "impls": list(bench.IMPLS),
              "tuning": {"platform": "gpu", "choice": {"block_v": 64, "num_warps": 4, "num_stages": 1,
                                                        "schedule": "two_phase"}},
              "timing": {"reps": 7}, "budget_s": 300.0, "cells": cells, "skipped_cells": [{"family": "gla"}],
              "goal": goal, "tuning_sweep": sweep}
    bench.write_outputs(report, str(tmp_path))
    md = (tmp_path / "kernels.md").read_text()
    assert "| gla | 2 | 16384 | 16 | 128 | fwd+bwd | 10 | 30 | 9 | 20 | 1.11x | 3.00x | 2.00x |" in md
    assert "1.11x (met) | 3.00x (met) | 2.00x (missed)" in md
    assert "RESOURCE_EXHAUSTED" in md and "Not run" in md and "Tuning sweep" in md
    assert (tmp_path / "kernels.png").stat().st_size > 0
