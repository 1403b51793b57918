"""The static description of one kernel call: gate mode, tiling and launch parameters."""

from __future__ import annotations

import dataclasses

import jax


@dataclasses.dataclass(frozen=True)
class KernelSpec:
    """Everything about a kernel call that is fixed at trace time (hashable: a static argument).

    Attributes:
      mode: ``None`` (no decay), ``"head"`` (a log decay per head) or ``"key"`` (per key dimension).
      chunk_size: tokens per chunk, C.
      sub_chunk_size: tokens per sub-chunk of the per-key-dimension scores (divides C).
      block_v: value columns per program, BV (divides V); the state block is ``[BV, K]``.
      num_heads: H, the value heads (rows of the kernel layout are ``row·H + head``).
      num_seqs: N, the number of initial / final states.
      key_dim: K.
      num_warps, num_stages: Triton launch parameters (GPU only).
      schedule: the GPU schedule (see :class:`KernelTuning`).
      products: how products are computed, one of ``kernel_math.PRODUCTS``.
      key_group: value heads per q/k head, G (grouped value heads; 1 otherwise): the rows of q
        and k are ``row·(H / G) + head // G``, see :meth:`key_row`.
      family: ``"diagonal"`` (:mod:`.kernel_math`) or ``"delta"`` (:mod:`.delta_kernel_math`: a
        per-token step ``beta`` enters as one more column, and the backward also returns the
        gradients of ``beta`` and of the in-chunk cumulative log decay).
    """

    mode: str | None
    chunk_size: int
    sub_chunk_size: int
    block_v: int
    num_heads: int
    num_seqs: int
    key_dim: int
    num_warps: int = 4
    num_stages: int = 1
    schedule: str = "fused"
    products: str = "f32"
    family: str = "diagonal"
    key_group: int = 1

    def key_row(self, bh):
        """The q/k row that value row ``bh`` reads: with ``key_group`` G > 1 (grouped value heads,
        ``num_heads`` value heads over ``num_heads / G`` key heads) value head ``hv`` reads key
        head ``hv // G``; q and k stay unrepeated in memory."""
        if self.key_group == 1:
            return bh
        HV = self.num_heads
        return jax.lax.div(bh, HV) * (HV // self.key_group) + jax.lax.div(jax.lax.rem(bh, HV), self.key_group)

    @property
    def extra_inputs(self) -> tuple[tuple[str, int], ...]:
        """The per-chunk inputs besides q, k, v, in order, as ``(kind, width)``: ``"col"`` is a
        per-token array ``[rows·heads, tokens, width]``, ``"row"`` a per-chunk row table
        ``[rows·heads, chunks, 1, C]`` (the head gate's in-chunk sums laid along a row)."""
        gates = {None: (), "head": (("col", 1), ("col", 1), ("row", 1), ("row", 1)),
                 "key": (("col", self.key_dim),)}[self.mode]
        return gates + ((("col", 1),) if self.family == "delta" else ())

    @property
    def num_extra_grads(self) -> int:
        """How many per-token columns the backward returns besides dq, dk, dv (partial over value
        blocks): ``dbeta`` and, with a gate, ``dG`` for the delta rules; none for the others."""
        return (1 + (self.mode == "head")) if self.family == "delta" else 0


SCHEDULES = ("fused", "two_phase")


@dataclasses.dataclass(frozen=True)
class KernelTuning:
    """Launch choices of the kernels on one platform (see ``docs/kernels.md``).

    Attributes:
      block_v: value columns per program (the state block is ``[block_v, K]``); capped at V.
      num_warps, num_stages: Triton launch parameters (GPU only).
      schedule: ``"fused"``: one sequential pass per head computes outputs and states together;
        ``"two_phase"``: a light sequential pass stores the state entering every chunk, then all
        chunks run in parallel (more programs in flight on a GPU; more memory traffic).
      split_bf16: with bf16 inputs, a float32 operand (a state, a decayed key, the scores) enters
        its product as two bf16 parts (twice the bf16 products, about 16 bits kept); False rounds
        it to one bf16 part, as flash-linear-attention does (faster; outputs off by about 3e-3
        and gate gradients by about 1e-2 relative RMS).  Float32 inputs always multiply in float32.
    """

    block_v: int = 64
    num_warps: int = 4
    num_stages: int = 1
    schedule: str = "fused"
    split_bf16: bool = True

    def __post_init__(self):
        if self.block_v not in (16, 32, 64, 128, 256):
            raise ValueError(f"block_v must be one of 16, 32, 64, 128, 256, got {self.block_v!r}")
        for name in ("num_warps", "num_stages"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not isinstance(self.split_bf16, bool):
            raise ValueError(f"split_bf16 must be a bool, got {self.split_bf16!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")


DEFAULT_TUNING = {"tpu": KernelTuning(block_v=128), "gpu": KernelTuning(block_v=64, schedule="two_phase")}
"""The defaults: untuned on hardware (no accelerator was available when they were set)."""


def math_of(spec: KernelSpec):
    """The per-chunk mathematics of ``spec.family`` (a module with the same functions)."""
    if spec.family == "delta":
        from . import delta_kernel_math
        return delta_kernel_math
    from . import kernel_math
    return kernel_math


def kernel_name(spec: KernelSpec, name: str) -> str:
    """The name a kernel carries into the compiled program (and profiles)."""
    family = "diag" if spec.family == "diagonal" else spec.family
    return f"lolax_{family}_{spec.mode or 'none'}_{name}"


def out_struct(shape: tuple[int, ...], dtype, like: jax.Array) -> jax.ShapeDtypeStruct:
    """The shape of a kernel output, varying over the same mesh axes as ``like`` (inside
    ``shard_map(check_vma=True)`` a kernel must say so; outside it the annotation is empty)."""
    aval = jax.typeof(like)
    mat = getattr(aval, "mat", None)                  # jax 0.10: the manual axis type
    if mat is not None:
        return jax.ShapeDtypeStruct(shape, dtype, manual_axis_type=mat)
    vma = getattr(aval, "vma", None)                  # newer and older jax: the varying axes
    if vma:
        return jax.ShapeDtypeStruct(shape, dtype, vma=vma)
    return jax.ShapeDtypeStruct(shape, dtype)


def optional_outputs(outs, *present: bool) -> tuple:
    """A kernel's outputs in order, None where ``present`` says the output was not requested."""
    outs = iter(outs)
    return tuple(next(outs) if p else None for p in present)
