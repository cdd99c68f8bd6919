"""The suite as a small cluster on this one machine: three "hosts", each a Linux network
namespace with its own address on a private subnet the test makes (a bridge and veth pairs).
The control plane (PostgreSQL as the store, registry, scheduler, gateway, monitor) runs on
one; each of the other two runs a resource manager and a worker. Every connection between
them is mTLS with certificates whose SANs are those addresses; the test, outside every
namespace, is the user. Nothing is shared on disk between the hosts but the model store,
which each host mounts at the same path. The test removes every namespace it made.

`make test` runs it from the container image (deploy/Containerfile, built by `make image`), one
container per process: LLMOS_TEST_IMAGE names the image and IMAGE_WORK podman's storage. So the
image, its entrypoint (`llmos serve <service>`) and its settings are the ones the Kubernetes
manifests use. Without LLMOS_TEST_IMAGE each process is a plain process in its namespace."""

from __future__ import annotations

import json
import os
import shutil
import socket
import ssl
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from llmos.cli.launcher import Suite
from llmos.common.tls import TlsFiles
from llmos.v1 import common_pb2, registry_pb2, resources_pb2
from tests.support.metrics import sample_sum, scrape
from tests.support.netns import PrivateNetwork
from tests.support.postgres import PostgresServer
from tests.support.suites import FREE_PORTS, quiet_env, three_hosts

pytestmark = pytest.mark.skipif(shutil.which("ip") is None, reason="needs iproute2 to make network namespaces")


@pytest.fixture(scope="module")
def network():
    network = PrivateNetwork(["cp", "h1", "h2"]).create()
    yield network
    network.remove()
    assert network.leftovers() == [], "a namespace or link of the test network is left"


@pytest.fixture(scope="module")
def store(network):
    server = PostgresServer(Path(tempfile.mkdtemp(prefix="llmos-test-postgres-")), host=network.addresses["cp"],
                            prefix=network.exec_prefix("cp"))
    server.init(clients=f"{network.subnet}.0/24").start()
    yield server
    server.remove()


IMAGE = os.environ.get("LLMOS_TEST_IMAGE", "")


def podman() -> tuple[str, ...]:
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "llmos" / "image"   # the Makefile's
    work = Path(os.environ.get("IMAGE_WORK", default)).resolve()
    os.environ["CONTAINERS_CONF"] = str(work / "containers.conf")
    return "podman", "--root", str(work / "storage"), "--runroot", str(work / "run")


def containers_of(suite: Suite) -> list[str]:
    """The containers of this test's suite that exist (running or not)."""
    return subprocess.run([*suite.podman, "ps", "-a", "--format", "{{.Names}}", "--filter",
                           f"label=llmos.suite={os.getpid()}"], capture_output=True, text=True,
                          check=True).stdout.split()


@pytest.fixture(scope="module")
def cluster(network, store, tiny_model_dir):
    data = Path(tempfile.mkdtemp(prefix="llmos-test-cluster-"))
    os.chmod(data, 0o755)                               # the image's user reaches it
    shutil.copytree(tiny_model_dir, data / "imports" / "tiny")
    image = {"image": IMAGE, "podman": podman()} if IMAGE else {}
    suite = Suite(data, ports=FREE_PORTS, metrics_port=0, workers=2, resources=2, hosts=three_hosts(network),
                  store_url=store.create_database(), start_timeout=240, **image,
                  env=quiet_env(data / "imports", LLMOS_WORKER_REGISTER_INTERVAL_SECONDS="1"))
    try:
        with suite:
            yield suite
    finally:
        left = containers_of(suite) if IMAGE else []
        if left:
            subprocess.run([*suite.podman, "rm", "-f", *left], capture_output=True)
        shutil.rmtree(data, ignore_errors=True)
        assert left == [], "containers were left"


@pytest.mark.skipif(not IMAGE, reason="the suite runs from the image only where LLMOS_TEST_IMAGE names one")
def test_every_process_is_a_container_of_the_image_running_unprivileged(cluster):
    names = containers_of(cluster)
    assert len(names) == len(cluster.names) == 8
    for name in names:
        info = json.loads(subprocess.run([*cluster.podman, "inspect", name], capture_output=True, text=True,
                                         check=True).stdout)[0]
        assert info["State"]["Running"], name
        assert info["Config"]["User"] == "10001:10001" and info["ImageName"].endswith(IMAGE.split("/")[-1])
        assert info["Config"]["Entrypoint"] in (["llmos"], "llmos")


def reachable_in(netns: str, ip: str, port: int) -> bool:
    """Whether a TCP connection to ip:port succeeds from inside network namespace `netns`."""
    probe = f"import socket; s = socket.socket(); s.settimeout(5); raise SystemExit(s.connect_ex(({ip!r}, {port})))"
    return subprocess.run(["ip", "netns", "exec", netns, "python3", "-c", probe], timeout=30).returncode == 0


def test_every_service_binds_and_advertises_its_own_hosts_address(cluster, network):
    for name, host in cluster.hosts.items():
        ip, port = cluster.addresses[name].rsplit(":", 1)
        assert ip == host.address, f"{name} serves on {ip}, not its host's {host.address}"
        # Not reachable on the loopback of its own namespace. (Probed from inside that namespace:
        # the test's own loopback is shared with the other tests, whose servers may hold the port.)
        assert not reachable_in(host.netns, "127.0.0.1", int(port)), f"{name} also serves on its loopback"
        assert reachable_in(host.netns, ip, int(port)), f"{name} is not reachable on {ip} in its namespace"
    with cluster.client() as client:
        workers = {w.worker_id: w.address for w in client.registry.ListWorkers(
            registry_pb2.ListWorkersRequest(), timeout=10).workers}
        nodes = {n.name for n in client.nodes()}
    assert workers == {"worker-1": cluster.addresses["worker"], "worker-2": cluster.addresses["worker-2"]}
    assert {"h1", "h2"} <= nodes, "each host's resource manager publishes its node to the store"


def test_certificates_name_each_hosts_address_and_nothing_else_passes(cluster, network):
    """A client that expects worker-2's certificate on worker-1's address is refused: each
    certificate is valid for its own host's address only (and loopback)."""
    files = TlsFiles.read(cluster.identity.tls_dir("cli"))
    context = ssl.create_default_context(cadata=files.ca.decode())
    ip, port = cluster.addresses["worker"].rsplit(":", 1)
    with socket.create_connection((ip, int(port)), timeout=10) as raw:
        with context.wrap_socket(raw, server_hostname=ip) as tls:
            assert tls.version()                          # the right name: accepted
    with socket.create_connection((ip, int(port)), timeout=10) as raw:
        with pytest.raises(ssl.SSLCertVerificationError):
            context.wrap_socket(raw, server_hostname=network.addresses["h2"])


def test_requests_run_on_both_worker_hosts_and_leases_sit_on_their_nodes(cluster):
    with cluster.client() as client:
        client.import_model("tiny", str(cluster.data_dir / "imports" / "tiny"))
        client.registry.LoadModel(registry_pb2.LoadModelRequest(name="tiny", replicas=2), timeout=300)
        placed = {p.worker_id for p in client.get_model("tiny").placements
                  if p.state == common_pb2.Model.STATE_READY}
        assert placed == {"worker-1", "worker-2"}
        with ThreadPoolExecutor(8) as pool:
            finals = list(pool.map(lambda i: list(client.generate(
                "tiny", prompt=f"Host {i}", max_tokens=24, ignore_eos=True, timeout=120))[-1], range(16)))
        assert [f.usage.completion_tokens for f in finals] == [24] * 16
        served = {name: sample_sum(scrape(cluster.metrics[name]), "llmos_generation_tokens_total")
                  for name in ("worker", "worker-2")}
        assert all(tokens > 0 for tokens in served.values()), served
        leases = {(lease.node, lease.holder.split("/")[1]) for lease in client.resources.ListLeases(
            resources_pb2.ListLeasesRequest(), timeout=10).leases}
        assert leases == {("h1", "worker-1"), ("h2", "worker-2")}
