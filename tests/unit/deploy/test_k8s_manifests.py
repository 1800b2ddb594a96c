"""deploy/k8s checked offline: every built-in object against Kubernetes' own schema (strict:
unknown fields rejected), the KEDA ScaledObjects against KEDA's documented fields, and the
files against each other, the CLI and the metrics Tandem exports."""

from __future__ import annotations

import copy
import re
from urllib.parse import urlsplit

import jsonschema
import kubernetes_validate
import pytest
import yaml

from tandem.cli import build_parser
from tests.helpers.metrics import exported_metric_names
from tests.helpers.paths import DEPLOY_DIR

K8S_DIR = DEPLOY_DIR / "k8s"
K8S_VERSION = "1.30"  # the oldest Kubernetes the manifests are written for
FILES = sorted(p for p in K8S_DIR.glob("*.yaml") if p.name != "kustomization.yaml")
DOCS = [(p.name, d) for p in FILES for d in yaml.safe_load_all(p.read_text()) if d]


def _named(kind: str) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for _, d in DOCS if d["kind"] == kind}


def _doc_id(item) -> str:
    name, doc = item
    return f"{name}:{doc['kind']}/{doc['metadata']['name']}"


WORKLOADS = [d for _, d in DOCS if d["kind"] in ("Deployment", "StatefulSet")]
SERVICES = _named("Service")
SCALED_OBJECTS = list(_named("ScaledObject").values())
CONTAINERS = [c for w in WORKLOADS for c in w["spec"]["template"]["spec"]["containers"]]
TANDEM = [c for c in CONTAINERS if c["image"].split(":")[0] == "tandem"]
WORKERS = [d for name, d in _named("Deployment").items() if name in ("prefill", "decode")]

# KEDA 2.15's ScaledObject (reference/scaledobject-spec) with the prometheus trigger
# (scalers/prometheus): every documented field, nothing else.
_STRINGS = {"type": "object", "additionalProperties": {"type": "string"}}
_PROMETHEUS_METADATA = {
    "type": "object",
    "required": ["serverAddress", "query", "threshold"],
    "additionalProperties": False,
    "properties": {
        k: {"type": "string"}
        for k in (
            "serverAddress",
            "query",
            "threshold",
            "activationThreshold",
            "namespace",
            "customHeaders",
            "ignoreNullValues",
            "queryParameters",
            "unsafeSsl",
        )
    },  # fmt: skip
}
SCALED_OBJECT_SCHEMA = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "keda.sh/v1alpha1"},
        "kind": {"const": "ScaledObject"},
        "metadata": {
            "type": "object",
            "required": ["name"],
            "additionalProperties": False,
            "properties": {
                "name": {"type": "string"},
                "namespace": {"type": "string"},
                "labels": _STRINGS,
                "annotations": _STRINGS,
            },
        },
        "spec": {
            "type": "object",
            "required": ["scaleTargetRef", "triggers"],
            "additionalProperties": False,
            "properties": {
                "scaleTargetRef": {
                    "type": "object",
                    "required": ["name"],
                    "additionalProperties": False,
                    "properties": {
                        k: {"type": "string"}
                        for k in ("name", "apiVersion", "kind", "envSourceContainerName")
                    },
                },
                **{
                    k: {"type": "integer", "minimum": 0}
                    for k in (
                        "pollingInterval",
                        "cooldownPeriod",
                        "initialCooldownPeriod",
                        "idleReplicaCount",
                        "minReplicaCount",
                        "maxReplicaCount",
                    )
                },  # fmt: skip
                "fallback": {
                    "type": "object",
                    "required": ["failureThreshold", "replicas"],
                    "additionalProperties": False,
                    "properties": {
                        "failureThreshold": {"type": "integer"},
                        "replicas": {"type": "integer"},
                    },
                },
                "advanced": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "restoreToOriginalReplicaCount": {"type": "boolean"},
                        "horizontalPodAutoscalerConfig": {
                            "type": "object",
                            "additionalProperties": False,
                            # behavior: Kubernetes' HPA behavior, checked with its schema
                            "properties": {"name": {"type": "string"}, "behavior": {}},
                        },
                        "scalingModifiers": {"type": "object"},
                    },
                },
                "triggers": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "required": ["type", "metadata"],
                        "additionalProperties": False,
                        "properties": {
                            "type": {"const": "prometheus"},
                            "metadata": _PROMETHEUS_METADATA,
                            "name": {"type": "string"},
                            "useCachedMetrics": {"type": "boolean"},
                            "authenticationRef": {"type": "object"},
                            "metricType": {"enum": ["AverageValue", "Value", "Utilization"]},
                        },
                    },
                },
            },
        },
    },
}


def _arg(container: dict, flag: str) -> str | None:
    args = container["args"]
    return args[args.index(flag) + 1] if flag in args else None


def _env(container: dict) -> dict[str, str]:
    """The container's environment as the kubelet makes it: its ConfigMaps and Secrets (the
    ones in these manifests), then `env` in order, each `$(VAR)` of an earlier one expanded."""
    sources = {"configMapRef": _named("ConfigMap"), "secretRef": _named("Secret")}
    keyed = {"configMapKeyRef": _named("ConfigMap"), "secretKeyRef": _named("Secret")}

    def data(obj: dict) -> dict[str, str]:
        return obj.get("data") or obj.get("stringData") or {}

    env: dict[str, str] = {}
    for source in container.get("envFrom", ()):
        ((kind, ref),) = source.items()
        env |= data(sources[kind][ref["name"]])
    for var in container.get("env", ()):
        if "value" in var:
            env[var["name"]] = re.sub(r"\$\((\w+)\)", lambda m: env[m[1]], var["value"])
        else:
            ((kind, ref),) = var["valueFrom"].items()
            env[var["name"]] = data(keyed[kind][ref["name"]])[ref["key"]]
    return env


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


@pytest.mark.parametrize("item", [i for i in DOCS if i[1]["kind"] != "ScaledObject"], ids=_doc_id)
def test_built_in_objects_match_the_kubernetes_schema(item):
    kubernetes_validate.validate(item[1], K8S_VERSION, strict=True)


def test_strict_validation_rejects_an_unknown_field():
    deployment = copy.deepcopy(_named("Deployment")["gateway"])
    kubernetes_validate.validate(deployment, K8S_VERSION, strict=True)
    deployment["spec"]["template"]["spec"]["containers"][0]["argz"] = ["gateway"]
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSION, strict=True)


@pytest.mark.parametrize("scaled", SCALED_OBJECTS, ids=lambda d: d["metadata"]["name"])
def test_scaled_objects_use_keda_s_documented_fields(scaled):
    jsonschema.validate(scaled, SCALED_OBJECT_SCHEMA)
    spec = scaled["spec"]
    target = spec["scaleTargetRef"]
    assert target.get("kind", "Deployment") == "Deployment"
    assert target["name"] in _named("Deployment")
    assert 1 <= spec["minReplicaCount"] <= spec["maxReplicaCount"]
    for trigger in spec["triggers"]:
        assert float(trigger["metadata"]["threshold"]) > 0
        _assert_service_endpoint(scaled["metadata"]["name"], trigger["metadata"]["serverAddress"])
    # the HPA's behavior, as Kubernetes' own schema has it
    behavior = spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
    hpa = {"apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler",
           "metadata": {"name": target["name"]},
           "spec": {"scaleTargetRef": {"kind": "Deployment", "name": target["name"]},
                    "maxReplicas": spec["maxReplicaCount"], "behavior": behavior}}  # fmt: skip
    kubernetes_validate.validate(hpa, K8S_VERSION, strict=True)


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


@pytest.mark.parametrize("container", TANDEM, ids=lambda c: c["name"])
def test_stage_args_parse_with_the_cli(container):
    assert "command" not in container  # the image's entrypoint is `tandem`
    args = build_parser().parse_args(container["args"])
    assert args.command == container["name"]


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
        url = _env(c)["NATS_URL"]
        assert url == f"nats://{role}:{passwords[password_env(role)]}@{address}", role
        _assert_service_endpoint(f"{role} NATS_URL", url)
    (nats,) = [c for c in CONTAINERS if c["name"] == "nats"]
    assert set(_env(nats)) >= {password_env(role) for role in ("gateway", "decode")}
    assert set(passwords) == {password_env(c["name"]) for c in TANDEM}


def test_nats_reads_its_accounts_from_the_config_map_it_mounts():
    (nats,) = [w for w in WORKLOADS if w["metadata"]["name"] == "nats"]
    pod = nats["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    conf = _arg(container, "-c")
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    (name,) = [n for n, path in mounts.items() if conf.startswith(path + "/")]
    config_map = _named("ConfigMap")[volumes[name]["configMap"]["name"]]
    assert conf.removeprefix(mounts[name] + "/") in config_map["data"]


def test_services_select_the_pods_of_a_workload_on_declared_ports():
    for name, service in SERVICES.items():
        selector = service["spec"]["selector"].items()
        pods = [w["spec"]["template"] for w in WORKLOADS
                if selector <= w["spec"]["template"]["metadata"]["labels"].items()]  # fmt: skip
        assert len(pods) == 1, name
        declared = {p for c in pods[0]["spec"]["containers"] for port in c.get("ports", ())
                    for p in (port["containerPort"], port.get("name"))}  # fmt: skip
        for port in service["spec"]["ports"]:
            assert port.get("targetPort", port["port"]) in declared, name


def test_workload_selectors_match_their_pod_labels():
    for w in WORKLOADS:
        labels = w["spec"]["template"]["metadata"]["labels"].items()
        assert w["spec"]["selector"]["matchLabels"].items() <= labels, w["metadata"]["name"]


def test_probes_use_declared_ports():
    for c in CONTAINERS:
        ports = {p: port for port in c.get("ports", ()) for p in (port["containerPort"],
                                                                 port.get("name"))}  # fmt: skip
        probes = [c[k] for k in ("startupProbe", "readinessProbe", "livenessProbe") if k in c]
        assert "readinessProbe" in c and "livenessProbe" in c, c["name"]
        for probe in probes:
            handler = probe.get("httpGet") or probe.get("tcpSocket")
            if handler is None:
                assert probe["exec"]["command"], c["name"]
                continue
            assert handler["port"] in ports, c["name"]
            health_port = _arg(c, "--health-port") if c in TANDEM else None
            if health_port is not None:
                assert ports[handler["port"]]["containerPort"] == int(health_port), c["name"]


def test_draining_stages_outlive_their_shutdown_timeout():
    drains = set()
    for w in WORKLOADS:
        pod = w["spec"]["template"]["spec"]
        for c in (c for c in pod["containers"] if c in TANDEM):
            timeout = getattr(build_parser().parse_args(c["args"]), "shutdown_timeout", None)
            if timeout is not None:
                drains.add(c["name"])
                assert pod.get("terminationGracePeriodSeconds", 30) > timeout, c["name"]
    assert drains >= {"prefill", "decode"}
    for w in WORKERS:
        (container,) = w["spec"]["template"]["spec"]["containers"]
        assert _arg(container, "--shutdown-timeout") is not None


def test_single_stages_are_pinned_to_one_and_scaled_ones_left_to_keda():
    deployments = _named("Deployment")
    for name in ("scheduler", "tokenizer"):
        spec = deployments[name]["spec"]
        assert spec["replicas"] == 1 and spec["strategy"]["type"] == "Recreate", name
    for scaled in SCALED_OBJECTS:
        # a `replicas` here would reset the autoscaler's count on every apply
        assert "replicas" not in deployments[scaled["spec"]["scaleTargetRef"]["name"]]["spec"]


def test_stages_name_only_services_that_exist():
    config = _named("ConfigMap")["tandem-config"]["data"]
    for key in ("NATS_ADDRESS", "REDIS_URL"):
        _assert_service_endpoint(key, config[key])
    for c in TANDEM:
        for flag in [a for a in c["args"] if a.startswith("--") and a.endswith("-url")]:
            _assert_service_endpoint(f"{c['name']} {flag}", _arg(c, flag))
        for name, value in _env(c).items():
            if "://" in value:
                _assert_service_endpoint(f"{c['name']} {name}", value)
    prometheus = yaml.safe_load(_named("ConfigMap")["prometheus-config"]["data"]["prometheus.yml"])
    for job in prometheus["scrape_configs"]:
        for sd in job.get("dns_sd_configs", ()):
            for host in sd["names"]:
                _assert_service_endpoint(job["job_name"], f"{host}:{sd['port']}")


def test_pods_run_as_non_root_with_bounded_resources():
    for w in WORKLOADS:
        pod = w["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True, w["metadata"]["name"]
        assert pod["securityContext"]["runAsUser"] > 0, w["metadata"]["name"]
        for c in pod["containers"]:
            assert c["securityContext"]["allowPrivilegeEscalation"] is False, c["name"]
            for kind in ("requests", "limits"):
                assert set(c["resources"][kind]) >= {"cpu", "memory"}, c["name"]
            if c in TANDEM:
                assert pod["securityContext"]["runAsUser"] == 10001
