"""Benchmarks: ops (sequence mixers), kernels (the Pallas kernels on a GPU), optimizer step time and memory."""
