"""Run logs: ``metrics.jsonl`` (one JSON object a line, appended across resumes), TensorBoard
event files beside it (through ``tensorboardX``) and a loss plot."""

from __future__ import annotations

import json
import math
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

# Keys of a record that are not scalars to chart.
_NOT_SCALARS = ("step", "split", "time")


class MetricsWriter:
    """Appends records to ``workdir/metrics.jsonl``; with ``tensorboard``, also writes each
    record's numbers as TensorBoard scalars ``<split>/<key>`` at its step, in event files
    (``events.out.tfevents.*``) in ``workdir``.

    ``purge_step`` (a resumed run's first new step) tells TensorBoard to drop what earlier event
    files hold from that step on, so a resumed run's repeated steps are not drawn twice.
    """

    def __init__(self, workdir: str, tensorboard: bool = False, purge_step: int | None = None):
        self.path = os.path.join(workdir, "metrics.jsonl")
        self.events = None
        if tensorboard:
            from tensorboardX import SummaryWriter

            self.events = SummaryWriter(workdir, purge_step=purge_step, flush_secs=10)

    def write(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.events is not None:
            split = record.get("split", "run")
            for key, value in record.items():
                if key not in _NOT_SCALARS and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.events.add_scalar(f"{split}/{key}", value, record["step"])

    def scalar(self, tag: str, value: float, step: int) -> None:
        """One TensorBoard scalar (not in ``metrics.jsonl``); nothing without TensorBoard."""
        if self.events is not None:
            self.events.add_scalar(tag, value, step)

    def text(self, tag: str, text: str, step: int) -> None:
        """A TensorBoard text entry (shown as Markdown); nothing without TensorBoard."""
        if self.events is not None:
            self.events.add_text(tag, text, step)

    def close(self) -> None:
        if self.events is not None:
            self.events.close()
            self.events = None


def last_records(path: str, up_to: int) -> dict[str, dict]:
    """The last record of each split at or before step ``up_to`` with a finite loss: what a
    resumed run knew at its checkpoint."""
    out: dict[str, dict] = {}
    for r in read_metrics(path):
        if r.get("step", up_to + 1) <= up_to and math.isfinite(r.get("loss", math.nan)):
            out[r.get("split", "")] = r
    return out


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
