"""Run logs: ``metrics.jsonl`` (one JSON object a line, appended across resumes) and a loss plot."""

from __future__ import annotations

import json
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


class MetricsWriter:
    def __init__(self, workdir: str):
        self.path = os.path.join(workdir, "metrics.jsonl")

    def write(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


def read_metrics(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_loss(metrics_path: str, out_path: str) -> None:
    """Training and validation loss against step; a resumed run's repeated steps keep the latest."""
    series: dict[str, dict[int, float]] = {"train": {}, "val": {}}
    for r in read_metrics(metrics_path):
        if r.get("split") in series and "loss" in r:
            series[r["split"]][int(r["step"])] = float(r["loss"])
    fig, ax = plt.subplots(figsize=(6, 4))
    for split, points in series.items():
        if points:
            steps = sorted(points)
            ax.plot(steps, [points[s] for s in steps], marker="o" if split == "val" else None, label=split)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats per byte)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_path, dpi=120)
    plt.close(fig)
