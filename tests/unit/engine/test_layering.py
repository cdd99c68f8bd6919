"""The engine is a library: it imports no gRPC (the worker service hosts it)."""

import pkgutil
import subprocess
import sys

import llmos.engine


def test_every_engine_module_imports_without_grpc():
    modules = [f"llmos.engine.{m.name}" for m in pkgutil.iter_modules(llmos.engine.__path__)]
    assert "llmos.engine.engine" in modules and len(modules) > 10
    program = "; ".join([*(f"import {m}" for m in modules), "import sys",
                         "print(sorted(m for m in sys.modules if m == 'grpc' or m.startswith(('grpc.', 'llmos.v1'))))"])
    out = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
