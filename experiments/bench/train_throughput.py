"""Training throughput of ~350M-parameter language models, XLA against the kernel path, and the
compile time of scanned against unrolled layers.

    python -m experiments.bench.train_throughput                         # on a GPU/TPU: the full run (--budget-s)
    python -m experiments.bench.train_throughput --remat full            # ... another recomputation policy
    python -m experiments.bench.train_throughput --compile-depth         # ... then compile time against depth
    python -m experiments.bench.train_throughput --compile-depth-only    # compile time against depth alone (CPU too)
    python -m experiments.bench.train_throughput --quick --out /tmp/tt   # smoke run (the only run on CPU)
    python -m experiments.bench.train_throughput --describe              # parameters and FLOPs per family, no run

**Throughput.** One model per family, d_model 1024, 24 layers, 8 heads of 128, vocabulary 32000,
untied output head (about 370M to 395M parameters: the script counts and prints them), every
layer of one kind: ``gdn`` (E, Gated DeltaNet), ``gla`` (G), ``deltanet`` (D), ``retnet`` (R),
``linear_attn`` (L), ``softmax`` (S), and the hybrid ``gdn_softmax`` (pattern ``EEES``: three
Gated DeltaNet layers to one softmax layer).  The training step is the project's own
(``experiments/train_state.py``: next-token cross-entropy, ``jax.value_and_grad``, ``optax.adamw``,
the state donated), compute in bfloat16, parameters and AdamW moments in float32,
``scan_layers=True``, ``--remat`` (default ``dots``), the state created by
``lolax.parallelism.create_sharded`` on a one-device mesh.  Sequence lengths T = 2K, 8K and 32K
at a fixed ``--tokens-per-step`` (32768: B = 16, 4, 1).

Each cell (family, T) builds the same model twice, differing only in ``model.implementation``:

* ``xla``: ``implementation="xla"``, the pure XLA forms everywhere;
* ``kernels``: ``implementation=None``, the default: the Pallas kernels of the linear families
  and the vendor attention (cuDNN on CUDA GPUs, splash on TPUs) where the inputs suit them, the
  XLA forms otherwise (always on CPU).

For each it records the compile time (``lower`` then ``compile`` of the jitted step, in
seconds), which path actually ran (the custom calls of the lowered program: Triton or Mosaic
kernels, cuDNN fused attention; none means XLA throughout), XLA's memory analysis of the
compiled step (arguments + outputs - aliased (donated) + temporaries) and, on GPUs, the device's
``peak_bytes_in_use`` (process-wide, so after the first cell an upper bound).  The two compiled
steps are then warmed up and timed round-robin, the order alternating each round, for
``--reps`` rounds; the step time is the median, tokens/s = B T / step time, and MFU = model
FLOPs per token (``experiments/bench/flops.py``: 3x the forward products, no recomputation
counted) x tokens/s / the device's dense bf16 peak (:data:`PEAK_BF16_FLOPS`, keyed by
``device_kind``; unknown devices get no MFU).

Cells run most wanted first, while ``--budget-s`` lasts (a started cell finishes): the hybrid at
T = 8K (the goal cell: MFU >= 35 % and the kernel path >= 1.5x XLA's tokens/s), the hybrid and
softmax at T = 32K (goal: the hybrid >= 2x softmax's tokens/s), then every other family at 8K,
all at 2K, the rest at 32K.  A failure (out of memory, a compile error) is recorded in its cell
as ``null`` with the message, and the run goes on.  Outputs are rewritten after every cell, so a
run stopped by its budget or a time limit (SIGTERM) keeps what it measured.

**Compile time against depth** (``--compile-depth``): lower + compile of one training step on
abstract inputs (nothing allocated) for a model of ``--depth-layers`` (default 4, 8 and 24)
layers, scanned and unrolled (``scan_layers`` True / False), at a small width (d_model 256,
pattern ``EEES``, T = 256, B = 2, ``implementation="xla"`` so that no kernel compile cache
favours the configuration measured second), in wall-clock and in the process's CPU seconds.  One
unrecorded compile first warms the tracing caches of the ops.  A scanned model compiles one
repeat of the pattern whatever the depth (at 4 layers, one repeat, the scan has a single step);
an unrolled one compiles every layer.  This part is meaningful on a CPU too.

On CPU (and with ``--quick``) the throughput part runs a tiny configuration (d_model 64, 4
layers, T = 64 and 128 at 256 tokens per step, ``gdn_softmax`` and ``softmax``, 2 rounds): a
smoke test of this script, NOT a speed measurement.

Writes ``train_throughput.json``, ``train_throughput.md`` (tables: throughput, goals, compile
time against depth) and ``train_throughput.png`` (tokens/s against T per family and path) into
``--out``.
"""

from __future__ import annotations

# ruff: noqa: E402
# (the allocator setting below must precede the first import of jax)
import os

# Allocate on demand: several models share the device, and peak_bytes_in_use is only telling then.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import argparse
import dataclasses
import functools
import gc
import math
import re
import signal
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from experiments.bench.flops import abstract_model, count_params, train_flops_per_token
from experiments.bench.kernels import OutOfTime, Runner, environment, error_text, measure, ms_text, save_report
from experiments.train_state import init_state, make_train_step
from lolax.models import ModelConfig
from lolax.parallelism import create_sharded, make_mesh

FAMILIES = {"gdn": "E", "gla": "G", "deltanet": "D", "retnet": "R", "linear_attn": "L", "softmax": "S",
            "gdn_softmax": "EEES"}
"""Family name -> layer pattern (``models/config.py``)."""
HYBRID = "gdn_softmax"
IMPLS = {"xla": "xla", "kernels": None}
"""Benchmark name -> ``ModelConfig.implementation``."""

FULL_MODEL = {"vocab_size": 32000, "d_model": 1024, "num_layers": 24, "num_heads": 8, "head_dim": 128,
              "tie_embeddings": False, "chunk_size": 64}
FULL_SEQ_LENS = (2048, 8192, 32768)
FULL_TOKENS = 32768
GOAL_T, LONG_T = 8192, 32768

QUICK_MODEL = {"vocab_size": 256, "d_model": 64, "num_layers": 4, "num_heads": 2, "head_dim": 32,
               "tie_embeddings": False, "chunk_size": 64}
QUICK_SEQ_LENS = (64, 128)
QUICK_TOKENS = 256
QUICK_FAMILIES = (HYBRID, "softmax")

GOALS = {
    "hybrid_mfu": ("MFU of the kernel path, hybrid at the goal T", ">=", 0.35),
    "hybrid_kernels_vs_xla": ("tokens/s of the kernel path / XLA's, hybrid at the goal T", ">=", 1.5),
    "hybrid_vs_softmax_long": ("tokens/s of the hybrid / softmax's (kernel paths) at the long T", ">=", 2.0),
}
"""The issue's targets: name -> (what is compared, operator, threshold)."""

PEAK_BF16_FLOPS: tuple[tuple[str, float | None], ...] = (
    ("H200", 989e12), ("H100 PCIe", 756e12), ("H100 NVL", None), ("H100", 989e12), ("A100", 312e12),
    ("TPU v4", 275e12), ("TPU v5 lite", 197e12), ("TPU v5e", 197e12), ("TPU v5p", 459e12), ("TPU v5", 459e12),
    ("TPU v6 lite", 918e12), ("TPU v6e", 918e12),
)
"""Dense bf16 peak FLOP/s by a substring of ``jax.devices()[0].device_kind``, first match wins
(H100 SXM and H200 share one figure; an entry of None means "known, but no figure here")."""

KERNEL_CALL = re.compile(r"triton|mosaic|tpu_custom_call|cudnn\$fmha", re.IGNORECASE)
"""Custom-call targets that mean a kernel ran instead of XLA's own code (Pallas on Triton or
Mosaic, cuDNN's fused attention); cuBLAS matmuls are XLA's own choice and do not count."""

DEPTH_DEFAULTS = {"d_model": 256, "num_heads": 4, "pattern": "EEES", "layers": (4, 8, 24), "seq_len": 256,
                  "batch": 2, "vocab_size": 256}


@dataclasses.dataclass(frozen=True)
class Cell:
    """One measurement: a family at sequence length T, batch B; ``group`` is ``"goal"``,
    ``"sweep"`` or ``"smoke"``."""

    family: str
    T: int
    B: int
    group: str


def peak_flops(device_kind: str) -> tuple[float | None, str | None]:
    """``(dense bf16 peak FLOP/s or None, the table entry that matched or None)``.

    >>> peak_flops("NVIDIA H100 PCIe")
    (756000000000000.0, 'H100 PCIe')
    >>> peak_flops("cpu")
    (None, None)
    """
    kind = device_kind.lower()
    for key, value in PEAK_BF16_FLOPS:
        if key.lower() in kind:
            return value, key
    return None, None


def plan_cells(families: tuple[str, ...], seq_lens: tuple[int, ...], tokens: int, quick: bool) -> list[Cell]:
    """The cells in the order they are run: the goal cells first, then the rest (see the module
    docstring).  In a quick run the goal T is the shortest and the long T the longest."""
    seq_lens = tuple(sorted(set(seq_lens)))
    goal_t, long_t = goal_lengths(seq_lens, quick)
    batch = lambda T: max(1, tokens // T)
    group = "smoke" if quick else "goal"
    order: list[tuple[str, int, str]] = []
    if HYBRID in families:
        order.append((HYBRID, goal_t, group))
        order.append((HYBRID, long_t, group))
    if "softmax" in families:
        order.append(("softmax", long_t, group))
    rest = [goal_t] + [T for T in seq_lens if T not in (goal_t, long_t)] + [long_t]
    for T in rest:
        for family in families:
            order.append((family, T, "smoke" if quick else "sweep"))
    cells, seen = [], set()
    for family, T, g in order:
        if (family, T) not in seen:
            seen.add((family, T))
            cells.append(Cell(family, T, batch(T), g))
    return cells


def goal_lengths(seq_lens: tuple[int, ...], quick: bool) -> tuple[int, int]:
    """``(goal T, long T)``: 8K and 32K when measured, else the shortest and the longest."""
    seq_lens = tuple(sorted(set(seq_lens)))
    goal_t = GOAL_T if GOAL_T in seq_lens and not quick else seq_lens[0]
    long_t = LONG_T if LONG_T in seq_lens and not quick else seq_lens[-1]
    return goal_t, long_t


def model_config(base: dict, family: str, implementation: str | None, remat: str,
                 scan_layers: bool = True) -> ModelConfig:
    """bf16 compute, float32 parameters, the family's pattern."""
    return ModelConfig(pattern=FAMILIES.get(family, family), implementation=implementation, remat=remat,
                       scan_layers=scan_layers, dtype="bfloat16", param_dtype="float32", **base)


def optimizer() -> optax.GradientTransformation:
    """AdamW with float32 moments (the parameters' dtype)."""
    return optax.adamw(1e-4, b1=0.9, b2=0.95, weight_decay=0.1)


def abstract_state(cfg: ModelConfig, tx: optax.GradientTransformation, seed: int = 0):
    """``(graphdef, TrainState of jax.ShapeDtypeStruct)``: the training state's shapes, nothing allocated."""
    box = {}

    def state_only():
        box["graphdef"], state = init_state(cfg, tx, seed)
        return state

    state = jax.eval_shape(state_only)
    return box["graphdef"], state


@functools.lru_cache(maxsize=32)
def cached_abstract_model(cfg: ModelConfig):
    """``flops.abstract_model(cfg)``, built once per config (a few seconds at 350M parameters)."""
    return abstract_model(cfg)


def graphdef_of(cfg: ModelConfig):
    """The model's graph definition (it carries the config, hence ``implementation``)."""
    return nnx.split(cached_abstract_model(cfg), nnx.Param)[0]


def family_params(family: str, base: dict, remat: str, counts: dict[str, int]) -> int:
    """The parameter count of a family's model (printed the first time)."""
    if family not in counts:
        counts[family] = n = count_params(cached_abstract_model(model_config(base, family, None, remat)))
        print(f"{family} ({FAMILIES[family]}): {n:,} parameters ({n / 1e6:.1f}M)", flush=True)
    return counts[family]


def token_batch(B: int, T: int, vocab: int, seed: int = 0) -> dict[str, jax.Array]:
    tokens = jax.random.randint(jax.random.key(seed), (B, T + 1), 0, vocab, jnp.int32)
    return jax.block_until_ready({"inputs": tokens[:, :-1], "targets": tokens[:, 1:]})


def kernel_calls(program_text: str) -> dict[str, int]:
    """Custom-call targets in a lowered (StableHLO) or compiled (HLO) program, with their counts,
    limited to those of :data:`KERNEL_CALL`."""
    targets = re.findall(r"custom_call @([\w$.\-]+)", program_text)
    targets += re.findall(r'custom_call_target="([^"]+)"', program_text)
    out: dict[str, int] = {}
    for t in targets:
        if KERNEL_CALL.search(t):
            out[t] = out.get(t, 0) + 1
    return out


def memory_record(compiled) -> dict[str, Any]:
    """XLA's memory analysis of a compiled step; ``total_bytes`` = arguments + outputs - aliased
    (donated outputs reuse their arguments' buffers) + temporaries."""
    try:
        m = compiled.memory_analysis()
    except Exception as e:  # noqa: BLE001 - not every backend implements it
        return {"error": error_text(e)}
    if m is None:
        return {"error": "memory_analysis() returned None"}
    rec = {name: int(getattr(m, f"{name}_size_in_bytes", 0) or 0) for name in ("argument", "output", "alias", "temp")}
    rec = {f"{k}_bytes": v for k, v in rec.items()}
    rec["total_bytes"] = rec["argument_bytes"] + rec["output_bytes"] - rec["alias_bytes"] + rec["temp_bytes"]
    return rec


def device_peak_bytes() -> int | None:
    """The process's ``peak_bytes_in_use`` on the first device (GPUs; None where not reported)."""
    try:
        stats = jax.devices()[0].memory_stats()
    except Exception:  # noqa: BLE001
        return None
    return None if not stats else stats.get("peak_bytes_in_use")


def _empty_stats(error: str | None = None) -> dict[str, Any]:
    return {"median_s": None, "best_s": None, "samples_s": [], "inner": None, "first_call_s": None,
            "error": error}


class StateCache:
    """The initial training state of the last family built (parameters do not depend on T or on
    ``implementation``), so consecutive cells of one family initialise once.  Runners get copies:
    the steps donate their state."""

    def __init__(self):
        self.key, self.value = None, None

    def get(self, key, build: Callable[[], Any]):
        if key != self.key:
            self.key, self.value = None, None
            gc.collect()
            self.value, self.key = build(), key
        return self.value

    def clear(self):
        self.key, self.value = None, None
        gc.collect()


def init_sharded_state(cfg: ModelConfig, tx, seed: int):
    """The training state created by ``create_sharded`` on a one-device mesh (as the trainer does)."""
    mesh = make_mesh({"data": 1}, devices=jax.devices()[:1])
    _, state, _ = create_sharded(lambda: init_state(cfg, tx, seed), mesh)
    return jax.block_until_ready(state)


def build_runner(cfg: ModelConfig, tx, template, batch) -> tuple[Runner, dict[str, Any]]:
    """Compiles the training step of ``cfg`` on a copy of ``template``; returns the runner (one
    step per call) and what was learnt compiling it."""
    step = make_train_step(graphdef_of(cfg), tx, donate=True)
    holder = {"state": jax.block_until_ready(jax.tree.map(jnp.copy, template))}
    t0 = time.perf_counter()
    lowered = step.lower(holder["state"], batch)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    calls = kernel_calls(lowered.as_text())
    info = {"lower_s": t1 - t0, "compile_s": t2 - t1, "lower_compile_s": t2 - t0,
            "path": {"ran": "kernels" if calls else "xla", "kernel_calls": calls},
            "memory": memory_record(compiled)}

    def call():
        holder["state"], metrics = compiled(holder["state"], batch)
        return metrics["loss"]

    return Runner(call=call, wait=jax.block_until_ready), info


def run_cell(cell: Cell, base: dict, impls: tuple[str, ...], args, cache: StateCache, peak: float | None) -> dict:
    """Builds both implementations of a cell, times them interleaved, returns the cell's record."""
    tx = optimizer()
    cfgs = {name: model_config(base, cell.family, IMPLS[name], args.remat) for name in impls}
    flops = train_flops_per_token(cfgs[impls[0]], cell.T)
    record: dict[str, Any] = {"family": cell.family, "pattern": FAMILIES[cell.family], "T": cell.T, "B": cell.B,
                              "tokens_per_step": cell.B * cell.T, "group": cell.group,
                              "params": family_params(cell.family, base, args.remat, args.param_counts),
                              "flops_per_token": flops,
                              "impls": {}, "kernels_vs_xla": None}
    runners: dict[str, Runner] = {}
    infos: dict[str, dict] = {name: {} for name in impls}
    errors: dict[str, str] = {}
    try:
        template = cache.get((cell.family, args.remat), lambda: init_sharded_state(cfgs[impls[0]], tx, args.seed))
        batch = token_batch(cell.B, cell.T, base["vocab_size"], args.seed)
    except OutOfTime:
        raise
    except Exception as e:  # noqa: BLE001 - out of memory at initialisation: every implementation fails
        cache.clear()
        errors = {name: f"initialisation: {error_text(e)}" for name in impls}
        template = batch = None
    if template is not None:
        for name in impls:
            try:
                runners[name], infos[name] = build_runner(cfgs[name], tx, template, batch)
            except OutOfTime:
                raise
            except Exception as e:  # noqa: BLE001 - compile error, out of memory: record it
                errors[name] = f"compile: {error_text(e)}"
                gc.collect()
    stats = measure(runners, args.reps, 0.0, math.inf) if runners else {}
    for name in impls:
        s = stats.get(name) or _empty_stats(errors.get(name))
        s = {**s, **infos[name]}
        tps = cell.B * cell.T / s["median_s"] if s["median_s"] else None
        s["tokens_per_s"] = tps
        s["mfu"] = flops["total"] * tps / peak if tps and peak else None
        s["device_peak_bytes"] = device_peak_bytes()
        record["impls"][name] = s
    tps = {name: record["impls"][name]["tokens_per_s"] for name in impls}
    if tps.get("kernels") and tps.get("xla"):
        record["kernels_vs_xla"] = tps["kernels"] / tps["xla"]
    del runners, template, batch
    gc.collect()
    return record


def _cell(cells: list[dict], family: str, T: int) -> dict | None:
    match = [c for c in cells if c["family"] == family and c["T"] == T]
    return match[0] if match else None


def goal_summary(cells: list[dict], goal_t: int, long_t: int, evaluated: bool) -> dict[str, Any]:
    """The goal values from the measured cells and whether each is met (None when not measured,
    or in a smoke run)."""
    hybrid, hybrid_long, soft_long = _cell(cells, HYBRID, goal_t), _cell(cells, HYBRID, long_t), _cell(
        cells, "softmax", long_t)
    get = lambda c, impl, key: None if c is None else (c["impls"].get(impl) or {}).get(key)
    div = lambda a, b: a / b if a and b else None
    values = {
        "hybrid_mfu": get(hybrid, "kernels", "mfu"),
        "hybrid_kernels_vs_xla": None if hybrid is None else hybrid["kernels_vs_xla"],
        "hybrid_vs_softmax_long": div(get(hybrid_long, "kernels", "tokens_per_s"),
                                      get(soft_long, "kernels", "tokens_per_s")),
    }
    xla_long = div(get(hybrid_long, "xla", "tokens_per_s"), get(soft_long, "xla", "tokens_per_s"))
    out: dict[str, Any] = {"goal_T": goal_t, "long_T": long_t, "evaluated": evaluated, "goals": {},
                           "hybrid_vs_softmax_long_xla": xla_long}
    for name, (what, op, target) in GOALS.items():
        v = values[name]
        met = None if v is None or not evaluated else (v >= target if op == ">=" else v <= target)
        out["goals"][name] = {"what": what, "target": f"{op} {target}", "value": v, "met": met}
    return out


# ------------------------------------------------------------------------------------------------
# Compile time against depth
# ------------------------------------------------------------------------------------------------

def lower_compile_time(cfg: ModelConfig, seq_len: int, batch: int) -> dict[str, float]:
    """``{"lower_s", "compile_s", "cpu_s"}`` of one training step of ``cfg`` on abstract inputs:
    wall-clock seconds of the lowering and of the compile, and the process's CPU seconds for both
    (steadier than wall-clock time on a shared machine)."""
    tx = optimizer()
    graphdef, state = abstract_state(cfg, tx)
    tokens = jax.ShapeDtypeStruct((batch, seq_len), jnp.int32)
    step = make_train_step(graphdef, tx, donate=True)
    c0, t0 = time.process_time(), time.perf_counter()
    lowered = step.lower(state, {"inputs": tokens, "targets": tokens})
    t1 = time.perf_counter()
    lowered.compile()
    return {"lower_s": t1 - t0, "compile_s": time.perf_counter() - t1, "cpu_s": time.process_time() - c0}


def compile_depth(d_model: int = DEPTH_DEFAULTS["d_model"], num_heads: int = DEPTH_DEFAULTS["num_heads"],
                  pattern: str = DEPTH_DEFAULTS["pattern"], layers: tuple[int, ...] = DEPTH_DEFAULTS["layers"],
                  seq_len: int = DEPTH_DEFAULTS["seq_len"], batch: int = DEPTH_DEFAULTS["batch"],
                  vocab_size: int = DEPTH_DEFAULTS["vocab_size"], remat: str = "dots",
                  implementation: str | None = "xla", warmup: bool = True, deadline: float = math.inf,
                  record: dict | None = None) -> dict:
    """Lower + compile time of one training step, scanned and unrolled, at each depth of ``layers``.

    Returns ``{"config", "rows": [{"layers", "scan_layers", "lower_s", "compile_s", "total_s",
    "cpu_s", "error"}], "ratios"}`` with the ratios (of ``total_s``) unrolled / scanned at each
    depth and, for each form, each depth / the shallowest (None where a row failed or was not
    run).  With a pattern of p layers, a depth of p is one repeat: a scan of one step, which XLA
    may simplify away, so the deeper scanned rows are the ones to compare with each other.
    ``record``, when given, is filled as the rows are measured (and returned), so that a run
    stopped half-way keeps them."""
    base = {"vocab_size": vocab_size, "d_model": d_model, "num_heads": num_heads, "tie_embeddings": False}
    make = lambda n, scan: ModelConfig(pattern=pattern, num_layers=n, implementation=implementation, remat=remat,
                                       scan_layers=scan, dtype="bfloat16", param_dtype="float32", **base)
    config = {**base, "pattern": pattern, "layers": list(layers), "seq_len": seq_len, "batch": batch,
              "remat": remat, "implementation": implementation, "dtype": "bfloat16", "warmup": warmup}
    out = {} if record is None else record
    rows: list[dict] = []
    out.update(config=config, rows=rows, ratios={})
    if warmup:                                     # tracing caches of the ops: paid once, by nobody
        lower_compile_time(make(min(layers), True), seq_len, batch)
    for n in layers:
        for scan in (True, False):
            row = {"layers": n, "scan_layers": scan, "lower_s": None, "compile_s": None, "total_s": None,
                   "cpu_s": None, "error": None}
            if time.monotonic() > deadline:
                row["error"] = "skipped: budget spent"
            else:
                try:
                    row.update(lower_compile_time(make(n, scan), seq_len, batch))
                    row["total_s"] = row["lower_s"] + row["compile_s"]
                except OutOfTime:
                    raise
                except Exception as e:  # noqa: BLE001
                    row["error"] = error_text(e)
            rows.append(row)
            print(f"compile depth: {n} layers, {'scanned' if scan else 'unrolled'}: "
                  + (f"lower {row['lower_s']:.1f} s, compile {row['compile_s']:.1f} s, CPU {row['cpu_s']:.1f} s"
                     if row["total_s"] else str(row["error"])), flush=True)
            gc.collect()
    total = {(r["layers"], r["scan_layers"]): r["total_s"] for r in rows}
    div = lambda a, b: a / b if a and b else None
    lo = min(layers)
    ratios = out["ratios"]
    ratios.update({f"unrolled/scanned at {n} layers": div(total.get((n, False)), total.get((n, True)))
                   for n in layers})
    for scan, form in ((True, "scanned"), (False, "unrolled")):
        for n in layers:
            if n != lo:
                ratios[f"{form} {n}/{lo} layers"] = div(total.get((n, scan)), total.get((lo, scan)))
    return out


# ------------------------------------------------------------------------------------------------
# Outputs
# ------------------------------------------------------------------------------------------------

def _fmt(v: float | None, digits: int = 3) -> str:
    return "-" if v is None else f"{v:.{digits}g}"


def _gib(b: int | None) -> str:
    return "-" if not b else f"{b / 2**30:.2f}"


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}%"


def format_tables(report: dict) -> str:
    """The markdown of ``train_throughput.md``: a header, the goals, the throughput table, the
    failures, the compile-depth table."""
    env = report["environment"]
    lines = [f"# Training throughput ({env['device']}, {env['backend']})", ""]
    if not report["throughput_run"]:
        lines = [f"# Compile time against depth ({env['device']}, {env['backend']})", "",
                 f"jax {env['jax']}, jaxlib {env['jaxlib']}, {env['cpus']} CPUs."]
        return "\n".join(lines + _depth_lines(report.get("compile_depth"))) + "\n"
    if report["smoke_test"]:
        lines += ["**Smoke test (tiny models on a tiny batch): these times are NOT a speed measurement.**", ""]
    peak = report["peak_flops"]
    peak_text = (f"{peak['value'] / 1e12:.0f} TFLOP/s ({peak['entry']})" if peak["value"]
                 else "unknown for this device (no MFU)")
    c = report["config"]
    lines += [f"jax {env['jax']}, jaxlib {env['jaxlib']}; model d_model {c['model']['d_model']}, "
              f"{c['model']['num_layers']} layers, {c['model']['num_heads']} heads of {c['model']['head_dim']}, "
              f"vocabulary {c['model']['vocab_size']}; {c['dtype']} compute, {c['param_dtype']} parameters and "
              f"AdamW moments, scan_layers={c['scan_layers']}, remat={c['remat']}; {c['tokens_per_step']} tokens "
              f"per step; medians of {report['timing']['reps']} interleaved steps; dense bf16 peak {peak_text}. "
              "`xla` = implementation='xla', `kernels` = implementation=None (the default path); `path` = what the "
              "kernel path's program actually calls.", ""]
    g = report["goals"]
    lines += [f"Goals (goal T = {g['goal_T']}, long T = {g['long_T']})"
              + ("" if g["evaluated"] else " - not evaluated in a smoke test") + ":", "",
              "| goal | compares | target | value | met |", "|---|---|---|---|---|"]
    for name, goal in g["goals"].items():
        met = "-" if goal["met"] is None else ("yes" if goal["met"] else "no")
        lines.append(f"| {name} | {goal['what']} | {goal['target']} | {_fmt(goal['value'])} | {met} |")
    lines += ["", "| family | params | T | B | compile s xla / kernels | step ms xla | step ms kernels | "
              "tokens/s xla | tokens/s kernels | kernels/xla | MFU xla | MFU kernels | path (kernels) | "
              "memory GiB xla / kernels | device peak GiB |",
              "|---" * 15 + "|"]
    errors = []
    for cell in report["cells"]:
        x, k = cell["impls"].get("xla") or {}, cell["impls"].get("kernels") or {}
        for name, s in cell["impls"].items():
            if s.get("error"):
                errors.append(f"- {cell['family']} T={cell['T']} {name}: {s['error']}")
        path = k.get("path") or {}
        path_text = "-" if not path else (path["ran"] + (" (" + ", ".join(
            f"{t} x{n}" for t, n in path["kernel_calls"].items()) + ")" if path["kernel_calls"] else ""))
        params = "-" if cell["params"] is None else f"{cell['params'] / 1e6:.1f}M"
        compile_text = f"{_fmt(x.get('lower_compile_s'))} / {_fmt(k.get('lower_compile_s'))}"
        mem = " / ".join(_gib((s.get("memory") or {}).get("total_bytes")) for s in (x, k))
        peak_dev = max([b for b in (x.get("device_peak_bytes"), k.get("device_peak_bytes")) if b] or [0])
        lines.append(f"| {cell['family']} | {params} | {cell['T']} | {cell['B']} | {compile_text} | "
                     f"{ms_text(x.get('median_s'))} | {ms_text(k.get('median_s'))} | {_fmt(x.get('tokens_per_s'))} | "
                     f"{_fmt(k.get('tokens_per_s'))} | {_fmt(cell['kernels_vs_xla'])} | {_pct(x.get('mfu'))} | "
                     f"{_pct(k.get('mfu'))} | {path_text} | {mem} | {_gib(peak_dev)} |")
    if report["interrupted"]:
        lines += ["", f"Stopped by a signal (a time limit) after {report['elapsed_s']:.0f} s: the cells above are the "
                  "ones that finished."]
    if report["skipped_cells"]:
        lines += ["", f"Not run (budget of {report['budget_s']:.0f} s spent): "
                  + ", ".join(f"{s['family']} T={s['T']}" for s in report["skipped_cells"]) + "."]
    if errors:
        lines += ["", "Failures:", ""] + errors
    lines += ["", "Memory: XLA's analysis of the compiled step (arguments + outputs - donated + temporaries); "
              "device peak: the process's peak_bytes_in_use so far (GPUs)."]
    return "\n".join(lines + _depth_lines(report.get("compile_depth"))) + "\n"


def _depth_lines(depth: dict | None) -> list[str]:
    """The compile-depth table (empty without that section)."""
    if not depth:
        return []
    cfg = depth["config"]
    lines = ["", f"Compile time of one training step against depth (d_model {cfg['d_model']}, pattern "
             f"{cfg['pattern']}, T = {cfg['seq_len']}, B = {cfg['batch']}, remat {cfg['remat']}, implementation "
             f"{cfg['implementation']}): lower + compile wall-clock seconds (lower; the process's CPU seconds):",
             "", "| layers | scanned | unrolled | unrolled / scanned |", "|---|---|---|---|"]
    rows = {(r["layers"], r["scan_layers"]): r for r in depth["rows"]}
    for n in cfg["layers"]:
        cells = []
        for scan in (True, False):
            r = rows.get((n, scan))
            cells.append("-" if r is None else (f"err ({r['error'][:60]})" if r["total_s"] is None else
                                                f"{r['total_s']:.1f} ({r['lower_s']:.1f}; CPU {r['cpu_s']:.1f})"))
        ratio = depth["ratios"].get(f"unrolled/scanned at {n} layers")
        lines.append(f"| {n} | {cells[0]} | {cells[1]} | {_fmt(ratio)} |")
    lines += [""] + [f"- {k}: {_fmt(v)}" for k, v in depth["ratios"].items() if "/scanned at" not in k]
    return lines



def plot(report: dict, path: str) -> None:
    """Tokens/s against T (log-log) per family: the kernel path solid, XLA dashed."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, family in enumerate(report["families"]):
        for impl, style in (("kernels", "-o"), ("xla", "--s")):
            pts = sorted((c["T"], c["impls"][impl]["tokens_per_s"]) for c in report["cells"]
                         if c["family"] == family and impl in c["impls"] and c["impls"][impl]["tokens_per_s"])
            if pts:
                ax.loglog(*zip(*pts), style, color=colors[i % len(colors)], label=f"{family} {impl}", markersize=4)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("T (tokens per sequence)")
    ax.set_ylabel("tokens / s (median step)")
    smoke = " - smoke test, NOT a speed measurement" if report["smoke_test"] else ""
    ax.set_title(f"{report['environment']['device']}: training throughput, kernel path vs XLA{smoke}", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_outputs(report: dict, out_dir: str, with_plot: bool = True) -> None:
    save_report(report, out_dir, "train_throughput", format_tables, plot, with_plot)


# ------------------------------------------------------------------------------------------------
# The run
# ------------------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny smoke configuration (the only run on CPU)")
    p.add_argument("--out", default="docs/results", help="output directory")
    p.add_argument("--budget-s", type=float, default=300.0,
                   help="wall-clock budget: no new cell starts after it (outputs are still written)")
    p.add_argument("--families", nargs="+", choices=tuple(FAMILIES), default=None,
                   help="default: all seven (quick: gdn_softmax softmax)")
    p.add_argument("--seq-lens", type=int, nargs="+", default=None, help="default 2048 8192 32768 (quick: 64 128)")
    p.add_argument("--tokens-per-step", type=int, default=None, help="B = this / T (default 32768; quick 256)")
    p.add_argument("--impls", nargs="+", choices=tuple(IMPLS), default=list(IMPLS))
    p.add_argument("--remat", choices=("none", "dots", "full"), default="dots")
    p.add_argument("--reps", type=int, default=None, help="timed rounds per cell (default 5; quick 2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--describe", action="store_true",
                   help="print each family's parameter count and FLOPs per token (full-size models) and exit")
    p.add_argument("--compile-depth", action="store_true",
                   help="also time the compile of scanned vs unrolled layers (after the throughput cells)")
    p.add_argument("--compile-depth-only", action="store_true", help="only the compile-depth section")
    p.add_argument("--depth-d-model", type=int, default=DEPTH_DEFAULTS["d_model"])
    p.add_argument("--depth-heads", type=int, default=DEPTH_DEFAULTS["num_heads"])
    p.add_argument("--depth-pattern", default=DEPTH_DEFAULTS["pattern"])
    p.add_argument("--depth-layers", type=int, nargs="+", default=list(DEPTH_DEFAULTS["layers"]))
    p.add_argument("--depth-seq-len", type=int, default=DEPTH_DEFAULTS["seq_len"])
    p.add_argument("--depth-batch", type=int, default=DEPTH_DEFAULTS["batch"])
    p.add_argument("--no-depth-warmup", action="store_true", help="skip the unrecorded warm-up compile")
    return p.parse_args(argv)


def run(argv: list[str] | None = None) -> dict:
    """Runs the benchmark and writes its outputs; returns the report (the JSON's content)."""
    args = parse_args(argv)
    start = time.monotonic()
    deadline = start + args.budget_s
    backend = jax.default_backend()
    quick = args.quick or backend == "cpu"
    throughput = not args.compile_depth_only
    base = dict(QUICK_MODEL if quick else FULL_MODEL)
    families = tuple(args.families or (QUICK_FAMILIES if quick else FAMILIES))
    seq_lens = tuple(sorted(set(args.seq_lens or (QUICK_SEQ_LENS if quick else FULL_SEQ_LENS))))
    tokens = args.tokens_per_step or (QUICK_TOKENS if quick else FULL_TOKENS)
    impls = tuple(i for i in IMPLS if i in args.impls)
    args.reps = args.reps or (2 if quick else 5)
    env = environment(backend, {"available": False, "version": None, "import": None,
                                "error": "not used by this benchmark"})
    peak, entry = peak_flops(env["device"])
    goal_t, long_t = goal_lengths(seq_lens, quick)
    args.param_counts = {}                         # filled as the families are first measured
    cells_todo = plan_cells(families, seq_lens, tokens, quick) if throughput else []
    report: dict[str, Any] = {
        "smoke_test": quick and throughput,
        "note": ("compile time against depth only" if not throughput else
                 "smoke test: tiny models on a tiny batch, NOT a speed measurement" if quick else
                 "times in seconds; tokens/s = B T / median step time; MFU = model FLOPs per token x tokens/s / "
                 "dense bf16 peak"),
        "quick": quick, "command": "python -m experiments.bench.train_throughput " + " ".join(
            argv if argv is not None else sys.argv[1:]),
        "environment": env, "peak_flops": {"value": peak, "entry": entry, "table": dict(PEAK_BF16_FLOPS)},
        "config": {"model": base, "dtype": "bfloat16", "param_dtype": "float32", "scan_layers": True,
                   "remat": args.remat, "tokens_per_step": tokens, "seq_lens": list(seq_lens),
                   "optimizer": "optax.adamw(1e-4, b1=0.9, b2=0.95, weight_decay=0.1), float32 moments",
                   "flops": "experiments/bench/flops.py train_flops_per_token: 3x forward products, no remat"},
        "families": {f: {"pattern": FAMILIES[f], "params": args.param_counts.get(f)} for f in families},
        "impls": {name: IMPLS[name] for name in impls},
        "timing": {"reps": args.reps, "statistic": "median of interleaved steps (order alternating each round)"},
        "budget_s": args.budget_s, "elapsed_s": 0.0, "budget_exhausted": False, "interrupted": False,
        "throughput_run": throughput, "cells": [], "skipped_cells": [],
        "goals": goal_summary([], goal_t, long_t, not quick), "compile_depth": None,
    }

    def on_term(signum, frame):
        raise OutOfTime()

    previous = signal.signal(signal.SIGTERM, on_term) if hasattr(signal, "SIGTERM") else None
    last_plot = time.monotonic()
    cache = StateCache()
    try:
        for cell in cells_todo:
            if time.monotonic() > deadline:
                report["budget_exhausted"] = True
                report["skipped_cells"].append(dataclasses.asdict(cell))
                continue
            t0 = time.monotonic()
            record = run_cell(cell, base, impls, args, cache, peak)
            record["elapsed_s"] = time.monotonic() - t0
            report["cells"].append(record)
            report["families"][cell.family]["params"] = record["params"]
            print(f"{cell.family} T={cell.T} B={cell.B}: " + ", ".join(
                f"{name} {ms_text(s['median_s'])} ms, {_fmt(s['tokens_per_s'])} tok/s, MFU {_pct(s['mfu'])}, "
                f"compile {_fmt(s.get('lower_compile_s'))} s, path {(s.get('path') or {}).get('ran', '-')}"
                + (f" ({s['error'][:100]})" if s["error"] else "")
                for name, s in record["impls"].items()) + f"  [{record['elapsed_s']:.0f} s]", flush=True)
            report["goals"] = goal_summary(report["cells"], goal_t, long_t, not quick)
            report["elapsed_s"] = time.monotonic() - start
            plot_now = time.monotonic() - last_plot > 30
            write_outputs(report, args.out, with_plot=plot_now)
            last_plot = time.monotonic() if plot_now else last_plot
        cache.clear()
        if args.compile_depth or args.compile_depth_only:
            if throughput and time.monotonic() > deadline:
                report["budget_exhausted"] = True
                report["compile_depth"] = None
                print("compile depth: skipped, budget spent", flush=True)
            else:
                report["compile_depth"] = {}
                compile_depth(args.depth_d_model, args.depth_heads, args.depth_pattern, tuple(args.depth_layers),
                              args.depth_seq_len, args.depth_batch, remat=args.remat,
                              warmup=not args.no_depth_warmup, deadline=deadline if throughput else math.inf,
                              record=report["compile_depth"])
    except (OutOfTime, KeyboardInterrupt):
        report["interrupted"] = True
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    report["goals"] = goal_summary(report["cells"], goal_t, long_t, not quick)
    report["elapsed_s"] = time.monotonic() - start
    write_outputs(report, args.out)
    return report


def describe(families: tuple[str, ...] = tuple(FAMILIES), seq_lens: tuple[int, ...] = FULL_SEQ_LENS,
             base: dict | None = None, remat: str = "dots") -> str:
    """A markdown table of each family's parameter count and training FLOPs per token (nothing
    compiled or allocated)."""
    base = FULL_MODEL if base is None else base
    lines = ["| family | pattern | parameters | " + " | ".join(f"GFLOP/token T={T} (mixer)" for T in seq_lens) + " |",
             "|---" * (3 + len(seq_lens)) + "|"]
    for family in families:
        cfg = model_config(base, family, None, remat)
        n = count_params(cached_abstract_model(cfg))
        f = [train_flops_per_token(cfg, T) for T in seq_lens]
        lines.append(f"| {family} | {FAMILIES[family]} | {n:,} ({n / 1e6:.1f}M) | "
                     + " | ".join(f"{x['total'] / 1e9:.3f} ({x['mixer'] / 1e9:.3f})" for x in f) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.describe:
        print(describe(tuple(args.families or FAMILIES), tuple(args.seq_lens or FULL_SEQ_LENS), remat=args.remat))
        return
    report = run(argv)
    with open(os.path.join(parse_args(argv).out, "train_throughput.md")) as fh:
        print(fh.read())
    if report["smoke_test"] and report["throughput_run"]:
        print("(smoke test: not a speed measurement)")


if __name__ == "__main__":
    main()
