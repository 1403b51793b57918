"""Causal softmax attention on the vendors' fused kernels, with the blockwise XLA form as fallback.

:func:`attention` computes the same thing as :func:`~.softmax.softmax_attention` (causal) and
:func:`~.softmax.sliding_window_attention`: layout ``[B, T, H, D]``, grouped-query heads (k and v
with Hkv heads dividing H), an optional sliding window of ``window`` keys including the query,
packed sequences through ``cu_seqlens``.  Three backends can run it:

* ``"cudnn"``: cuDNN's fused attention through ``jax.nn.dot_product_attention(...,
  implementation="cudnn")``, on NVIDIA GPUs;
* ``"splash"``: the Pallas splash-attention kernels that ship with JAX
  (``jax.experimental.pallas.ops.tpu.splash_attention``), on TPUs; on other machines they can run
  in Pallas' interpreter, which is how the CPU tests check them;
* ``"xla"``: our blockwise attention (:mod:`.blockwise`), everywhere; it is also the oracle the
  other two are tested against.

``implementation`` means what it means for the linear-attention ops
(:func:`lolax.ops.common.diagonal_kernels.chunk_diagonal_dispatch`):

================  ==============================  ==============================  ==========================
implementation    CUDA GPU                        TPU                             CPU
================  ==============================  ==============================  ==========================
``None``          cudnn if it takes the inputs,   splash if it takes the inputs,  xla
                  else xla (logged once)          else xla (logged once)
``"xla"``         xla                             xla                             xla
``"pallas"``      cudnn, or ``ValueError``        splash, or ``ValueError``       splash interpreted, or
                                                                                  ``ValueError``
================  ==============================  ==============================  ==========================

Other platforms (ROCm GPUs) run xla with ``None`` and raise with ``"pallas"``.

What each kernel takes (:func:`select_attention` decides; anything else falls back or raises):

* cuDNN: q of dtype bfloat16 or float16 (k and v are cast to q's dtype); head dim D a multiple
  of 8, at most 128 (256 on Hopper, compute capability 9.0, and later); v's head dim equal to D;
  no packed sequences, because ``jax.nn.dot_product_attention`` has no public argument for
  segments or offsets in this JAX (its ``query_seq_lengths`` only trims padding at the end of
  each row).
* splash: q of dtype bfloat16 or float32; T a multiple of 128 (the kernels' blocks are 512, 256
  or 128 tokens, the largest dividing T); D a multiple of 64, at most 256 (the kernel source puts
  no bound on D; this range is the conservative one); v's head dim equal to D; packed sequences
  become the kernels' segment ids.

Padding masks (``valid`` in :func:`lolax.models.dispatch.attention`) are never sent to a kernel:
the models run them through their masked XLA path.

**When the choice is made.**  ``jax.nn.dot_product_attention(implementation="cudnn")`` refuses to
trace where no CUDA GPU with cuDNN is present, so the GPU decision is taken when the function is
traced, from ``jax.default_backend()``.  Splash traces anywhere (only its lowering needs a TPU),
so off a GPU the program holds ``jax.lax.platform_dependent(tpu=splash, default=xla)``: one
``jit`` function traced on a CPU runs XLA there, and exported with ``jax.export`` for
``platforms=["tpu"]`` it carries the splash kernels.  Exported for ``["cuda"]`` from a CPU
machine it carries the XLA form, since the cuDNN branch cannot be traced there.
"""

from __future__ import annotations

import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import DTypeLike

from ..common import checks
from ..common.diagonal_kernels import check_implementation
from .softmax import _check, _check_window, _segments, sliding_window_attention, softmax_attention

logger = logging.getLogger("lolax")

BACKENDS = ("cudnn", "splash", "xla")
"""What :func:`select_attention` can answer."""

CUDNN_DTYPES = ("bfloat16", "float16")
SPLASH_DTYPES = ("bfloat16", "float32")
SPLASH_BLOCKS = (512, 256, 128)
"""Splash block lengths (queries and keys, forward and backward), tried longest first."""

_logged: set[tuple[str, str]] = set()


def _cudnn_unsupported(dtype: DTypeLike, head_dim: int, value_dim: int, packed: bool, max_head_dim: int) -> str | None:
    name = jnp.dtype(dtype).name
    if name not in CUDNN_DTYPES:
        return f"q of dtype {name} (cuDNN takes {' or '.join(CUDNN_DTYPES)})"
    if head_dim % 8 or head_dim > max_head_dim:
        return f"q/k head dim D = {head_dim} (cuDNN takes a multiple of 8 up to {max_head_dim} on this GPU)"
    if value_dim != head_dim:
        return f"v head dim {value_dim} different from the q/k head dim D = {head_dim} (cuDNN needs them equal)"
    if packed:
        return ("packed sequences (cu_seqlens): jax.nn.dot_product_attention has no public argument for "
                "segments, so they run the XLA form")
    return None


def _splash_unsupported(dtype: DTypeLike, head_dim: int, value_dim: int, T: int) -> str | None:
    name = jnp.dtype(dtype).name
    if name not in SPLASH_DTYPES:
        return f"q of dtype {name} (splash takes {' or '.join(SPLASH_DTYPES)})"
    if head_dim % 64 or head_dim > 256:
        return f"q/k head dim D = {head_dim} (splash is used for multiples of 64 up to 256)"
    if value_dim != head_dim:
        return f"v head dim {value_dim} different from the q/k head dim D = {head_dim} (splash is used when equal)"
    if T % SPLASH_BLOCKS[-1]:
        return f"sequence length T = {T} (splash needs a multiple of {SPLASH_BLOCKS[-1]})"
    return None


def select_attention(platform: str, dtype: DTypeLike, head_dim: int, T: int, window: int | None, packed: bool,
                     padded: bool, implementation: str | None, *, value_dim: int | None = None,
                     cudnn_max_head_dim: int = 128) -> tuple[str, str | None]:
    """Which backend runs causal softmax attention, and why not the fast one when it is not.

    Pure Python on static facts, so every case can be checked anywhere.

    Args:
      platform: where the program runs: ``"gpu"`` (a CUDA GPU), ``"tpu"``, ``"cpu"`` or another
        name (e.g. ``"rocm"``, which has no vendor kernel here).
      dtype: q's dtype.
      head_dim: D of q and k; ``value_dim``: v's head dim (None: equal to D).
      T: sequence length.
      window: the sliding window in keys (None: full causal); both kernels take any window >= 1.
      packed: ``cu_seqlens`` given; padded: a padding mask given.
      implementation: None, ``"xla"`` or ``"pallas"`` (see the module docstring).
      cudnn_max_head_dim: the largest D cuDNN takes on this GPU (128; 256 from compute
        capability 9.0 on).

    Returns:
      ``(backend, reason)``: backend one of :data:`BACKENDS` (``"splash"`` off a TPU means the
      interpreted kernels); reason None, or a phrase saying why the fast kernel of an
      accelerator is not used.

    Raises:
      ValueError: ``implementation="pallas"`` with inputs (or a platform) the kernels do not take.

    >>> select_attention("gpu", "bfloat16", 128, 4096, None, False, False, None)
    ('cudnn', None)
    >>> select_attention("tpu", "bfloat16", 128, 1000, 256, False, False, None)[1]
    'sequence length T = 1000 (splash needs a multiple of 128)'
    >>> select_attention("cpu", "float32", 64, 256, None, True, False, "pallas")
    ('splash', None)
    """
    check_implementation(implementation)
    if window is not None:
        _check_window(window)
    for name, value in (("head_dim", head_dim), ("T", T)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    value_dim = head_dim if value_dim is None else value_dim
    if implementation == "xla":
        return "xla", None
    if platform == "gpu":
        backend = "cudnn"
        reason = _cudnn_unsupported(dtype, head_dim, value_dim, packed, cudnn_max_head_dim)
    elif platform == "tpu" or (platform == "cpu" and implementation == "pallas"):
        backend = "splash"
        reason = _splash_unsupported(dtype, head_dim, value_dim, T)
    elif platform == "cpu":
        return "xla", None
    else:
        backend = "none"
        reason = f"platform {platform!r} (cuDNN needs a CUDA GPU, splash a TPU or the CPU interpreter)"
    if reason is None and padded:
        reason = "a padding mask (valid): padded batches run the masked XLA path"
    if reason is None:
        return backend, None
    if implementation == "pallas":
        raise ValueError(f"implementation='pallas' does not support {reason} on platform {platform!r}; "
                         "use implementation='xla' (or None to fall back automatically)")
    return "xla", reason


def _log_fallback(platform: str, reason: str) -> None:
    """One log line per distinct (platform, reason) in this process."""
    key = (platform, reason)
    if key in _logged:
        return
    _logged.add(key)
    logger.warning("softmax attention on %s runs the XLA blockwise form instead of the fused kernel: %s",
                   platform, reason)


def _trace_platform() -> str:
    """``"gpu"`` for a CUDA GPU, ``"rocm"``, ``"tpu"`` or ``"cpu"``: the backend a trace lands on."""
    backend = jax.default_backend()
    if backend != "gpu":
        return backend
    version = getattr(jax.devices()[0].client, "platform_version", "")
    return "rocm" if "rocm" in version.lower() else "gpu"


def _cudnn_max_head_dim() -> int:
    capability = getattr(jax.devices()[0], "compute_capability", "0.0")
    major = int(str(capability).split(".")[0])
    return 256 if major >= 9 else 128


def splash_block(T: int) -> int:
    """The longest of :data:`SPLASH_BLOCKS` dividing ``T`` (a multiple of 128).

    >>> splash_block(384), splash_block(1024)
    (128, 512)
    """
    for block in SPLASH_BLOCKS:
        if T % block == 0:
            return block
    raise ValueError(f"T must be a multiple of {SPLASH_BLOCKS[-1]} for splash attention, got {T}")


@functools.lru_cache(maxsize=64)
def _splash_kernel(T: int, num_heads: int, window: int | None, interpret: bool):
    """The splash kernel for one example ``q [H, T, D]``, ``k, v [Hkv, T, D]`` (Hkv dividing H).

    Building the mask tables is costly, so kernels are cached by their static configuration.
    The tables must be concrete arrays (not tracers of whichever trace builds the kernel first),
    hence ``ensure_compile_time_eval``.
    """
    from jax.experimental.pallas.ops.tpu import splash_attention as splash

    shape = (T, T)
    mask = splash.CausalMask(shape) if window is None else splash.LocalMask(shape, (window - 1, 0), offset=0)
    b = splash_block(T)
    sizes = splash.BlockSizes(block_q=b, block_kv=b, block_kv_compute=b, block_q_dkv=b, block_kv_dkv=b,
                              block_kv_dkv_compute=b, block_q_dq=b, block_kv_dq=b)
    with jax.ensure_compile_time_eval():
        return splash.make_splash_mha(splash.MultiHeadMask([mask] * num_heads), block_sizes=sizes, head_shards=1,
                                      q_seq_shards=1, interpret=interpret)


def _splash(q, k, v, segment_ids, scale: float, window: int | None, interpret: bool):
    """Splash attention over the batch: the kernel sees one example ``[H, T, D]`` at a time and
    applies no scale of its own, so q is scaled first."""
    from jax.experimental.pallas.ops.tpu.splash_attention import SegmentIds

    B, T, H, D = q.shape
    kernel = _splash_kernel(T, H, window, interpret)
    qs = (q.astype(jnp.float32) * scale).astype(q.dtype)
    heads_first = lambda x: jnp.swapaxes(x, 1, 2)                       # [B, T, H, D] -> [B, H, T, D]
    if segment_ids is None:
        o = jax.vmap(kernel)(heads_first(qs), heads_first(k), heads_first(v))
    else:
        seg = jnp.broadcast_to(segment_ids, (B, T))
        o = jax.vmap(lambda a, b, c, s: kernel(a, b, c, SegmentIds(q=s, kv=s)))(
            heads_first(qs), heads_first(k), heads_first(v), seg)
    return jnp.swapaxes(o, 1, 2)


def _cudnn(q, k, v, scale: float, window: int | None):
    return jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=True,
                                        local_window_size=None if window is None else (window - 1, 0),
                                        implementation="cudnn")


def _xla(q, k, v, cu_seqlens, scale: float, window: int | None):
    block = min(128, q.shape[1])
    if window is None:
        o = softmax_attention(q, k, v, scale, True, cu_seqlens, block_size=block)
    else:
        o = sliding_window_attention(q, k, v, window, scale, cu_seqlens, block_size=block)
    return o.astype(q.dtype)


# Compiled as a whole, so that an eager call traces the platform branches once per configuration.
@functools.partial(jax.jit, static_argnames=("scale", "window", "route"))
def _run(q, k, v, cu_seqlens, *, scale: float, window: int | None, route: str):
    if route == "xla":
        return _xla(q, k, v, cu_seqlens, scale, window)
    k, v = k.astype(q.dtype), v.astype(q.dtype)
    if route == "cudnn":
        return _cudnn(q, k, v, scale, window)
    segment_ids = _segments(cu_seqlens, q.shape[1])
    on_tpu = lambda: _splash(q, k, v, segment_ids, scale, window, False)
    if route == "splash":                                   # None: XLA wherever the program is not lowered for TPU
        return jax.lax.platform_dependent(tpu=on_tpu, default=lambda: _xla(q, k, v, cu_seqlens, scale, window))
    interpreted = lambda: _splash(q, k, v, segment_ids, scale, window, True)
    return jax.lax.platform_dependent(tpu=on_tpu, default=interpreted)    # "pallas"


def attention(q, k, v, *, scale: float | None = None, window: int | None = None, cu_seqlens=None,
              implementation: str | None = None):
    """Causal softmax attention (optionally over a sliding window) on the fastest backend that takes it.

    Args:
      q: ``[B, T, H, D]``; k: ``[B, T, Hkv, D]``; v: ``[B, T, Hkv, Dv]``, Hkv dividing H (query head
        h reads kv head ``h // (H // Hkv)``).
      scale: a Python number, None meaning ``D ** -0.5``.
      window: query i attends keys ``i - window < j <= i`` (``window`` keys including itself);
        None is full causal attention.
      cu_seqlens: ``[N + 1]`` offsets of packed sequences (B == 1); no attention across them.
      implementation: None (cuDNN on a CUDA GPU, splash on a TPU, when they take the inputs; the
        blockwise XLA form otherwise, with one log line per reason on an accelerator), ``"xla"``
        or ``"pallas"`` (the kernel of the platform, splash interpreted on a CPU; ``ValueError``
        when it does not take the inputs).  See the table in :mod:`lolax.ops.attention.fast`.

    Returns:
      o ``[B, T, H, Dv]`` in q's dtype.

    >>> import jax, jax.numpy as jnp
    >>> q = jax.random.normal(jax.random.key(0), (1, 128, 2, 64))
    >>> k, v = jax.random.normal(jax.random.key(1), (2, 1, 128, 1, 64))      # one kv head (GQA)
    >>> o = attention(q, k, v, window=16, implementation="xla")
    >>> o.shape
    (1, 128, 2, 64)
    >>> o_splash = attention(q, k, v, window=16, implementation="pallas")   # interpreted on a CPU
    >>> bool(jnp.allclose(o, o_splash, atol=1e-5))
    True
    """
    B, T, H, D = _check(q, k, v, cu_seqlens)
    if window is not None:
        _check_window(window)
    check_implementation(implementation)
    scale = checks.resolve_scale(scale, D)
    if not isinstance(scale, (int, float, np.number)) and not checks.is_concrete(scale):
        raise ValueError(f"scale must be a Python number (it is static), got a traced {type(scale).__name__}")
    scale = float(scale)
    window = None if window is None or window >= T else int(window)
    if implementation == "xla":
        return _run(q, k, v, cu_seqlens, scale=scale, window=window, route="xla")
    platform = _trace_platform()
    packed, Dv = cu_seqlens is not None, v.shape[3]
    if platform == "gpu":
        backend, reason = select_attention("gpu", q.dtype, D, T, window, packed, False, implementation,
                                           value_dim=Dv, cudnn_max_head_dim=_cudnn_max_head_dim())
        if reason is not None:
            _log_fallback(platform, reason)
        return _run(q, k, v, cu_seqlens, scale=scale, window=window, route=backend)
    if implementation == "pallas":
        select_attention(platform, q.dtype, D, T, window, packed, False, implementation, value_dim=Dv)
        return _run(q, k, v, cu_seqlens, scale=scale, window=window, route="pallas")
    backend, reason = select_attention("tpu", q.dtype, D, T, window, packed, False, None, value_dim=Dv)
    if platform == "tpu" and reason is not None:
        _log_fallback(platform, reason)
    elif platform not in ("tpu", "cpu"):
        _log_fallback(platform, select_attention(platform, q.dtype, D, T, window, packed, False, None)[1])
    return _run(q, k, v, cu_seqlens, scale=scale, window=window, route="splash" if backend == "splash" else "xla")
