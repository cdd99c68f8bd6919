"""Compiling at load: where a worker keeps what it compiled."""

from __future__ import annotations

import os
import subprocess
import sys


def test_a_worker_keeps_what_it_compiled_in_its_data_directory(tiny_model_dir, tmp_path):
    """In a fresh interpreter (this one may have compiled the kernel already, and would not again),
    as a worker starts: its data directory holds inductor's cache once a bf16 model has loaded, and
    nothing goes where the environment pointed before."""
    script = f"""
import torch
from llmos.engine.loader import load_model
from llmos.worker.__main__ import WorkerSettings, keep_compiled
print(keep_compiled(WorkerSettings(data_dir={str(tmp_path)!r})))
loaded = load_model("m", {str(tiny_model_dir)!r}, torch.device("cpu"), torch.bfloat16, 4096, 256, compile=True)
print(loaded.compiled)
"""
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "elsewhere")}   # torch's, or a test run's
    first = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-3000:]
    assert first.stdout.split() == [str(tmp_path / "inductor"), "True"]
    kept = [p for p in (tmp_path / "inductor").rglob("*") if p.is_file()]
    assert kept, "nothing compiled was kept"
    # (torch makes the directory the environment names as it is imported; nothing is compiled there)
    assert not [p for p in (tmp_path / "elsewhere").rglob("*") if p.is_file()]
