"""experiments/bench/svd_contention.py writes its tables (one quick round; slow: it starts processes)."""

import json

import pytest

from experiments.bench import svd_contention


@pytest.mark.slow
def test_bench_writes_its_outputs(tmp_path, monkeypatch):
    monkeypatch.setattr(svd_contention, "SETUPS", {"default": {}, "one core": {"pin": True}})
    monkeypatch.setattr("sys.argv", ["svd_contention", "--out", str(tmp_path), "--reps", "1", "--rounds", "1",
                                     "--hogs", "1"])
    svd_contention.main()
    res = json.loads((tmp_path / "svd_contention.json").read_text())
    for cond in ("idle", "busy"):
        for name in ("default", "one core"):
            assert res["summary"][cond][name]["svd"]["min_ms"] > 0
    assert "| one core |" in (tmp_path / "svd_contention.md").read_text() and (tmp_path / "svd_contention.png").exists()
