"""Examples run by ``python -m harness.launch`` from the repository's root (see examples/README.md).

A package so that task presets can name their pieces as ``examples.<example>.<module>.<name>``.
"""
