"""Benchmarks that need the in-process suite of the tests (`tests/support/inprocess.py`); run
from the repository root: `python -m benchmarks.telemetry`, `python -m benchmarks.security`."""
