"""What the op families share: argument checks, the chunk layout, state scans, log-decay helpers,
argument preparation, the precision policy, the chunk and recurrent cores, and the Pallas kernels.

| module | holds |
|---|---|
| :mod:`.checks` | argument checks (shapes, dtypes, flags; values when concrete, ``checkify`` under jit) |
| :mod:`.prepare` | :class:`~.prepare.Inputs` and :func:`~.prepare.prepare`: validated float32 working arrays |
| :mod:`.layout` | the chunk plan (packing without chunks straddling sequences) and the chunk-major layout |
| :mod:`.scan` | the state scan over chunks and the token-by-token scan, with resets at sequence starts |
| :mod:`.decay` | in-chunk cumulative log decays, masked decay matrices, exact resets |
| :mod:`.precision` | products at ``Precision.HIGHEST`` with float32 accumulation |
| :mod:`.diagonal` | the chunk form of the diagonal-decay families |
| :mod:`.delta` | the WY / UT chunk form of the delta rules |
| :mod:`.solve_tril` | ``(I + A)^{-1}`` for strictly lower-triangular A |
| :mod:`.recurrent` | the token-by-token form of every family |
| :mod:`.diagonal_kernels` | the Pallas path of the diagonal chunk form: layout, custom VJP, gate gradient, dispatch |
| :mod:`.kernel_math` | the per-chunk mathematics of the kernels, shared by both backends |
| :mod:`.kernel_spec` | ``KernelSpec`` (the static description of a call) and ``KernelTuning`` (launch choices) |
| :mod:`.pallas_tpu` | the Mosaic (TPU) kernels |
| :mod:`.pallas_gpu` | the Triton (GPU) kernels |
"""
