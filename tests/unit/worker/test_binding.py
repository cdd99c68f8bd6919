"""Which worker processes bind their OpenMP threads one to a core."""

import os
import subprocess
import sys

from llmos.worker import openmp_binding

WORKER = ["python3", "-m", "llmos.worker"]
BOUND = {"OMP_PROC_BIND": "true", "OMP_PLACES": "cores"}


def test_a_worker_process_binds_its_threads_by_default():
    assert openmp_binding(WORKER, {}) == BOUND
    assert openmp_binding(["python", "-X", "dev", "-m", "llmos.worker"], {"LLMOS_WORKER_THREADS": "0"}) == BOUND


def test_not_where_the_worker_was_given_threads_or_openmp_settings_or_told_not_to():
    assert openmp_binding(WORKER, {"LLMOS_WORKER_THREADS": "1"}) == {}
    assert openmp_binding(WORKER, {"OMP_PROC_BIND": "spread"}) == {}
    assert openmp_binding(WORKER, {"OMP_PLACES": "threads"}) == {}
    assert openmp_binding(WORKER, {"GOMP_CPU_AFFINITY": "0-3"}) == {}
    assert openmp_binding(WORKER, {"LLMOS_WORKER_BIND_THREADS": "false"}) == {}


def test_not_in_a_process_that_only_imports_the_worker_package():
    assert openmp_binding(["python", "-m", "pytest", "tests"], {}) == {}
    assert openmp_binding(["python", "-m", "llmos.gateway"], {}) == {}
    assert openmp_binding(["llmos", "up"], {}) == {}
    assert openmp_binding(["python", "-m"], {}) == {}
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMP_", "GOMP_"))}
    shown = subprocess.run([sys.executable, "-c", "import os, llmos.worker; print(os.environ.get('OMP_PROC_BIND'))"],
                           env=env, capture_output=True, text=True, check=True)
    assert shown.stdout.strip() == "None"
