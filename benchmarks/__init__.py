"""Benchmarks run from the repository root: `python -m benchmarks.telemetry` and
`python -m benchmarks.security` run the whole suite in one process (the tests' harness,
`tests/support/inprocess.py`), `python -m benchmarks.scheduler` the scheduler's core alone."""
