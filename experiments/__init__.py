"""Training scripts, tasks, data pipelines and benchmarks built on ops, models and optim."""

import os

# JAX's CPU SVD (GaLore's projector refresh) calls LAPACK in OpenBLAS, whose worker threads
# busy-wait: when other processes hold the cores they slow one SVD by 10x or more, while a single
# thread is barely slower on an idle machine (experiments/bench/svd_contention.py).  Read when
# OpenBLAS loads, so it must be set before numpy or jax is imported; a value set by the user wins.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
