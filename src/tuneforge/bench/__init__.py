"""Benchmarks: `tuneforge bench` (runner.py), its cases (cases.py), one process per system (worker.py)."""
