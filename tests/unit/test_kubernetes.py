"""The Kubernetes manifests, rendered by `kubectl kustomize` for each overlay and checked
offline: every object against the Kubernetes schemas (strict: an unknown field or a removed
API fails), then what schemas cannot say: selectors match pods, every container has probes
and resource requests, the NetworkPolicies allow exactly the method table's edges, only
workers get GPUs, and every setting the manifests give is one a service reads."""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from llmos.common.authz import TABLE
from llmos.common.settings import ServiceSettings
from tests.support.inprocess import _builders

KUBERNETES = Path(__file__).resolve().parents[2] / "deploy" / "kubernetes"
VERSION = "1.32"
WORKLOADS = {"Deployment", "StatefulSet", "DaemonSet", "Job"}
SERVICE_OF = {"GatewayService": "gateway", "IdentityService": "gateway", "SchedulerService": "scheduler",
              "RegistryService": "registry", "ResourceService": "resources", "WorkerService": "worker",
              "MonitorService": "monitor"}

pytestmark = pytest.mark.skipif(shutil.which("kubectl") is None, reason="needs kubectl (kustomize)")


def render(overlay: str) -> list[dict]:
    out = subprocess.run(["kubectl", "kustomize", str(KUBERNETES / "overlays" / overlay)], check=True,
                         capture_output=True, text=True, timeout=120).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


@pytest.fixture(scope="module", params=["cpu", "gpu"])
def rendered(request):
    return request.param, render(request.param)


def pod_templates(objects):
    for obj in objects:
        if obj["kind"] in WORKLOADS:
            yield obj, obj["spec"]["template"]


def matches(selector: dict, labels: dict) -> bool:
    wanted = selector.get("matchLabels", {})
    if any(labels.get(k) != v for k, v in wanted.items()):
        return False
    for expression in selector.get("matchExpressions", []):
        if expression["operator"] == "In" and labels.get(expression["key"]) not in expression["values"]:
            return False
    return True


def test_every_object_is_valid_against_the_kubernetes_schemas(rendered):
    import kubernetes_validate

    _, objects = rendered
    assert len(objects) > 40
    for obj in objects:
        try:
            kubernetes_validate.validate(obj, VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            raise AssertionError(f"{obj['kind']}/{obj['metadata']['name']}: {exc.message} at "
                                 f"{'.'.join(map(str, exc.path))}") from None


def test_a_removed_api_or_an_unknown_field_is_caught():
    """The check above can fail: an old PodDisruptionBudget API and a misspelt field are refused."""
    import kubernetes_validate

    old = {"apiVersion": "policy/v1beta1", "kind": "PodDisruptionBudget", "metadata": {"name": "x"},
           "spec": {"maxUnavailable": 1, "selector": {"matchLabels": {"a": "b"}}}}
    with pytest.raises(kubernetes_validate.SchemaNotFoundError):
        kubernetes_validate.validate(old, VERSION, strict=True)
    typo = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "x"},
            "spec": {"selectr": {"a": "b"}, "ports": [{"port": 1}]}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(typo, VERSION, strict=True)


def test_every_selector_matches_pods(rendered):
    _, objects = rendered
    pods = [template["metadata"]["labels"] for _, template in pod_templates(objects)]
    for workload, template in pod_templates(objects):
        selector = workload["spec"].get("selector")
        if selector is not None:
            assert matches(selector, template["metadata"]["labels"]), workload["metadata"]["name"]
    for obj in objects:
        kind, name = obj["kind"], obj["metadata"]["name"]
        if kind == "Service":
            assert any(matches({"matchLabels": obj["spec"]["selector"]}, labels) for labels in pods), name
        elif kind in ("PodDisruptionBudget", "NetworkPolicy") and (obj["spec"].get("selector") or
                                                                 obj["spec"].get("podSelector")):
            selector = obj["spec"].get("selector") or obj["spec"]["podSelector"]
            assert any(matches(selector, labels) for labels in pods), f"{kind}/{name} selects no pod"
        elif kind == "HorizontalPodAutoscaler":
            target = obj["spec"]["scaleTargetRef"]
            assert any(o["kind"] == target["kind"] and o["metadata"]["name"] == target["name"] for o in objects)
            assert obj["spec"]["minReplicas"] >= 1, "at least one worker stays warm"


def test_every_container_has_probes_and_resource_requests(rendered):
    _, objects = rendered
    for workload, template in pod_templates(objects):
        spec = template["spec"]
        for container in spec["containers"] + spec.get("initContainers", []):
            where = f"{workload['metadata']['name']}/{container['name']}"
            requests = container.get("resources", {}).get("requests", {})
            assert {"cpu", "memory"} <= set(requests), f"{where} requests no cpu or memory"
            assert container.get("resources", {}).get("limits", {}).get("memory"), f"{where} has no memory limit"
            assert container.get("securityContext", {}).get("allowPrivilegeEscalation") is False, where
            if workload["kind"] != "Job" and container in spec["containers"]:
                assert container.get("readinessProbe") and container.get("livenessProbe"), f"{where} lacks probes"
        assert spec["securityContext"]["runAsNonRoot"] is True


def test_llmos_probes_ask_the_plain_health_port_readiness_and_liveness_apart(rendered):
    _, objects = rendered
    for workload, template in pod_templates(objects):
        for container in template["spec"]["containers"]:
            if container.get("image", "").split(":")[0].endswith("llmos") and workload["kind"] != "Job":
                assert container["readinessProbe"]["grpc"] == {"port": 8081}
                assert container["livenessProbe"]["grpc"] == {"port": 8081, "service": "liveness"}


def method_table_edges() -> set[tuple[str, str]]:
    edges = set()
    for method, rule in TABLE.items():
        callee = SERVICE_OF[method.split("/")[1].rsplit(".", 1)[1]]
        edges |= {(caller, callee) for caller in rule.services}
    return edges


def component(selector: dict) -> str:
    return selector["matchLabels"]["app.kubernetes.io/component"]


def test_network_policies_allow_exactly_the_edges_of_the_method_table(rendered):
    _, objects = rendered
    policies = [o for o in objects if o["kind"] == "NetworkPolicy"]
    deny = [p for p in policies if p["spec"]["podSelector"] == {} and not p["spec"].get("ingress")
            and not p["spec"].get("egress")]
    assert deny and set(deny[0]["spec"]["policyTypes"]) == {"Ingress", "Egress"}, "no default deny"
    ingress, egress = set(), set()
    for policy in policies:
        if policy["metadata"].get("labels", {}).get("llmos.dev/edge") != "method-table":
            # The others must not open an llmos gRPC port between llmos components.
            for rule in policy["spec"].get("ingress", []):
                grpc_ports = {p["port"] for p in rule.get("ports", [])} & set(range(50052, 50057))
                assert not grpc_ports, f"{policy['metadata']['name']} opens {grpc_ports} outside the table"
            continue
        own = component(policy["spec"]["podSelector"])
        for rule in policy["spec"].get("ingress", []):
            ingress |= {(component(peer["podSelector"]), own) for peer in rule["from"]}
        for rule in policy["spec"].get("egress", []):
            egress |= {(own, component(peer["podSelector"])) for peer in rule["to"]}
    assert ingress == method_table_edges()
    assert egress == method_table_edges()


def test_only_workers_get_gpus_and_only_in_the_gpu_overlay(rendered):
    overlay, objects = rendered
    with_gpu = {f"{w['metadata']['name']}/{c['name']}" for w, t in pod_templates(objects)
                for c in t["spec"]["containers"] + t["spec"].get("initContainers", [])
                if "nvidia.com/gpu" in {**c.get("resources", {}).get("limits", {}),
                                        **c.get("resources", {}).get("requests", {})}}
    assert with_gpu == ({"llmos-worker/worker"} if overlay == "gpu" else set())


def test_workers_roll_without_a_surge_and_every_llmos_image_is_the_overlays(rendered):
    overlay, objects = rendered
    worker = next(o for o in objects if o["kind"] == "StatefulSet")
    assert worker["spec"]["updateStrategy"]["type"] == "RollingUpdate"
    assert not any(o["kind"] == "Deployment" and o["metadata"]["name"] == "llmos-worker" for o in objects)
    tag = {"cpu": "cpu", "gpu": "cuda"}[overlay]
    for _, template in pod_templates(objects):
        for container in template["spec"]["containers"] + template["spec"].get("initContainers", []):
            if "llmos" in container["image"]:
                assert container["image"] == f"localhost/llmos:{tag}"


def test_every_setting_the_manifests_give_is_one_a_service_reads(rendered):
    """A misspelt variable would be silently ignored by the service: none is."""
    _, objects = rendered
    fields = {service: {f.name for f in dataclasses.fields(settings)}
              for service, (settings, _) in _builders().items()}
    shared = {f.name for f in dataclasses.fields(ServiceSettings)}
    names = set()
    for obj in objects:
        if obj["kind"] == "ConfigMap" and obj["metadata"]["name"].startswith("llmos-settings"):
            names |= set(obj["data"])
    for _, template in pod_templates(objects):
        for container in template["spec"]["containers"]:
            names |= {e["name"] for e in container.get("env", [])}
    for name in sorted(n for n in names if n.startswith("LLMOS_")):
        rest = name.removeprefix("LLMOS_").lower()
        service, _, field = rest.partition("_")
        known = field in fields.get(service, ()) or rest in shared
        assert known, f"{name} is read by no service"


def test_the_secrets_command_makes_every_secret_the_manifests_mount(tmp_path):
    """`llmos kubernetes secrets`: every Secret (and key of it) the rendered manifests refer to
    is there and valid; each certificate names the host names its peers dial."""
    import base64

    import kubernetes_validate
    from cryptography import x509

    from llmos.cli.kubernetes import secrets
    from llmos.common.keystore import KeyStore, parse_key
    from llmos.common.store import Store, sqlite_url

    url = sqlite_url(tmp_path / "store.db")
    made = {s["metadata"]["name"]: s for s in yaml.safe_load_all(secrets(tmp_path / "cluster", url, workers=2))}
    for secret in made.values():
        kubernetes_validate.validate(secret, VERSION, strict=True)
    objects = render("cpu")
    wanted: dict[str, set[str]] = {}
    for _, template in pod_templates(objects):
        for volume in template["spec"].get("volumes", []):
            if "secret" in volume:
                wanted.setdefault(volume["secret"]["secretName"], set())
        for container in template["spec"]["containers"] + template["spec"].get("initContainers", []):
            for env in container.get("env", []):
                ref = env.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    wanted.setdefault(ref["name"], set()).add(ref["key"])
    assert set(wanted) == set(made)
    for name, keys in wanted.items():
        assert keys <= set(made[name]["data"]), name
    tls_keys = {"tls.crt", "tls.key", "ca.crt"}
    assert all(tls_keys <= set(made[f"llmos-tls-{c}"]["data"]) for c in ("gateway", "scheduler", "registry",
                                                                        "resources", "monitor"))
    assert {"llmos-worker-0.crt", "llmos-worker-1.key", "ca.crt"} <= set(made["llmos-tls-worker"]["data"])

    def names_in(secret: str, key: str) -> set[str]:
        cert = x509.load_pem_x509_certificate(base64.b64decode(made[secret]["data"][key]))
        return set(cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
            x509.DNSName))

    settings = next(o for o in objects if o["kind"] == "ConfigMap" and o["metadata"]["name"].startswith(
        "llmos-settings"))["data"]
    for key, address in settings.items():
        if key.endswith("_ADDRESS"):
            host = address.rsplit(":", 1)[0]
            component = host.removeprefix("llmos-").removesuffix("-local")
            assert host in names_in(f"llmos-tls-{component}", "tls.crt"), f"{key}: {host}"
    assert "llmos-worker-1.llmos-worker" in names_in("llmos-tls-worker", "llmos-worker-1.crt")
    # The command line's admin key works against the store.
    key_id, _ = parse_key((tmp_path / "cluster" / "keys" / "admin.key").read_text().strip())
    assert KeyStore(Store(url).ready()).lookup(key_id) is not None


def test_schedulers_run_two_one_leading_with_a_budget_that_keeps_one(rendered):
    _, objects = rendered
    deployment = next(o for o in objects if o["kind"] == "Deployment" and o["metadata"]["name"] == "llmos-scheduler")
    assert deployment["spec"]["replicas"] == 2
    assert deployment["spec"]["strategy"] == {"type": "RollingUpdate",
                                              "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}}
    env = {e["name"]: e.get("value", e.get("valueFrom")) for e in
           deployment["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["LLMOS_SCHEDULER_LEADER_ELECTION"] == "true"
    assert env["LLMOS_SCHEDULER_ADVERTISE_ADDRESS"] == "$(POD_IP):50052"
    assert env["POD_IP"] == {"fieldRef": {"fieldPath": "status.podIP"}}
    assert "LLMOS_STORE_URL" in env                     # the lease lives in the store
    budget = next(o for o in objects if o["kind"] == "PodDisruptionBudget"
                  and matches(o["spec"]["selector"], deployment["spec"]["template"]["metadata"]["labels"]))
    assert budget["spec"] == {"minAvailable": 1, "selector": budget["spec"]["selector"]}


def test_registries_run_two_on_the_store_with_a_budget_that_keeps_one(rendered):
    _, objects = rendered
    deployment = next(o for o in objects if o["kind"] == "Deployment" and o["metadata"]["name"] == "llmos-registry")
    assert deployment["spec"]["replicas"] == 2
    assert deployment["spec"]["strategy"] == {"type": "RollingUpdate",
                                              "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}}
    env = {e["name"]: e.get("value", e.get("valueFrom")) for e in
           deployment["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert "LLMOS_STORE_URL" in env                     # what the replicas share lives in the store
    budget = next(o for o in objects if o["kind"] == "PodDisruptionBudget"
                  and matches(o["spec"]["selector"], deployment["spec"]["template"]["metadata"]["labels"]))
    assert budget["spec"] == {"minAvailable": 1, "selector": budget["spec"]["selector"]}
    assert not any(o["kind"] == "Deployment" and o["spec"].get("strategy", {}).get("type") == "Recreate"
                   for o in objects if o["metadata"]["name"] in ("llmos-registry", "llmos-scheduler"))
