"""A real PostgreSQL server for the tests: made with initdb in a temporary directory, on a
free loopback port, stopped and removed by the test session. Never a shared system service.

PostgreSQL refuses to run as root; when the tests run as root the server runs as the
`postgres` user (Debian's package makes it)."""

from __future__ import annotations

import itertools
import os
import pwd
import shutil
import socket
import subprocess
from pathlib import Path

_names = itertools.count(1)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PostgresServer:
    def __init__(self, directory: Path, user: str = "llmos", host: str = "127.0.0.1",
                 prefix: list[str] | None = None) -> None:
        """`host`: the address it listens on; `prefix`: what its commands run under (e.g.
        `ip netns exec NAME`, to run it inside a network namespace)."""
        self.directory = Path(directory)
        self.data = self.directory / "data"
        self.user = user
        self.port = _free_port()
        self.host = host
        self._as: list[str] = list(prefix or [])
        if os.geteuid() == 0:
            self._as += ["runuser", "-u", "postgres", "--"]
            owner = pwd.getpwnam("postgres")
            os.chown(self.directory, owner.pw_uid, owner.pw_gid)

    def _run(self, *command: str) -> None:
        subprocess.run([*self._as, *command], check=True, capture_output=True, timeout=120)

    def init(self, clients: str = "") -> PostgresServer:
        """Makes the cluster; `clients`: a subnet ("10.1.2.0/24") allowed to connect besides loopback."""
        self._run("initdb", "-D", str(self.data), "-A", "trust", "-U", self.user, "-E", "UTF8", "--no-sync")
        if clients:
            with open(self.data / "pg_hba.conf", "a") as hba:
                hba.write(f"host all all {clients} trust\n")
        return self

    def start(self) -> PostgresServer:
        options = (f"-p {self.port} -k {self.directory} -c listen_addresses={self.host} "
                   f"-c max_connections=200 -c fsync=off")
        self._run("pg_ctl", "-D", str(self.data), "-o", options, "-l", str(self.directory / "server.log"),
                  "-w", "-t", "60", "start")
        return self

    def stop(self, mode: str = "fast") -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "-t", "60", "stop")

    def kill(self) -> None:
        """Ends the server as a crash would (SIGKILL to the postmaster and its children)."""
        pid = int((self.data / "postmaster.pid").read_text().splitlines()[0])
        subprocess.run(["pkill", "-KILL", "-P", str(pid)], check=False)
        os.kill(pid, 9)
        for _ in range(200):
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            subprocess.run(["sleep", "0.05"], check=False)
        (self.data / "postmaster.pid").unlink(missing_ok=True)

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg://{self.user}@{self.host}:{self.port}/{database}"

    def create_database(self, name: str | None = None) -> str:
        """A new empty database; returns its URL."""
        import psycopg

        name = name or f"t{next(_names)}"
        with psycopg.connect(host=self.host, port=self.port, user=self.user, dbname="postgres",
                             autocommit=True) as connection:
            connection.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def remove(self) -> None:
        try:
            self.stop("immediate")
        except subprocess.CalledProcessError:
            pass
        shutil.rmtree(self.directory, ignore_errors=True)
