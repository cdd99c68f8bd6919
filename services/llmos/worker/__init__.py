"""The worker: loaded models and the inference engine."""

import os
import sys

# OpenMP binds the engine's threads one to a core (of those this process may run on), as vLLM's CPU backend
# binds its own. The first is the main thread, the engine driver's, and the threads the worker starts after
# it (the event loop's, gRPC's) inherit its core: they pass the interpreter lock back and forth with the
# driver there, and leave the other cores to the team. At 64 streams through the gateway on two cores,
# three restarts each, alternating: unbound 1,478-1,569 tok/s (mean 1,525), bound with the serving threads
# free to run anywhere 1,528-1,576 (1,549), bound so 1,562-1,602 (1,586). Set here, before torch loads
# OpenMP (which reads them once), and only in a worker's own process (`python -m llmos.worker`), not in
# one that imports this package. Not where the worker was given a thread count of its own
# (`LLMOS_WORKER_THREADS`: it may share the cores with another) or OpenMP settings, nor with
# `LLMOS_WORKER_BIND_THREADS=false`.
_argv = sys.orig_argv
if ("-m" in _argv[:-1] and _argv[_argv.index("-m") + 1] == __name__
        and os.environ.get("LLMOS_WORKER_BIND_THREADS", "true").strip().lower() not in ("false", "0", "no", "off")
        and os.environ.get("LLMOS_WORKER_THREADS", "0").strip() in ("", "0")
        and not any(os.environ.get(name) for name in ("OMP_PROC_BIND", "OMP_PLACES", "GOMP_CPU_AFFINITY"))):
    os.environ["OMP_PROC_BIND"] = "true"
    os.environ["OMP_PLACES"] = "cores"
