"""Benchmarks of the harness (outside the installed package): python -m benchmarks.bench --help."""
