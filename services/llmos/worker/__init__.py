"""The worker: loaded models and the inference engine."""

import os
import sys
from collections.abc import Mapping, Sequence


def openmp_binding(argv: Sequence[str], environ: Mapping[str, str]) -> dict[str, str]:
    """The OpenMP settings a worker's process starts with: its threads bound one to a core.

    OpenMP binds the engine's threads one to a core (of those the process may run on), as vLLM's CPU
    backend binds its own. The first is the main thread, the engine driver's, and the threads the worker
    starts after it (the event loop's, gRPC's) inherit its core: they pass the interpreter lock back and
    forth with the driver there and leave the other cores to the team. At 64 streams through the gateway
    on two cores, three restarts each, alternating: unbound 1,478-1,569 tok/s (mean 1,525), bound with the
    serving threads free to run anywhere 1,528-1,576 (1,549), bound so 1,562-1,602 (1,586).

    Only for a worker's own process (`python -m llmos.worker`, as `llmos serve worker` runs it), not one
    that imports this package; not where the worker was given a thread count of its own
    (`LLMOS_WORKER_THREADS`: it may share the cores with another) or OpenMP settings, nor with
    `LLMOS_WORKER_BIND_THREADS=false`."""
    argv = list(argv)
    if "-m" not in argv[:-1] or argv[argv.index("-m") + 1] != __name__:
        return {}
    if environ.get("LLMOS_WORKER_BIND_THREADS", "true").strip().lower() in ("false", "0", "no", "off"):
        return {}
    if environ.get("LLMOS_WORKER_THREADS", "0").strip() not in ("", "0"):
        return {}
    if any(environ.get(name) for name in ("OMP_PROC_BIND", "OMP_PLACES", "GOMP_CPU_AFFINITY")):
        return {}
    return {"OMP_PROC_BIND": "true", "OMP_PLACES": "cores"}


# Here, before torch loads OpenMP, which reads them once.
os.environ.update(openmp_binding(sys.orig_argv, os.environ))
