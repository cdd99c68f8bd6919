"""Starts the whole suite as local processes and stops every one of them.

Used by `llmos up` and by the end-to-end tests. Each service is its own process
(`python -m llmos.<service>`), started in dependency order; each writes its bound
address to a file once it serves, and is then health-checked over gRPC. Children
get SIGTERM when the launcher dies (each sets PR_SET_PDEATHSIG itself at start, told
by LLMOS_PARENT_PID: a preexec_fn in a threaded launcher can deadlock the fork), so
none is left behind.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from llmos.common.bootstrap import CLI, SuiteIdentity, issue_certificates, prepare
from llmos.common.server import PARENT_PID_ENV, read_address_file, read_http_address
from llmos.common.store import Store

SERVICES = ("resources", "registry", "worker", "scheduler", "gateway", "monitor")
DEFAULT_PORTS = {"gateway": 50051, "scheduler": 50052, "registry": 50053, "resources": 50054,
                 "worker": 50055, "monitor": 50056}
# The gateway's HTTP door (OpenAI's API).
DEFAULT_HTTP_PORT = 50057
# Which other services' addresses each service is told about.
NEEDS = {
    "resources": (),
    "registry": ("resources",),
    "worker": ("resources", "registry"),
    "scheduler": ("registry",),
    "gateway": ("scheduler", "registry"),
    "monitor": ("gateway", "scheduler", "registry", "resources"),
}


def address_file_of(data_dir: str | Path, name: str) -> Path:
    """Where process `name` of the suite in `data_dir` writes its addresses (`common.server.write_address_file`)."""
    return Path(data_dir) / "run" / f"{name}.addr"


class SuiteError(RuntimeError):
    pass


@dataclass(frozen=True)
class Host:
    """Where some of the suite's processes run: a node with its own address, optionally
    inside a Linux network namespace (how the tests make a cluster on one machine). The
    processes on a host share nothing on disk with another host's but the model store,
    which every host mounts at the same path."""

    name: str           # node name (what the resource manager and the workers call it)
    address: str        # the IP address its processes bind and advertise
    netns: str = ""     # run them in this network namespace ("": the launcher's)


def wait_healthy(address: str, timeout: float, tls_dir: Path | None = None, public: bool = False) -> None:
    """Waits until `address` answers SERVING (over mTLS with the certificate in `tls_dir`; a
    public port as its clients reach it)."""
    deadline = time.monotonic() + timeout
    from llmos.cli.credentials import open_channel

    with open_channel(address, tls_dir, public=public) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            try:
                status = stub.Check(health_pb2.HealthCheckRequest(), timeout=2).status
                if status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline:
                raise SuiteError(f"{address} did not become healthy in {timeout:.0f}s")
            time.sleep(0.1)


def _terminate(process: subprocess.Popen, grace: float) -> int:
    """SIGTERM, then SIGKILL after `grace` seconds; returns the exit code."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    try:
        return process.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        process.kill()
        return process.wait()


@dataclass
class Suite:
    data_dir: Path
    # Port per service; 0 picks a free one. Missing services use DEFAULT_PORTS.
    ports: dict[str, int] = field(default_factory=dict)
    # Extra environment for every child (e.g. OTEL_* or LLMOS_WORKER_DTYPE).
    env: dict[str, str] = field(default_factory=dict)
    python: str = sys.executable
    # The monitor's metrics port (the one a Prometheus scrapes); 0 picks a free one.
    # Every other process serves its metrics on a free port, and the monitor gathers them.
    metrics_port: int = 9464
    # How many workers; past the first ("worker", id "worker-1") they are "worker-2", ...
    workers: int = 1
    # How many gateways (sharing the key store); past the first they are "gateway-2", ...
    gateways: int = 1
    # How many schedulers; past the first they are "scheduler-2", ... One leads at a time (a
    # lease in the store: `store_url`, or else the data directory's scheduler.db); the gateways
    # are told of every one and follow the leader.
    schedulers: int = 1
    # How many registries; past the first they are "registry-2", ... Each serves any call (they
    # share the store: `store_url`, or else the data directory's registry.db); every client is
    # told of all of them and moves to another when the one it uses goes away.
    registries: int = 1
    # One store for every service (`llmos.common.store`); "" keeps each one's SQLite file in
    # the data directory. A cluster store is migrated at start, as `llmos migrate` would.
    store_url: str = ""
    # How many resource managers; past the first they are "resources-2", ... (one per node
    # when the suite spans hosts: a worker leases through the one on its host).
    resources: int = 1
    # Process name → the host it runs on; a process not named runs on loopback here.
    hosts: dict[str, Host] = field(default_factory=dict)
    # Run each service from this container image (`llmos serve <service>`) with this podman
    # command, instead of this Python; the data directory is mounted at the same path.
    image: str = ""
    podman: tuple[str, ...] = ("podman",)
    # The user the image runs as (uid, gid): the data directory is given to it at start.
    image_user: tuple[int, int] = (10001, 10001)
    # How long `with Suite(...)` waits for each process to serve, seconds.
    start_timeout: float = 120.0
    addresses: dict[str, str] = field(default_factory=dict)
    # Where each process serves its Prometheus metrics ("host:port").
    metrics: dict[str, str] = field(default_factory=dict)
    # The first gateway's HTTP door (OpenAI's API) port; 0 picks a free one. Later gateways
    # take free ones. `http` is where each gateway's door serves, once started.
    # None: DEFAULT_HTTP_PORT, or a free one when the gateway's own port is picked free.
    http_port: int | None = None
    http: dict[str, str] = field(default_factory=dict)
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)
    # Its CA, certificates and keys (made at start).
    identity: SuiteIdentity | None = None
    # Supervision (`supervise`): per process, how often it was restarted, and the pending
    # restart of each process that exited (when it is due, and how long it waits next time).
    restarts: dict[str, int] = field(default_factory=dict)
    _pending: dict[str, tuple[float, float]] = field(default_factory=dict, repr=False)
    _started_at: dict[str, float] = field(default_factory=dict, repr=False)

    @property
    def names(self) -> list[str]:
        """Process names in start order: each service, and each worker."""
        extra = {"worker": [f"worker-{i}" for i in range(2, self.workers + 1)],
                 "gateway": [f"gateway-{i}" for i in range(2, self.gateways + 1)],
                 "scheduler": [f"scheduler-{i}" for i in range(2, self.schedulers + 1)],
                 "registry": [f"registry-{i}" for i in range(2, self.registries + 1)],
                 "resources": [f"resources-{i}" for i in range(2, self.resources + 1)]}
        out: list[str] = []
        for service in SERVICES:
            out += [service, *extra.get(service, ())]
        return out

    def start(self, timeout: float = 120.0) -> dict[str, str]:
        self.data_dir = Path(self.data_dir).resolve()
        for sub in ("run", "logs"):
            (self.data_dir / sub).mkdir(parents=True, exist_ok=True)
        if self.store_url:
            store = Store(self.store_url)
            try:
                store.migrate()
            finally:
                store.close()
        self.identity = prepare(self.data_dir, self._certificates(), store_url=self.store_url)
        if self.image:
            subprocess.run(["chown", "-R", "{}:{}".format(*self.image_user), str(self.data_dir)], check=True)
        try:
            for name in self.names:
                self._start_one(name, timeout)
        except BaseException:
            self.stop()
            raise
        return dict(self.addresses)

    def __enter__(self) -> Suite:
        self.start(timeout=self.start_timeout)
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def restart(self, service: str, grace: float = 15.0, timeout: float = 120.0) -> None:
        """Stops one service and starts it again on the same addresses (gRPC and metrics)."""
        _terminate(self.processes.pop(service), grace)
        self._start_again(service, timeout)

    def _start_again(self, name: str, timeout: float) -> None:
        """Starts process `name` on the gRPC and metrics ports it had."""
        metrics, http = self.metrics.get(name, ""), self.http.get(name, "")
        self._start_one(name, timeout, port=int(self.addresses[name].rsplit(":", 1)[1]),
                        metrics_port=int(metrics.rsplit(":", 1)[1]) if metrics else None,
                        http_port=int(http.rsplit(":", 1)[1]) if http else None)

    def _start_one(self, name: str, timeout: float, port: int | None = None,
                   metrics_port: int | None = None, http_port: int | None = None) -> None:
        service = name.split("-")[0]
        prefix = f"LLMOS_{service.upper()}_"
        address_file = address_file_of(self.data_dir, name)
        address_file.unlink(missing_ok=True)
        if port is None:
            port = 0 if name != service else self.ports.get(service, DEFAULT_PORTS[service])
        host = self.hosts.get(name)
        ip = host.address if host else "127.0.0.1"
        data_dir = self.data_dir / "hosts" / host.name if host else self.data_dir
        env = {**os.environ, **self.env,
               prefix + "LISTEN": f"{ip}:{port}",
               prefix + "ADDRESS_FILE": str(address_file),
               prefix + "DATA_DIR": str(data_dir),
               PARENT_PID_ENV: str(os.getpid())}
        if self.store_url:
            env["LLMOS_STORE_URL"] = self.store_url
        if service == "worker" and self.workers > 1:
            env[prefix + "WORKER_ID"] = self._worker_id(name)
        if host and service in ("worker", "resources"):
            env[prefix + "NODE_NAME"] = host.name
        for other in NEEDS[service]:
            env[f"{prefix}{other.upper()}_ADDRESS"] = self.addresses[self._peer(name, other)]
        if service == "gateway":        # every scheduler: the gateway follows their leader
            env[prefix + "SCHEDULER_ADDRESS"] = self._every("scheduler")
        if "registry" in NEEDS[service] and self.registries > 1:     # every registry: any serves any call
            env[prefix + "REGISTRY_ADDRESS"] = self._every("registry")
        if service == "scheduler" and self.schedulers > 1:
            env[prefix + "LEADER_ELECTION"] = "true"
            if not self.store_url:
                env[prefix + "LEASE_STORE_URL"] = f"sqlite:///{self.data_dir / 'scheduler.db'}"
        for key, value in self.identity.settings(service, name).items():
            env.setdefault(prefix + key.upper(), value)
        if metrics_port is None:
            metrics_port = self.metrics_port if service == "monitor" else 0
        env[prefix + "METRICS_LISTEN"] = f"{ip}:{metrics_port}"
        if service == "gateway":
            if http_port is None and name == service:
                http_port = self.http_port
                if http_port is None:
                    http_port = 0 if self.ports.get("gateway", DEFAULT_PORTS["gateway"]) == 0 else DEFAULT_HTTP_PORT
            if http_port is None:
                http_port = 0
            env[prefix + "HTTP_LISTEN"] = f"{ip}:{http_port}"
        if service == "monitor":
            env[prefix + "METRICS_TARGETS"] = ",".join(f"{other}={self.metrics[other]}" for other in NEEDS[service])
        log = open(self.data_dir / "logs" / f"{name}.log", "ab")
        command = [self.python, "-m", f"llmos.{service}"]
        if self.image:
            command = self._container(name, service, host, env)
        elif host and host.netns:
            command = ["ip", "netns", "exec", host.netns, *command]
        self.processes[name] = subprocess.Popen(
            command, env=env, stdin=subprocess.DEVNULL,
            stdout=log, stderr=subprocess.STDOUT, process_group=0)
        log.close()
        deadline = time.monotonic() + timeout
        while not address_file.exists():
            if self.processes[name].poll() is not None:
                raise SuiteError(f"{name} exited with code {self.processes[name].returncode}; the end of "
                                 f"{self.data_dir / 'logs' / (name + '.log')}:\n{self.log_tail(name)}")
            if time.monotonic() > deadline:
                raise SuiteError(f"{name} did not start in {timeout:.0f}s")
            time.sleep(0.05)
        self.addresses[name], self.metrics[name] = read_address_file(address_file)
        if service == "gateway":
            self.http[name] = read_http_address(address_file)
        self._started_at[name] = time.monotonic()
        wait_healthy(self.addresses[name], max(1.0, deadline - time.monotonic()), self.identity.tls_dir(CLI),
                     public=service == "gateway")

    def supervise(self, timeout: float = 120.0, first_delay: float = 1.0,
                  max_delay: float = 30.0) -> list[tuple[str, str]]:
        """One round of supervision: a process that exited is started again on its addresses,
        after a delay that doubles each time it exits soon after a start (from `first_delay`
        to `max_delay`) and starts over once it has run for a minute. Returns what happened,
        (process, "exited with code N; restarting in S s" / "restarted" / "failed to restart: ..."),
        for the launcher to show."""
        happened: list[tuple[str, str]] = []
        now = time.monotonic()
        for name, process in list(self.processes.items()):
            code = process.poll()
            if code is None:
                continue
            del self.processes[name]
            ran = now - self._started_at.get(name, now)
            delay = self._pending.get(name, (0.0, first_delay))[1] if ran < 60 else first_delay
            self._pending[name] = (now + delay, min(delay * 2, max_delay))
            happened.append((name, f"exited with code {code}; restarting in {delay:.0f} s"))
        for name, (due, next_delay) in list(self._pending.items()):
            if name in self.processes or time.monotonic() < due:
                continue
            try:
                self._start_again(name, timeout)
            except SuiteError as exc:
                leftover = self.processes.pop(name, None)
                if leftover is not None:
                    _terminate(leftover, 5.0)     # it may be running but not serving: it holds the port
                self._pending[name] = (time.monotonic() + next_delay, min(next_delay * 2, max_delay))
                happened.append((name, f"failed to restart: {str(exc).splitlines()[0]}; trying again in "
                                       f"{next_delay:.0f} s"))
                continue
            self._pending[name] = (0.0, next_delay)
            self.restarts[name] = self.restarts.get(name, 0) + 1
            happened.append((name, f"restarted (restart {self.restarts[name]})"))
        return happened

    def stop(self, grace: float = 15.0) -> dict[str, int]:
        """Stops the services front to back (gateway before workers, so streams drain):
        SIGTERM, then SIGKILL after `grace` seconds. Returns each exit code."""
        codes = {name: _terminate(process, grace) for name, process in reversed(list(self.processes.items()))}
        self.processes.clear()
        return codes

    def _container(self, name: str, service: str, host: Host | None, env: dict[str, str]) -> list[str]:
        """The podman command that runs process `name` from the image: in its host's network
        namespace, with its settings (LLMOS_* and OTEL_* only) and the data directory."""
        network = f"ns:/run/netns/{host.netns}" if host and host.netns else "host"
        settings = [f"--env={k}={v}" for k, v in sorted(env.items())
                    if k.startswith(("LLMOS_", "OTEL_")) and k != PARENT_PID_ENV]
        return [*self.podman, "run", "--rm", "--init", f"--name=llmos-{os.getpid()}-{name}",
                f"--label=llmos.suite={os.getpid()}", f"--network={network}",
                f"--volume={self.data_dir}:{self.data_dir}", *settings, self.image, "serve", service]

    def _every(self, service: str) -> str:
        """The addresses of every started process of `service`, comma-separated."""
        return ",".join(self.addresses[n] for n in self.names if n.split("-")[0] == service and n in self.addresses)

    def _peer(self, name: str, service: str) -> str:
        """The process of `service` that process `name` talks to: the one on its own host
        when there is one (a worker's resource manager), else the first."""
        host = self.hosts.get(name)
        if host is not None:
            for other in self.names:
                if other.split("-")[0] == service and self.hosts.get(other) == host and other in self.addresses:
                    return other
        return service

    def _worker_id(self, name: str) -> str:
        if self.workers == 1:
            return f"{socket.gethostname()}-worker"      # the worker's own default
        return name if name != "worker" else "worker-1"

    def _certificates(self) -> list[tuple[str, str, str, tuple[str, ...]]]:
        """(process, service, instance, hosts) of every process: a worker's instance is its id;
        its certificate names the address of its host (and loopback)."""
        return [(name, name.split("-")[0], self._worker_id(name) if name.startswith("worker") else name,
                 (*((self.hosts[name].address,) if name in self.hosts else ()), "127.0.0.1", "localhost"))
                for name in self.names]

    def rotate_certificates(self) -> None:
        """Issues every process a new certificate in place, as a certificate manager would."""
        issue_certificates(self.identity, self._certificates())

    def client(self, api_key: str | None = None):
        """A client of this suite: the CLI's certificate, and the local admin key unless another is given."""
        from llmos.cli.credentials import client_of_suite

        return client_of_suite(self.addresses, self.identity, api_key)

    def log_tail(self, service: str, lines: int = 40) -> str:
        path = self.data_dir / "logs" / f"{service}.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""
