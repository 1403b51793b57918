"""Benchmarks: ops (sequence mixers), optimizer step time and memory."""
