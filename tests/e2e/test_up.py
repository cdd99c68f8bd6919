"""`llmos up` as a newcomer runs it: a healthy suite, a streamed answer, and nothing left behind."""

from __future__ import annotations

import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import psutil
import pytest

from tests.support.metrics import sample_sum, scrape


def free_port_block(size: int = 6) -> int:
    """A base port whose next `size` ports are free right now."""
    for _ in range(50):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            base = probe.getsockname()[1]
        if base + size >= 65535:
            continue
        sockets = []
        try:
            for port in range(base, base + size):
                s = socket.socket()
                s.bind(("127.0.0.1", port))
                sockets.append(s)
            return base
        except OSError:
            continue
        finally:
            for s in sockets:
                s.close()
    raise RuntimeError("no free block of ports")


class Output:
    """What `llmos up` prints, read by one thread as it comes."""

    def __init__(self, process: subprocess.Popen) -> None:
        self.process = process
        self.text = ""
        self._lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=lambda: [self._lines.put(line) for line in process.stdout], daemon=True).start()

    def until(self, marker: str, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while marker not in self.text:
            if time.monotonic() > deadline:
                raise AssertionError(f"`llmos up` did not print {marker!r}:\n{self.text}")
            try:
                self.text += self._lines.get(timeout=0.5)
            except queue.Empty:
                if self.process.poll() is not None:
                    raise AssertionError(f"`llmos up` exited ({self.process.returncode}):\n{self.text}") from None
        return self.text


@pytest.mark.smollm2
def test_llmos_up_streams_an_answer_restarts_a_dead_service_and_stops_everything(e2e_data_dir):
    """Stopped with SIGTERM, as systemd and Kubernetes stop it: `llmos up` turns SIGTERM into the
    KeyboardInterrupt Ctrl-C raises, so both take the one way out tested here."""
    base = free_port_block()
    process = subprocess.Popen(
        [sys.executable, "-m", "llmos.cli", "up", "--data-dir", str(e2e_data_dir), "--port-base", str(base),
         "--metrics-port", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        printed = Output(process)
        output = printed.until("press Ctrl-C to stop", timeout=280)
        assert "Paris" in output
        assert f"127.0.0.1:{base}" in output
        # The metrics endpoint it prints serves the whole cluster's metrics, which counted the answer.
        families = scrape(re.search(r"metrics: http://(\S+)/metrics", output).group(1))
        assert families["llmos_time_to_first_token_seconds"].type == "histogram"
        assert families["llmos_kv_cache_usage_perc"].type == "gauge"
        assert sample_sum(families, "llmos_generation_tokens_total") >= 5
        assert any(s.labels["component"].startswith("worker/") for s in families["llmos_num_requests_running"].samples)
        # `llmos generate` needs no key typed: the CLI reads the local admin key `llmos up` made (0600).
        key_file = e2e_data_dir / "keys" / "admin.key"
        assert key_file.stat().st_mode & 0o777 == 0o600
        answer = subprocess.run([sys.executable, "-m", "llmos.cli", "--gateway", f"127.0.0.1:{base}", "--data-dir",
                                 str(e2e_data_dir), "generate", "--max-tokens", "12", "What is the capital of France?"],
                                capture_output=True, text=True, timeout=120)
        assert answer.returncode == 0 and "Paris" in answer.stdout, answer.stdout + answer.stderr
        cli = [sys.executable, "-m", "llmos.cli", "--data-dir", str(e2e_data_dir),
               *(f"--{service}=127.0.0.1:{base + offset}" for offset, service in
                 enumerate(["gateway", "scheduler", "registry", "resources", "worker", "monitor"])
                 if service != "worker")]
        # A service that exits is started again; `llmos status` counts it, and the suite goes on.
        scheduler = next(p for p in psutil.Process(process.pid).children(recursive=True)
                         if "llmos.scheduler" in p.cmdline())
        scheduler.kill()
        printed.until("scheduler restarted (restart 1)", timeout=120)
        assert "scheduler exited with code -9; restarting in 1 s" in printed.text

        def status_counts_it():
            shown = subprocess.run([*cli, "status"], capture_output=True, text=True, timeout=60).stdout
            return re.search(r"^\s+scheduler .* 1 restarts", shown, re.MULTILINE)
        for _ in range(60):
            if status_counts_it():
                break
            time.sleep(1)
        else:
            raise AssertionError("`llmos status` never showed the scheduler's restart")
        again = subprocess.run([*cli, "generate", "--max-tokens", "4", "Hi"], capture_output=True, text=True,
                               timeout=120)
        assert again.returncode == 0, again.stderr
        children = psutil.Process(process.pid).children(recursive=True)
        assert len(children) >= 6
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)
        assert process.returncode == 0
        gone, alive = psutil.wait_procs(children, timeout=5)
        assert not alive, f"left running: {[p.pid for p in alive]}"
    finally:
        if process.poll() is None:
            process.kill()
