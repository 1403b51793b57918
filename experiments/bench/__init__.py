"""Benchmarks: ops (sequence mixers), kernels (the Pallas kernels on a GPU), optimizer step time and memory."""

import json
import os
from typing import Callable


def write_outputs(out_dir: str, name: str, result: dict, markdown: Callable[[dict], str],
                  plot: Callable[[dict, str], None]) -> str:
    """Writes ``out_dir/name.{json,md,png}`` of a benchmark's ``result``; returns the markdown."""
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, f"{name}.json"), "w") as f:
        json.dump(result, f, indent=1)
    text = markdown(result)
    with open(os.path.join(out_dir, f"{name}.md"), "w") as f:
        f.write(text)
    plot(result, os.path.join(out_dir, f"{name}.png"))
    return text
