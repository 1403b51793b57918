"""experiments/bench/optim_fsdp.py: the sharded step sends less than the gathered one, and the
outputs are written."""

import json

from experiments.bench import optim_fsdp


def test_bench_writes_tables_and_sharded_steps_send_less(tmp_path, monkeypatch):
    monkeypatch.setattr(optim_fsdp, "METHODS", (("adamw", "adamw", {}), ("galore", "galore", {"rank": 16}),
                                                ("apollo", "apollo", {"rank": 16})))
    monkeypatch.setattr("sys.argv", ["optim_fsdp", "--out", str(tmp_path)])
    optim_fsdp.main()
    res = json.loads((tmp_path / "optim_fsdp.json").read_text())
    rows = {r["method"]: r for r in res["rows"]}
    assert rows["adamw"]["sharded"]["every_step"]["sent_bytes"] == 0
    for name in ("galore", "apollo"):
        every = rows[name]["sharded"]["every_step"]["sent_bytes"]
        assert 0 < every < rows[name]["gathered"]["every_step"]["sent_bytes"] / 4
    assert rows["galore"]["sharded"]["refresh_only"]["sent_bytes"] > 0           # the SVD's gather
    assert rows["apollo"]["sharded"]["refresh_only"]["sent_bytes"] == 0
    assert "| galore |" in (tmp_path / "optim_fsdp.md").read_text() and (tmp_path / "optim_fsdp.png").exists()
