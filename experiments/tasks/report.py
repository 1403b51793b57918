"""Writing sweep results: a JSON file with the command that made it, and matplotlib plots."""

from __future__ import annotations

import json
import os
import platform
import sys
import time

import jax
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def write_results(out_dir: str, name: str, module: str, payload: dict) -> str:
    """Writes ``out_dir/name.json`` with the command line (``python -m module args``) and versions."""
    os.makedirs(out_dir, exist_ok=True)
    record = {
        "command": " ".join(["python -m", module] + sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "jax": jax.__version__, "platform": platform.platform(), "devices": str(jax.devices()),
        **payload,
    }
    path = os.path.join(out_dir, f"{name}.json")
    with open(path, "w") as f:
        json.dump(record, f, indent=2)
    return path


def line_plot(path: str, series: dict[str, tuple[list, list]], xlabel: str, ylabel: str, title: str,
              logx: bool = False) -> None:
    """One line per series; a series ``(xs, ys, errs)`` also draws ``±errs`` bars."""
    fig, ax = plt.subplots(figsize=(7.5, 4))
    for i, (label, values) in enumerate(series.items()):
        xs, ys, errs = (*values, None)[:3]
        # the colour cycle has ten entries: later series change marker and dash so none look alike
        style = {"marker": "os^D"[i // 10 % 4], "linestyle": ["-", "--", ":", "-."][i // 10 % 4]}
        ax.errorbar(xs, ys, yerr=errs, capsize=3 if errs is not None else 0, label=label, **style)
    if logx:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def bar_plot(path: str, labels: list[str], values: list[float], ylabel: str, title: str,
             baseline: tuple[str, float] | None = None) -> None:
    """One bar per label with its value written on top; ``baseline = (name, y)`` draws a dashed line."""
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    bars = ax.bar(labels, values)
    ax.bar_label(bars, fmt="%.3f", fontsize=8)
    if baseline is not None:
        ax.axhline(baseline[1], color="gray", linestyle="--", label=baseline[0])
        ax.legend(fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.tick_params(axis="x", labelrotation=30, labelsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
