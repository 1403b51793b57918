"""Benchmark of the Pallas kernels of the chunk ops (diagonal decays and delta rules) against the
XLA chunk form, flash-linear-attention's Triton kernels and cuDNN softmax attention.

    python -m experiments.bench.kernels                          # on a GPU: the full run (--budget-s, ~5 min)
    python -m experiments.bench.kernels --tuning-sweep           # ... plus a sweep of the launch choices
    python -m experiments.bench.kernels --quick --out /tmp/bench  # smoke run (the only run on CPU)

On a GPU it times, in one process, forward and forward+backward in bf16 (float32 log gates) for
``chunk_gated_delta_rule``, ``chunk_gla``, ``chunk_simple_gla``, ``chunk_delta_rule`` and
``chunk_linear_attn`` (unnormalised; ``--families`` picks some), the delta rules with
``use_qk_l2norm_in_kernel=True`` and a bf16 step ``beta = sigmoid(x)``, through

* ``pallas``: lolax's kernels (``implementation="pallas"``, launch choices of ``DEFAULT_TUNING``);
* ``xla``: lolax's XLA chunk form (``implementation="xla"``);
* ``fla``: flash-linear-attention's Triton kernels (``fla.ops``, PyTorch CUDA tensors of the same
  values), when ``fla`` imports;
* ``cudnn``: causal softmax attention, ``jax.nn.dot_product_attention(..., implementation="cudnn")``
  (the same for every family: the quadratic baseline).

Shapes ``(B, T, H, D)`` (K = V = D), in this order, while the ``--budget-s`` lasts:
(2, 16384, 16, 128) forward+backward and forward (the goal shape), (8, 1024, 8, 64) both,
(1, 8192, 96, 128) forward, then forward+backward at B = 1, H = 16, D = 128 for T = 1K ... 64K.
Within a cell (family, shape, pass) every implementation is compiled and warmed up, then timed
round-robin (the order rotating each round) for ``--reps`` rounds; a sample is enough back-to-back
calls to last about ``--sample-ms``, between device synchronisations, divided by their count. The
tables report the median sample (the JSON also keeps the best and all samples); ratios are of
medians, ``a/b = time(a) / time(b)``. A failure (out of memory, an unsupported shape, a compile
error) is recorded in its cell as ``null`` with the message; the run goes on. Outputs are rewritten
after every cell, so a run stopped by its budget or a time limit keeps what it measured.

On CPU (and with ``--quick``) it runs one tiny shape, (1, 64, 2, 16), for ``pallas`` (the Triton
kernels in Pallas' interpreter) and ``xla``, 2 rounds: a smoke test of this script and of the
kernels' dispatch, NOT a speed measurement.

Writes ``kernels.json``, ``kernels.md`` (tables) and ``kernels.png`` (time against T, log-log)
into ``--out``.
"""

from __future__ import annotations

# ruff: noqa: E402
# (the allocator setting below must precede the first import of jax)
import os

# JAX must not take most of the GPU up front: PyTorch (flash-linear-attention) shares the device.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import argparse
import contextlib
import dataclasses
import importlib
import importlib.metadata
import importlib.util
import json
import platform
import signal
import statistics
import sys
import time
import types
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp

from lolax.ops import (
    chunk_delta_rule,
    chunk_gated_delta_rule,
    chunk_gla,
    chunk_linear_attn,
    chunk_simple_gla,
    interpret_kernels,
    kernel_tuning,
)
from lolax.ops.common.kernel_spec import DEFAULT_TUNING, KernelTuning

IMPLS = ("pallas", "xla", "fla", "cudnn")
ALL_FAMILIES = ("gated_delta_rule", "gla", "simple_gla", "delta_rule", "linear_attn")
GOAL_SHAPE = (2, 16384, 16, 128)
GOALS = {"pallas/fla": ("<=", 1.25), "xla/pallas": (">=", 2.0), "cudnn/pallas": (">=", 3.0)}
"""The issue's targets at ``GOAL_SHAPE`` forward+backward: within 1.25x of flash-linear-attention,
2x faster than the XLA form, 3x faster than cuDNN attention."""
SWEEP_T = (1024, 2048, 4096, 8192, 16384, 32768, 65536)
SMOKE_SHAPE = (1, 64, 2, 16)
TUNING_GRID = (
    KernelTuning(block_v=64, num_warps=4, num_stages=1, schedule="two_phase"),
    KernelTuning(block_v=64, num_warps=4, num_stages=1, schedule="fused"),
    KernelTuning(block_v=32, num_warps=4, num_stages=1, schedule="two_phase"),
    KernelTuning(block_v=128, num_warps=4, num_stages=1, schedule="two_phase"),
    KernelTuning(block_v=64, num_warps=8, num_stages=1, schedule="two_phase"),
    KernelTuning(block_v=64, num_warps=4, num_stages=2, schedule="two_phase"),
    KernelTuning(block_v=32, num_warps=8, num_stages=2, schedule="two_phase"),
    KernelTuning(block_v=128, num_warps=8, num_stages=2, schedule="fused"),
    KernelTuning(block_v=64, num_warps=4, num_stages=1, schedule="two_phase", split_bf16=False),
)
"""Launch choices tried by ``--tuning-sweep``: the default, each knob moved alone, two mixed, and
single-part bf16 products (``split_bf16=False``, flash-linear-attention's precision)."""

LOLAX_OPS = {"gla": chunk_gla, "simple_gla": chunk_simple_gla, "linear_attn": chunk_linear_attn,
             "delta_rule": chunk_delta_rule, "gated_delta_rule": chunk_gated_delta_rule}
FLA_OPS = {"gla": ("fla.ops.gla", "chunk_gla"), "simple_gla": ("fla.ops.simple_gla", "chunk_simple_gla"),
           "linear_attn": ("fla.ops.linear_attn", "chunk_linear_attn"),
           "delta_rule": ("fla.ops.delta_rule", "chunk_delta_rule"),
           "gated_delta_rule": ("fla.ops.gated_delta_rule", "chunk_gated_delta_rule")}
GATE = {"gla": "key", "simple_gla": "head", "linear_attn": None, "delta_rule": None, "gated_delta_rule": "head"}
DELTA = ("delta_rule", "gated_delta_rule")


@dataclasses.dataclass(frozen=True)
class Cell:
    """One measurement: a family at one shape, forward (``"fwd"``) or forward+backward (``"fwdbwd"``).

    ``group`` says why it is run: ``"goal"``, ``"shapes"``, ``"sweep"`` (the T sweep of the plot),
    ``"tuning"`` or ``"smoke"``."""

    family: str
    B: int
    T: int
    H: int
    D: int
    mode: str
    group: str

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (self.B, self.T, self.H, self.D)


@dataclasses.dataclass
class Runner:
    """One implementation of a cell: ``call()`` enqueues one iteration and returns what ``wait``
    blocks on; ``context()`` is entered around every call (the trace-time launch choices)."""

    call: Callable[[], Any]
    wait: Callable[[Any], None]
    context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext


class OutOfTime(Exception):
    """Raised by the SIGTERM handler (``timeout``) so that the outputs are written before exiting."""


def plan_cells(families: tuple[str, ...], quick: bool, sweep_T: tuple[int, ...]) -> list[Cell]:
    """The cells in the order they are run (the most wanted first: the budget may end the list)."""
    if quick:
        return [Cell(f, *SMOKE_SHAPE, mode, "smoke") for f in families for mode in ("fwd", "fwdbwd")]
    cells = [Cell(f, *GOAL_SHAPE, "fwdbwd", "goal") for f in families]
    cells += [Cell(f, *GOAL_SHAPE, "fwd", "goal") for f in families]
    cells += [Cell(f, 8, 1024, 8, 64, mode, "shapes") for mode in ("fwdbwd", "fwd") for f in families]
    cells += [Cell(f, 1, 8192, 96, 128, "fwd", "shapes") for f in families]
    cells += [Cell(f, 1, T, 16, 128, "fwdbwd", "sweep") for T in sweep_T for f in families]
    return cells


def make_inputs(family: str, B: int, T: int, H: int, D: int, seed: int = 0) -> dict[str, jax.Array]:
    """bf16 ``q, k, v`` and output cotangent ``do`` ``[B, T, H, D]``; float32 log gates
    ``log_sigmoid(x) / 16`` (``[B, T, H, D]`` for gla, ``[B, T, H]`` for simple_gla and Gated
    DeltaNet); for the delta rules a bf16 step ``beta = sigmoid(x)`` ``[B, T, H]``."""
    kq, kk, kv, kd, kg, kb = jax.random.split(jax.random.key(seed), 6)
    normal = lambda key, shape: jax.random.normal(key, shape, jnp.float32).astype(jnp.bfloat16)
    x = {"q": normal(kq, (B, T, H, D)), "k": normal(kk, (B, T, H, D)), "v": normal(kv, (B, T, H, D)),
         "do": normal(kd, (B, T, H, D))}
    if GATE[family] == "key":
        x["g"] = jax.nn.log_sigmoid(jax.random.normal(kg, (B, T, H, D), jnp.float32)) / 16
    elif GATE[family] == "head":
        x["g"] = jax.nn.log_sigmoid(jax.random.normal(kg, (B, T, H), jnp.float32)) / 16
    if family in DELTA:
        x["beta"] = jax.nn.sigmoid(jax.random.normal(kb, (B, T, H), jnp.float32)).astype(jnp.bfloat16)
    return jax.block_until_ready(x)


def _op_call(family: str, op: Callable, q, k, v, g, beta=None, **kw):
    """The output ``o`` of a family's op in flash-linear-attention's calling convention."""
    if family == "gated_delta_rule":
        return op(q, k, v, g, beta, use_qk_l2norm_in_kernel=True, **kw)[0]
    if family == "delta_rule":
        return op(q, k, v, beta, use_qk_l2norm_in_kernel=True, **kw)[0]
    if family == "gla":
        return op(q, k, v, g, **kw)[0]
    if family == "simple_gla":
        return op(q, k, v, g=g, **kw)[0]
    return op(q, k, v, normalize=False, **kw)[0]


def _jax_runner(fn: Callable, args: tuple, mode: str, context=contextlib.nullcontext) -> Runner:
    """``fn(*args) -> o``; for ``"fwdbwd"``, ``o`` and the vjp of every input with the cotangent
    ``args[-1]`` (``o`` is returned so that XLA cannot drop the part of the forward pass only it needs)."""
    if mode == "fwd":
        f = jax.jit(fn)
        args = args[:-1]
    else:
        def fwdbwd(*a):
            o, vjp = jax.vjp(fn, *a[:-1])
            return o, vjp(a[-1])

        f = jax.jit(fwdbwd)
    return Runner(call=lambda: f(*args), wait=jax.block_until_ready, context=context)


def _input_names(family: str) -> tuple[str, ...]:
    return ("q", "k", "v") + (("g",) if GATE[family] is not None else ()) + (("beta",) if family in DELTA else ())


def _gates(family: str, a) -> dict:
    """The gate and step among the inputs after q, k, v, by name."""
    names = _input_names(family)[3:]
    return {n: a[3 + i] for i, n in enumerate(names)}


def lolax_runner(cell: Cell, x: dict, implementation: str, context=contextlib.nullcontext) -> Runner:
    op = LOLAX_OPS[cell.family]
    names = _input_names(cell.family)

    def fn(*a):
        q, k, v = a[:3]
        gates = _gates(cell.family, a)
        return _op_call(cell.family, op, q, k, v, gates.get("g"), gates.get("beta"), implementation=implementation)

    return _jax_runner(fn, tuple(x[n] for n in names) + (x["do"],), cell.mode, context)


def cudnn_runner(cell: Cell, x: dict) -> Runner:
    fn = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")
    return _jax_runner(fn, (x["q"], x["k"], x["v"], x["do"]), cell.mode)


def _to_torch(a: jax.Array):
    """A PyTorch CUDA copy of a JAX array (through DLPack, else through the host)."""
    import numpy as np
    import torch

    try:
        return torch.from_dlpack(a).clone()
    except Exception:  # noqa: BLE001 - DLPack export differs across versions; the host copy always works
        dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[jnp.dtype(a.dtype).name]
        return torch.from_numpy(np.asarray(a.astype(jnp.float32))).to("cuda", dtype)


def fla_runner(cell: Cell, x: dict, fla_ops: dict) -> Runner:
    """flash-linear-attention's op on PyTorch copies of the inputs; ``"fwdbwd"`` is the forward
    then ``torch.autograd.grad`` of every input with the cotangent ``do``."""
    import torch

    op = fla_ops[cell.family]
    ins = [_to_torch(x[n]) for n in _input_names(cell.family)]
    do = _to_torch(x["do"])
    gates = lambda a: (_gates(cell.family, a).get("g"), _gates(cell.family, a).get("beta"))

    if cell.mode == "fwd":
        def call():
            with torch.no_grad():
                _op_call(cell.family, op, *ins[:3], *gates(ins))
    else:
        ins = [t.requires_grad_(True) for t in ins]

        def call():
            o = _op_call(cell.family, op, *ins[:3], *gates(ins))
            torch.autograd.grad(o, ins, do)

    return Runner(call=call, wait=lambda _: torch.cuda.synchronize())


def load_fla(families: tuple[str, ...]) -> tuple[dict, dict]:
    """flash-linear-attention's ops for ``families`` and a description (version, how it imported).

    ``import fla`` also imports its layers and models (transformers); if that fails, its ``ops``
    are imported alone under stand-in parent packages."""
    info: dict[str, Any] = {"available": False, "version": None, "import": None, "error": None}
    try:
        info["version"] = importlib.metadata.version("fla-core")
    except importlib.metadata.PackageNotFoundError:
        pass
    try:
        import torch
        if not torch.cuda.is_available():
            info["error"] = "PyTorch sees no CUDA device"
            return {}, info
    except Exception as e:  # noqa: BLE001
        info["error"] = f"torch: {type(e).__name__}: {e}"
        return {}, info
    try:
        import fla  # noqa: F401
        info["import"] = "package"
    except Exception as e:  # noqa: BLE001
        spec = importlib.util.find_spec("fla")
        if spec is None or not spec.submodule_search_locations:
            info["error"] = f"{type(e).__name__}: {e}"
            return {}, info
        for name in [n for n in sys.modules if n == "fla" or n.startswith("fla.")]:
            del sys.modules[name]
        for name, path in (("fla", list(spec.submodule_search_locations)), ("fla.ops", None)):
            stub = types.ModuleType(name)
            stub.__path__ = path or [os.path.join(p, "ops") for p in sys.modules["fla"].__path__]
            sys.modules[name] = stub
        info["import"] = f"ops only (import fla failed: {type(e).__name__}: {str(e)[:200]})"
    ops = {}
    for family in families:
        module, name = FLA_OPS[family]
        try:
            ops[family] = getattr(importlib.import_module(module), name)
        except Exception as e:  # noqa: BLE001
            info["error"] = f"{module}.{name}: {type(e).__name__}: {str(e)[:300]}"
    info["available"] = bool(ops)
    return ops, info


def error_text(e: BaseException) -> str:
    """A failure as recorded in a cell: the exception's type and the start of its message."""
    return f"{type(e).__name__}: {str(e).strip()[:400]}"


def _release_memory() -> None:
    if "torch" in sys.modules:
        torch = sys.modules["torch"]
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _sample(r: Runner, inner: int) -> float:
    """Seconds per call of ``inner`` back-to-back calls between two synchronisations."""
    with r.context():
        t0 = time.perf_counter()
        out = None
        for _ in range(inner):
            out = r.call()
        r.wait(out)
        return (time.perf_counter() - t0) / inner


def measure(runners: dict[str, Runner], reps: int, sample_s: float, deadline: float,
            max_inner: int = 1000) -> dict[str, dict]:
    """Warms every runner up (first call: trace, compile, run), then times them round-robin.

    Returns ``{name: stats}`` with ``median_s``, ``best_s``, ``samples_s``, ``inner`` (calls per
    sample), ``first_call_s`` and ``error`` (None, or why there are no times)."""
    stats: dict[str, dict] = {}
    live: dict[str, tuple[Runner, int]] = {}
    for name, r in runners.items():
        stats[name] = {"median_s": None, "best_s": None, "samples_s": [], "inner": None, "first_call_s": None,
                       "error": None}
        if time.monotonic() > deadline:
            stats[name]["error"] = "skipped: budget spent"
            continue
        try:
            t0 = time.perf_counter()
            with r.context():
                r.wait(r.call())
            stats[name]["first_call_s"] = time.perf_counter() - t0
            one = _sample(r, 1)
            inner = max(1, min(max_inner, round(sample_s / one))) if one > 0 else max_inner
            live[name] = (r, inner)
            stats[name]["inner"] = inner
        except OutOfTime:
            raise
        except Exception as e:  # noqa: BLE001 - out of memory, unsupported shape, compile error: record it
            stats[name]["error"] = error_text(e)
            _release_memory()
    for rep in range(reps):
        names = list(live)
        for name in names[rep % max(len(names), 1):] + names[:rep % max(len(names), 1)]:
            r, inner = live[name]
            try:
                stats[name]["samples_s"].append(_sample(r, inner))
            except OutOfTime:
                raise
            except Exception as e:  # noqa: BLE001
                stats[name]["error"] = error_text(e)
                del live[name]
                _release_memory()
    for s in stats.values():
        if s["samples_s"]:
            s["median_s"] = statistics.median(s["samples_s"])
            s["best_s"] = min(s["samples_s"])
    return stats


def ratios(times: dict[str, float | None]) -> dict[str, float | None]:
    """``pallas/fla``, ``xla/pallas`` and ``cudnn/pallas`` of the given times (None where missing)."""
    div = lambda a, b: times[a] / times[b] if times.get(a) and times.get(b) else None
    return {"pallas/fla": div("pallas", "fla"), "xla/pallas": div("xla", "pallas"),
            "cudnn/pallas": div("cudnn", "pallas")}


def goal_summary(cells: list[dict], families: tuple[str, ...]) -> dict:
    """The ratios (of medians) at ``GOAL_SHAPE`` forward+backward per family, and whether each
    meets its target (None when not measured)."""
    out: dict[str, Any] = {"shape": list(GOAL_SHAPE), "mode": "fwdbwd", "statistic": "median",
                           "targets": {k: f"{op} {v}" for k, (op, v) in GOALS.items()}, "families": {}}
    for family in families:
        match = [c for c in cells if c["family"] == family and tuple(c["shape"]) == GOAL_SHAPE
                 and c["mode"] == "fwdbwd" and c["group"] == "goal"]
        r = match[0]["ratios"] if match else ratios({})
        met = {k: (None if r[k] is None else (r[k] <= v if op == "<=" else r[k] >= v)) for k, (op, v) in GOALS.items()}
        out["families"][family] = {"ratios": r, "met": met}
    return out


def run_cell(cell: Cell, impls: tuple[str, ...], backend: str, fla_ops: dict, args, deadline: float) -> dict:
    """Builds the runners of a cell, measures them and returns the cell's record."""
    x = make_inputs(cell.family, *cell.shape)
    runners: dict[str, Runner] = {}
    skipped: dict[str, str] = {}
    pallas_context = (lambda: interpret_kernels("gpu")) if backend == "cpu" else contextlib.nullcontext
    for impl in impls:
        if impl == "pallas":
            runners[impl] = lolax_runner(cell, x, "pallas", pallas_context)
        elif impl == "xla":
            if cell.T > args.xla_max_T:
                skipped[impl] = f"skipped: T > --xla-max-T {args.xla_max_T}"
            else:
                runners[impl] = lolax_runner(cell, x, "xla")
        elif impl == "fla":
            if fla_ops:
                try:
                    runners[impl] = fla_runner(cell, x, fla_ops)
                except Exception as e:  # noqa: BLE001
                    skipped[impl] = error_text(e)
        elif impl == "cudnn":
            if cell.T > args.cudnn_max_T:
                skipped[impl] = f"skipped: T > --cudnn-max-T {args.cudnn_max_T}"
            else:
                runners[impl] = cudnn_runner(cell, x)
    stats = measure(runners, args.reps, args.sample_ms / 1e3, deadline)
    for impl, why in skipped.items():
        stats[impl] = {"median_s": None, "best_s": None, "samples_s": [], "inner": None, "first_call_s": None,
                       "error": why}
    record = {"family": cell.family, "shape": list(cell.shape), "mode": cell.mode, "group": cell.group,
              "impls": {i: stats[i] for i in impls if i in stats},
              "ratios": ratios({i: s["median_s"] for i, s in stats.items()})}
    del runners, x
    _release_memory()
    return record


def run_tuning_sweep(families: tuple[str, ...], shape: tuple[int, int, int, int], backend: str, args,
                     deadline: float) -> list[dict]:
    """For each family, forward and forward+backward of the kernels under every ``TUNING_GRID``
    choice, interleaved like the other cells (the choice is applied while tracing)."""
    platform_key = "tpu" if backend == "tpu" else "gpu"
    interp = (lambda: interpret_kernels("gpu")) if backend == "cpu" else contextlib.nullcontext
    records = []
    for family in families:
        for mode in ("fwdbwd", "fwd"):
            cell = Cell(family, *shape, mode, "tuning")
            x = make_inputs(family, *shape)
            grid = {tuning_label(t): t for t in TUNING_GRID}

            def context(t: KernelTuning):
                @contextlib.contextmanager
                def ctx() -> Iterator[None]:
                    with interp(), kernel_tuning(platform_key, **dataclasses.asdict(t)):
                        yield
                return ctx

            runners = {label: lolax_runner(cell, x, "pallas", context(t)) for label, t in grid.items()}
            stats = measure(runners, args.reps, args.sample_ms / 1e3, deadline)
            default = stats.get(tuning_label(DEFAULT_TUNING[platform_key]), {}).get("median_s")
            for label, t in grid.items():
                s = stats[label]
                records.append({"family": family, "shape": list(shape), "mode": mode, "platform": platform_key,
                                "tuning": dataclasses.asdict(t), **s,
                                "vs_default": s["median_s"] / default if s["median_s"] and default else None})
            del runners, x
            _release_memory()
    return records


def tuning_label(t: KernelTuning) -> str:
    return f"bv{t.block_v}/w{t.num_warps}/s{t.num_stages}/{t.schedule}" + ("" if t.split_bf16 else "/bf16x1")


def environment(backend: str, fla_info: dict) -> dict:
    """What the numbers were measured on."""
    env = {"backend": backend, "device": jax.devices()[0].device_kind, "device_count": jax.device_count(),
           "jax": jax.__version__, "python": platform.python_version(), "machine": platform.machine(),
           "cpus": os.cpu_count(), "fla": fla_info, "torch": None, "triton": None}
    for name in ("jaxlib", "torch", "triton"):
        try:
            env[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return env


def ms_text(s: float | None) -> str:
    """Seconds as milliseconds for a table (3 significant digits below 100 ms), '-' for none."""
    if s is None:
        return "-"
    ms = s * 1e3
    return f"{ms:.3g}" if ms < 100 else f"{ms:.0f}"


def _x(r: float | None) -> str:
    return "-" if r is None else f"{r:.2f}x"


def format_tables(report: dict) -> str:
    """The markdown of ``kernels.md``: a header, the goal ratios, one row per cell, the failures
    and the tuning sweep."""
    env = report["environment"]
    impls = report["impls"]
    lines = [f"# Kernel benchmark ({env['device']}, {env['backend']})", ""]
    if report["smoke_test"]:
        lines += ["**Smoke test on CPU: the kernels run in Pallas' interpreter. These times are NOT a speed "
                  "measurement.**", ""]
    fla = env["fla"]
    fla_text = (fla["version"] if fla["available"] else "not used") + (f" ({fla['error']})" if fla["error"] else "")
    tuning = tuning_label(KernelTuning(**report["tuning"]["choice"]))
    lines += [f"jax {env['jax']}, jaxlib {env['jaxlib']}, torch {env['torch']}, triton {env['triton']}, "
              f"fla {fla_text}; kernel tuning ({report['tuning']['platform']}): {tuning}; "
              f"bf16 q, k, v (and the delta rules' beta), float32 gates; "
              f"medians of {report['timing']['reps']} interleaved samples, milliseconds; "
              "`a/b` = time(a) / time(b).", ""]
    if not report["smoke_test"]:
        goal = report["goal"]
        lines += [f"Goal shape {tuple(goal['shape'])} forward+backward, targets "
                  + ", ".join(f"{k} {v}" for k, v in goal["targets"].items()) + ":", "",
                  "| family | " + " | ".join(GOALS) + " |", "|---" * (len(GOALS) + 1) + "|"]
        for family, g in goal["families"].items():
            cells = [_x(g["ratios"][k]) + ("" if g["met"][k] is None else (" (met)" if g["met"][k] else " (missed)"))
                     for k in GOALS]
            lines.append(f"| {family} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["| family | B | T | H | D | pass | " + " | ".join(impls) + " | pallas/fla | xla/pallas | cudnn/pallas |",
              "|---" * (len(impls) + 9) + "|"]
    errors = []
    for c in report["cells"]:
        B, T, H, D = c["shape"]
        times = []
        for impl in impls:
            s = c["impls"].get(impl)
            if s is not None and s["error"]:
                errors.append(f"- {c['family']} {tuple(c['shape'])} {c['mode']} {impl}: {s['error']}")
            times.append("err" if s is not None and s["error"] and s["median_s"] is None else
                         ms_text(s["median_s"]) if s else "-")
        mode = "fwd+bwd" if c["mode"] == "fwdbwd" else "fwd"
        lines.append(f"| {c['family']} | {B} | {T} | {H} | {D} | {mode} | " + " | ".join(times) + " | "
                     + " | ".join(_x(c["ratios"][k]) for k in GOALS) + " |")
    if report["skipped_cells"]:
        lines += ["", f"Not run (budget of {report['budget_s']:.0f} s spent): {len(report['skipped_cells'])} cells."]
    if errors:
        lines += ["", "Failures and skips:", ""] + errors
    if report.get("tuning_sweep"):
        lines += ["", "Tuning sweep (pallas, `kernel_tuning`), median milliseconds:", "",
                  "| family | shape | pass | block_v | num_warps | num_stages | schedule | time | vs default |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for t in report["tuning_sweep"]:
            k = t["tuning"]
            time_s = ms_text(t["median_s"]) if t["error"] is None else f"err ({t['error'][:60]})"
            lines.append(f"| {t['family']} | {tuple(t['shape'])} | {t['mode']} | {k['block_v']} | {k['num_warps']} | "
                         f"{k['num_stages']} | {k['schedule']} | {time_s} | {_x(t['vs_default'])} |")
    return "\n".join(lines) + "\n"


def plot(report: dict, path: str) -> None:
    """Median time against T (log-log) per family and implementation: the T sweep when it ran,
    else every cell measured (forward dashed, forward+backward solid)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = report["cells"]
    sweep = [c for c in cells if c["group"] == "sweep"]
    shown = sweep or cells
    families = [f for f in report["families"] if any(c["family"] == f for c in shown)] or list(report["families"])
    fig, axes = plt.subplots(1, len(families), figsize=(6 * len(families), 4.5), squeeze=False)
    for ax, family in zip(axes[0], families):
        for impl in report["impls"]:
            for mode, style in (("fwdbwd", "-o"), ("fwd", "--s")):
                pts = sorted((c["shape"][1], c["impls"][impl]["median_s"]) for c in shown
                             if c["family"] == family and c["mode"] == mode and impl in c["impls"]
                             and c["impls"][impl]["median_s"])
                if pts:
                    label = f"{impl} {'fwd+bwd' if mode == 'fwdbwd' else 'fwd'}"
                    ax.loglog(*zip(*pts), style, label=label, markersize=4)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("T (tokens)")
        ax.set_ylabel("seconds (median)")
        where = "B=1, H=16, D=128" if sweep else "all measured shapes"
        ax.set_title(f"{family}, {where}" + (" - CPU smoke test" if report["smoke_test"] else ""))
        ax.grid(True, which="both", alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.suptitle(f"{report['environment']['device']}: lolax kernels vs XLA, flash-linear-attention, cuDNN",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def save_report(report: dict, out_dir: str, stem: str, tables: Callable[[dict], str],
                plot_fn: Callable[[dict, str], None], with_plot: bool = True) -> None:
    """Writes ``STEM.json``, ``STEM.md`` (``tables(report)``) and ``STEM.png`` into ``out_dir``."""
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, f"{stem}.json"), "w") as fh:
        json.dump(report, fh, indent=1)
    with open(os.path.join(out_dir, f"{stem}.md"), "w") as fh:
        fh.write(tables(report))
    if with_plot:
        plot_fn(report, os.path.join(out_dir, f"{stem}.png"))


def write_outputs(report: dict, out_dir: str, with_plot: bool = True) -> None:
    save_report(report, out_dir, "kernels", format_tables, plot, with_plot)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="one tiny shape (the only run on CPU)")
    p.add_argument("--out", default="docs/results", help="output directory")
    p.add_argument("--budget-s", type=float, default=300.0,
                   help="wall-clock budget: no new cell starts after it (outputs are still written)")
    p.add_argument("--families", nargs="+", choices=ALL_FAMILIES, default=None,
                   help="default: all five, Gated DeltaNet first")
    p.add_argument("--impls", nargs="+", choices=IMPLS, default=None,
                   help="default: all that run here (CPU: pallas xla)")
    p.add_argument("--reps", type=int, default=None, help="timed rounds per cell (default 7; quick 2)")
    p.add_argument("--sample-ms", type=float, default=None,
                   help="target length of one timing sample (default 25 ms; quick 0: one call)")
    p.add_argument("--sweep-T", type=int, nargs="*", default=list(SWEEP_T), help="T of the sweep (B=1, H=16, D=128)")
    p.add_argument("--xla-max-T", type=int, default=65536, help="skip the XLA chunk form above this T")
    p.add_argument("--cudnn-max-T", type=int, default=65536, help="skip cuDNN attention above this T")
    p.add_argument("--tuning-sweep", action="store_true",
                   help="also time the kernels under several launch choices (after the goal cells)")
    p.add_argument("--tuning-families", nargs="+", choices=ALL_FAMILIES, default=["gla"])
    return p.parse_args(argv)


def run(argv: list[str] | None = None) -> dict:
    """Runs the benchmark and writes its outputs; returns the report (the JSON's content)."""
    args = parse_args(argv)
    start = time.monotonic()
    deadline = start + args.budget_s
    backend = jax.default_backend()
    on_cpu = backend == "cpu"
    quick = args.quick or on_cpu
    families = tuple(args.families or ALL_FAMILIES)
    available = ("pallas", "xla") if on_cpu else IMPLS if backend == "gpu" else ("pallas", "xla")
    impls = tuple(i for i in (args.impls or available) if i in available)
    args.reps = args.reps or (2 if quick else 7)
    args.sample_ms = args.sample_ms if args.sample_ms is not None else (0.0 if quick else 25.0)
    fla_ops, fla_info = load_fla(families) if "fla" in impls else ({}, {"available": False, "version": None,
                                                                          "import": None, "error": "not run here"})
    if "fla" in impls and not fla_ops:
        print(f"flash-linear-attention not used: {fla_info['error']}", flush=True)
    platform_key = "tpu" if backend == "tpu" else "gpu"
    cells_todo = plan_cells(families, quick, tuple(args.sweep_T))
    report: dict[str, Any] = {
        "smoke_test": on_cpu,
        "note": ("CPU smoke test: the kernels run in Pallas' interpreter; the times are not a speed measurement"
                 if on_cpu else "times in seconds; ratios a/b = median time(a) / median time(b)"),
        "quick": quick, "command": "python -m experiments.bench.kernels " + " ".join(
            argv if argv is not None else sys.argv[1:]),
        "environment": environment(backend, fla_info), "families": list(families), "impls": list(impls),
        "dtype": "bfloat16", "gate_dtype": "float32",
        "tuning": {"platform": platform_key, "choice": dataclasses.asdict(DEFAULT_TUNING[platform_key]),
                   "source": "DEFAULT_TUNING (ops/common/kernel_spec.py)"},
        "timing": {"reps": args.reps, "sample_ms": args.sample_ms, "statistic": "median of interleaved samples"},
        "budget_s": args.budget_s, "elapsed_s": 0.0, "budget_exhausted": False, "interrupted": False,
        "cells": [], "skipped_cells": [], "goal": None, "tuning_sweep": None,
    }

    def on_term(signum, frame):
        raise OutOfTime()

    previous = signal.signal(signal.SIGTERM, on_term) if hasattr(signal, "SIGTERM") else None
    last_plot = time.monotonic()
    try:
        queue: list[Any] = list(cells_todo)
        if args.tuning_sweep:
            at = len([c for c in cells_todo if c.group in ("goal", "smoke") and c.mode == "fwdbwd"])
            queue.insert(at, "tuning")
        for item in queue:
            if time.monotonic() > deadline:
                report["budget_exhausted"] = True
                if isinstance(item, Cell):
                    report["skipped_cells"].append(dataclasses.asdict(item))
                continue
            if item == "tuning":
                shape = SMOKE_SHAPE if quick else GOAL_SHAPE
                print(f"tuning sweep at {shape} ({len(TUNING_GRID)} choices)", flush=True)
                report["tuning_sweep"] = run_tuning_sweep(tuple(args.tuning_families), shape, backend, args, deadline)
            else:
                t0 = time.monotonic()
                record = run_cell(item, impls, backend, fla_ops, args, deadline)
                report["cells"].append(record)
                print(f"{item.family} {item.shape} {item.mode}: " + ", ".join(
                    f"{i} {ms_text(s['median_s'])} ms" + (f" ({s['error'][:80]})" if s["error"] else "")
                    for i, s in record["impls"].items()) + f"  [{time.monotonic() - t0:.0f} s]", flush=True)
            report["goal"] = goal_summary(report["cells"], families)
            report["elapsed_s"] = time.monotonic() - start
            plot_now = time.monotonic() - last_plot > 30
            write_outputs(report, args.out, with_plot=plot_now)
            last_plot = time.monotonic() if plot_now else last_plot
    except (OutOfTime, KeyboardInterrupt):
        report["interrupted"] = True
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    report["goal"] = goal_summary(report["cells"], families)
    report["elapsed_s"] = time.monotonic() - start
    write_outputs(report, args.out)
    return report


def main(argv: list[str] | None = None) -> None:
    report = run(argv)
    with open(os.path.join(parse_args(argv).out, "kernels.md")) as fh:
        print(fh.read())
    if report["smoke_test"]:
        print("(CPU smoke test: not a speed measurement)")


if __name__ == "__main__":
    main()
