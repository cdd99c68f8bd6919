"""The suite run from the image (deploy/Containerfile), one container per process, across
the network namespaces of the cluster test: the image, its entrypoint (`llmos serve`) and
its settings are the ones the Kubernetes manifests use. `make image-test` builds the image
and runs this."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from llmos.suite import Suite
from llmos.v1 import common_pb2, registry_pb2
from tests.e2e.test_cluster import network, store  # noqa: F401 - the same private network and PostgreSQL
from tests.support.suites import FREE_PORTS, quiet_env, three_hosts

IMAGE = os.environ.get("LLMOS_TEST_IMAGE", "")
WORK = Path(os.environ.get("IMAGE_WORK", Path(__file__).resolve().parents[2] / ".image")).resolve()
PODMAN = ("podman", "--root", str(WORK / "storage"), "--runroot", str(WORK / "run"))


@pytest.fixture(scope="module")
def containers(network, store, tiny_model_dir):  # noqa: F811
    os.environ["CONTAINERS_CONF"] = str(WORK / "containers.conf")
    data = Path(tempfile.mkdtemp(prefix="llmos-test-image-"))
    os.chmod(data, 0o755)
    shutil.copytree(tiny_model_dir, data / "imports" / "tiny")
    suite = Suite(data, ports=FREE_PORTS, metrics_port=0, workers=2, resources=2, hosts=three_hosts(network),
                  store_url=store.create_database(), image=IMAGE, podman=PODMAN, start_timeout=240,
                  env=quiet_env(data / "imports", LLMOS_WORKER_REGISTER_INTERVAL_SECONDS="1"))
    try:
        with suite:
            yield suite
    finally:
        left = subprocess.run([*PODMAN, "ps", "-a", "-q", "--filter", f"label=llmos.suite={os.getpid()}"],
                              capture_output=True, text=True).stdout.split()
        subprocess.run([*PODMAN, "rm", "-f", *left], capture_output=True)
        shutil.rmtree(data, ignore_errors=True)
        assert left == [], "containers were left running"


def test_every_process_is_a_container_of_the_image_running_unprivileged(containers):
    names = subprocess.run([*PODMAN, "ps", "--format", "{{.Names}}", "--filter",
                            f"label=llmos.suite={os.getpid()}"], capture_output=True, text=True,
                           check=True).stdout.split()
    assert len(names) == len(containers.names) == 8
    for name in names:
        info = json.loads(subprocess.run([*PODMAN, "inspect", name], capture_output=True, text=True,
                                         check=True).stdout)[0]
        assert info["Config"]["User"] == "10001:10001" and info["ImageName"].endswith(IMAGE.split("/")[-1])
        assert info["Config"]["Entrypoint"] == ["llmos"] or info["Config"]["Entrypoint"] == "llmos"


def test_the_containers_serve_across_hosts(containers):
    with containers.client() as client:
        client.import_model("tiny", str(containers.data_dir / "imports" / "tiny"))
        client.registry.LoadModel(registry_pb2.LoadModelRequest(name="tiny", replicas=2), timeout=300)
        assert {p.worker_id for p in client.get_model("tiny").placements
                if p.state == common_pb2.Model.STATE_READY} == {"worker-1", "worker-2"}
        with ThreadPoolExecutor(8) as pool:
            finals = list(pool.map(lambda i: list(client.generate(
                "tiny", prompt=f"Container {i}", max_tokens=16, ignore_eos=True, timeout=120))[-1], range(8)))
        assert [f.usage.completion_tokens for f in finals] == [16] * 8
        health = client.cluster_health()
        assert health.healthy, [(c.component, c.state) for c in health.components]
