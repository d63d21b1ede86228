"""Benchmarks: each module prints JSON lines of figures (``python -m bench`` runs them all)."""
