"""Benchmarks: `python -m benchmarks NAME`; each compares against a reference in the same run."""
