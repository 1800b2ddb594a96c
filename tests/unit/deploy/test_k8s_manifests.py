"""deploy/k8s checked offline: every built-in object against Kubernetes' own schema (strict:
unknown fields rejected), the KEDA ScaledObjects against KEDA's documented fields, and the
files against each other, the CLI and the metrics Tandem exports. What the Helm chart must
hold too is in tests/helpers/k8s.py."""

from __future__ import annotations

import copy
import re
from urllib.parse import urlsplit

import jsonschema
import kubernetes_validate
import pytest
import yaml

from tests.helpers import k8s
from tests.helpers.k8s import K8S_VERSION, SCALED_OBJECT_SCHEMA, arg
from tests.helpers.metrics import exported_metric_names
from tests.helpers.paths import DEPLOY_DIR

K8S_DIR = DEPLOY_DIR / "k8s"
FILES = sorted(p for p in K8S_DIR.glob("*.yaml") if p.name != "kustomization.yaml")
DOCS = [(p.name, d) for p in FILES for d in yaml.safe_load_all(p.read_text()) if d]
OBJECTS = k8s.Objects([d for _, d in DOCS], namespace="tandem")


def _named(kind: str) -> dict[str, dict]:
    return OBJECTS.named(kind)


def _doc_id(item) -> str:
    name, doc = item
    return f"{name}:{doc['kind']}/{doc['metadata']['name']}"


WORKLOADS = OBJECTS.workloads
SERVICES = _named("Service")
SCALED_OBJECTS = list(_named("ScaledObject").values())
CONTAINERS = OBJECTS.containers
TANDEM = [c for c in CONTAINERS if k8s.is_tandem(c)]


def _assert_service_endpoint(where: str, address: str) -> None:
    """`address` (URL or host:port) names a Service of these manifests, on one of its ports."""
    parts = urlsplit(address if "://" in address else f"//{address}")
    name, _, domain = parts.hostname.partition(".")
    assert name in SERVICES, f"{where}: {address} is no Service here"
    assert domain in ("", "tandem", "tandem.svc") or domain.startswith("tandem.svc."), where
    ports = {p["port"] for p in SERVICES[name]["spec"]["ports"]}
    assert parts.port in ports, f"{where}: {address} is not a port of Service {name}"


def test_kustomization_lists_exactly_the_manifests():
    kustomization = yaml.safe_load((K8S_DIR / "kustomization.yaml").read_text())
    resources = kustomization["resources"]
    assert len(resources) == len(set(resources))
    assert set(resources) == {p.name for p in FILES}


def test_everything_but_the_namespace_lives_in_it():
    for name, doc in DOCS:
        expected = None if doc["kind"] == "Namespace" else "tandem"
        assert doc["metadata"].get("namespace") == expected, name


@pytest.mark.parametrize("item", DOCS, ids=_doc_id)
def test_every_object_matches_its_schema(item):
    k8s.validate(item[1])


def test_strict_validation_rejects_an_unknown_field():
    deployment = copy.deepcopy(_named("Deployment")["gateway"])
    kubernetes_validate.validate(deployment, K8S_VERSION, strict=True)
    deployment["spec"]["template"]["spec"]["containers"][0]["argz"] = ["gateway"]
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSION, strict=True)


@pytest.mark.parametrize("scaled", SCALED_OBJECTS, ids=lambda d: d["metadata"]["name"])
def test_scaled_objects_scale_deployments_here_from_prometheus_here(scaled):
    spec = scaled["spec"]
    target = spec["scaleTargetRef"]
    assert target.get("kind", "Deployment") == "Deployment"
    assert target["name"] in _named("Deployment")
    assert 1 <= spec["minReplicaCount"] <= spec["maxReplicaCount"]
    assert "behavior" in spec["advanced"]["horizontalPodAutoscalerConfig"]
    for trigger in spec["triggers"]:
        assert float(trigger["metadata"]["threshold"]) > 0
        _assert_service_endpoint(scaled["metadata"]["name"], trigger["metadata"]["serverAddress"])


def test_the_scaled_object_schema_rejects_unknown_fields():
    scaled = copy.deepcopy(SCALED_OBJECTS[0])
    jsonschema.validate(scaled, SCALED_OBJECT_SCHEMA)
    scaled["spec"]["triggers"][0]["metadata"]["treshold"] = "1"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(scaled, SCALED_OBJECT_SCHEMA)


def test_autoscalers_cover_the_stages_and_query_exported_metrics():
    from tandem.services.transport.codec import ROLE_NAMES

    assert {d["spec"]["scaleTargetRef"]["name"] for d in SCALED_OBJECTS} == {
        "prefill", "decode", "gateway"
    }  # fmt: skip
    queries = [t["metadata"]["query"] for d in SCALED_OBJECTS for t in d["spec"]["triggers"]]
    used = {m for q in queries for m in re.findall(r"\b((?:vllm|tandem):[a-z0-9_:]+)", q)}
    assert len(used) == len(queries)
    assert used - exported_metric_names() == set()
    roles = {r for q in queries for r in re.findall(r'role="([^"]*)"', q)}
    assert roles and roles <= set(ROLE_NAMES.values())


def test_every_stage_runs_from_the_image_with_the_shared_config():
    assert {c["name"] for c in TANDEM} == {"gateway", "tokenizer", "scheduler", "prefill",
                                           "decode"}  # fmt: skip
    for c in TANDEM:
        assert {"configMapRef": {"name": "tandem-config"}} in c["envFrom"], c["name"]
    assert set(_named("ConfigMap")["tandem-config"]["data"]) >= {"NATS_ADDRESS", "REDIS_URL"}


def test_each_stage_connects_to_nats_as_its_own_role():
    """Its NATS_URL, as the kubelet expands it, has its role's user and that role's password
    from the Secret the NATS server reads its accounts' passwords from."""
    from tandem.services.servers import password_env

    passwords = _named("Secret")["tandem-nats"]["stringData"]
    address = _named("ConfigMap")["tandem-config"]["data"]["NATS_ADDRESS"]
    for c in TANDEM:
        role = c["name"]
        url = OBJECTS.env(c)["NATS_URL"]
        assert url == f"nats://{role}:{passwords[password_env(role)]}@{address}", role
        _assert_service_endpoint(f"{role} NATS_URL", url)
    (nats,) = [c for c in CONTAINERS if c["name"] == "nats"]
    assert set(OBJECTS.env(nats)) >= {password_env(role) for role in ("gateway", "decode")}
    assert set(passwords) == {password_env(c["name"]) for c in TANDEM}


def test_nats_reads_its_accounts_from_the_config_map_it_mounts():
    (nats,) = [w for w in WORKLOADS if w["metadata"]["name"] == "nats"]
    pod = nats["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    conf = arg(container, "-c")
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    (name,) = [n for n, path in mounts.items() if conf.startswith(path + "/")]
    config_map = _named("ConfigMap")[volumes[name]["configMap"]["name"]]
    assert conf.removeprefix(mounts[name] + "/") in config_map["data"]


@pytest.mark.parametrize(
    "check",
    k8s.DEPLOYMENT_CHECKS,
    ids=lambda f: f.__name__.removeprefix("assert_"),
)
def test_what_every_deployment_holds(check):
    check(OBJECTS)


def test_network_policies_let_in_only_what_tandem_needs():
    k8s.assert_network_policies(OBJECTS, nats="nats", redis="redis")
    # Prometheus answers KEDA, in its own namespace
    prometheus = _named("Deployment")["prometheus"]
    keda = k8s.Client({}, {"kubernetes.io/metadata.name": "keda"})
    assert OBJECTS.ingress_allowed(prometheus, keda, 9090)


def test_the_network_policy_check_can_fail():
    """With no policy, or one that opens NATS to everyone, the check fails."""
    bare = k8s.Objects([d for d in OBJECTS.docs if d["kind"] != "NetworkPolicy"], "tandem")
    with pytest.raises(AssertionError):
        k8s.assert_network_policies(bare, nats="nats", redis="redis")
    docs = copy.deepcopy(OBJECTS.docs)
    (nats_policy,) = [d for d in docs if d["kind"] == "NetworkPolicy"
                      and d["metadata"]["name"] == "nats"]  # fmt: skip
    del nats_policy["spec"]["ingress"][0]["from"]
    with pytest.raises(AssertionError):
        k8s.assert_network_policies(k8s.Objects(docs, "tandem"), nats="nats", redis="redis")


def test_stages_name_only_services_that_exist():
    config = _named("ConfigMap")["tandem-config"]["data"]
    for key in ("NATS_ADDRESS", "REDIS_URL"):
        _assert_service_endpoint(key, config[key])
    for c in TANDEM:
        for flag in [a for a in c["args"] if a.startswith("--") and a.endswith("-url")]:
            _assert_service_endpoint(f"{c['name']} {flag}", arg(c, flag))
        for name, value in OBJECTS.env(c).items():
            if "://" in value:
                _assert_service_endpoint(f"{c['name']} {name}", value)
    prometheus = yaml.safe_load(_named("ConfigMap")["prometheus-config"]["data"]["prometheus.yml"])
    for job in prometheus["scrape_configs"]:
        for sd in job.get("dns_sd_configs", ()):
            for host in sd["names"]:
                _assert_service_endpoint(job["job_name"], f"{host}:{sd['port']}")


def _merge(base, patch):
    """Kubernetes' strategic merge for what the GPU patch uses: maps merge, containers merge
    by name, other lists and scalars are replaced."""
    if isinstance(base, dict) and isinstance(patch, dict):
        out = dict(base)
        for key, value in patch.items():
            if key == "containers":
                by_name = {c["name"]: c for c in patch[key]}
                out[key] = [_merge(c, by_name[c["name"]]) if c["name"] in by_name else c
                            for c in base.get(key, [])]  # fmt: skip
            else:
                out[key] = _merge(base.get(key), value) if key in base else value
        return out
    return patch


def test_the_gpu_variant_gives_each_worker_a_gpu_and_stays_valid():
    gpu_dir = K8S_DIR / "gpu"
    kustomization = yaml.safe_load((gpu_dir / "kustomization.yaml").read_text())
    assert kustomization["resources"] == ["../"]
    patches = [d for p in kustomization["patches"]
               for d in yaml.safe_load_all((gpu_dir / p["path"]).read_text()) if d]  # fmt: skip
    deployments = _named("Deployment")
    assert {p["metadata"]["name"] for p in patches} == {"prefill", "decode"}
    for patch in patches:
        name = patch["metadata"]["name"]
        merged = _merge(copy.deepcopy(deployments[name]), patch)
        kubernetes_validate.validate(merged, K8S_VERSION, strict=True)
        (container,) = merged["spec"]["template"]["spec"]["containers"]
        assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
        assert container["args"][0] == name and arg(container, "--torch-threads") == "2"
        # the rest of the base (probes, NATS credentials, security) is kept
        base = deployments[name]["spec"]["template"]["spec"]["containers"][0]
        for key in ("env", "envFrom", "startupProbe", "securityContext", "image"):
            assert container[key] == base[key]
    assert len(SCALED_OBJECTS) >= 2  # KEDA still scales the workers: the base's objects
