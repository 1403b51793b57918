"""Test session setup: 8 simulated CPU devices, created before JAX initialises its backend."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# pytest-xdist workers share the cores: OpenBLAS's busy-waiting threads would make every CPU SVD
# many times slower (see experiments/__init__.py)
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)


import pytest  # noqa: E402


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    """~100 KB of Shakespeare: small enough to load instantly, real enough to learn from."""
    from experiments.data import load_corpus

    path = tmp_path_factory.mktemp("data") / "plays.txt"
    path.write_bytes(load_corpus().train[:100_000].tobytes())
    return path
