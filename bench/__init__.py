"""Benchmarks: run with ``./dev bench`` (see bench/README.md)."""
