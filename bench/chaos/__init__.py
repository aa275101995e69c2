"""Fault injection: a load generator (``python -m bench.chaos.load``) and what it records."""
