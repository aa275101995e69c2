"""Benchmarks (``bench/*.py`` run as scripts) and the fault-injection runner (``python -m bench.chaos``)."""
