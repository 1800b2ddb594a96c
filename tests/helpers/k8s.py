"""Kubernetes objects checked offline, the same way for deploy/k8s and the Helm chart: every
built-in object against Kubernetes' own schema, the KEDA ScaledObjects against KEDA's
documented fields, and what both must hold (no service links, drains that finish, a
PodDisruptionBudget per stage, NetworkPolicies that let in only what Tandem needs)."""

from __future__ import annotations

import base64
import re
from collections.abc import Iterable
from dataclasses import dataclass

import jsonschema
import kubernetes_validate

K8S_VERSION = "1.30"  # the oldest Kubernetes the manifests are written for
STAGES = ("gateway", "tokenizer", "scheduler", "prefill", "decode")
WORKER_STAGES = ("prefill", "decode")
SCALED_STAGES = ("prefill", "decode", "gateway")  # the stages KEDA scales
TANDEM_IMAGE = "tandem"

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


def validate(doc: dict) -> None:
    """One object against its schema (strict: unknown fields rejected): Kubernetes' own for
    the built-in kinds; KEDA's documented fields for a ScaledObject, whose HPA behavior is
    then checked with Kubernetes' HorizontalPodAutoscaler schema."""
    if doc["kind"] != "ScaledObject":
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        return
    jsonschema.validate(doc, SCALED_OBJECT_SCHEMA)
    spec = doc["spec"]
    behavior = spec.get("advanced", {}).get("horizontalPodAutoscalerConfig", {}).get("behavior")
    if behavior is not None:
        name = spec["scaleTargetRef"]["name"]
        hpa = {"apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler",
               "metadata": {"name": name},
               "spec": {"scaleTargetRef": {"kind": "Deployment", "name": name},
                        "maxReplicas": spec.get("maxReplicaCount", 100),
                        "behavior": behavior}}  # fmt: skip
        kubernetes_validate.validate(hpa, K8S_VERSION, strict=True)


def selects(selector: dict, labels: dict[str, str]) -> bool:
    """A LabelSelector (matchLabels and matchExpressions) against a set of labels."""
    if not selector.get("matchLabels", {}).items() <= labels.items():
        return False
    for expr in selector.get("matchExpressions", ()):
        key, op, values = expr["key"], expr["operator"], expr.get("values", ())
        ok = {"In": key in labels and labels[key] in values,
              "NotIn": labels.get(key) not in values,
              "Exists": key in labels,
              "DoesNotExist": key not in labels}[op]  # fmt: skip
        if not ok:
            return False
    return True


@dataclass(frozen=True, slots=True)
class Client:
    """Who opens a connection: a pod's labels and its namespace's labels."""

    pod_labels: dict
    namespace_labels: dict


class Objects:
    """The objects of one deployment (a kustomization, one rendering of the chart), all in
    one namespace, with what the tests ask of them."""

    def __init__(self, docs: Iterable[dict | None], namespace: str) -> None:
        self.docs = [d for d in docs if d]
        self.namespace = namespace

    def of_kind(self, kind: str) -> list[dict]:
        return [d for d in self.docs if d["kind"] == kind]

    def named(self, kind: str) -> dict[str, dict]:
        return {d["metadata"]["name"]: d for d in self.of_kind(kind)}

    @property
    def workloads(self) -> list[dict]:
        return [d for d in self.docs if d["kind"] in ("Deployment", "StatefulSet")]

    @property
    def containers(self) -> list[dict]:
        return [c for w in self.workloads for c in w["spec"]["template"]["spec"]["containers"]]

    def stage(self, stage: str) -> tuple[dict, dict]:
        """The Deployment that runs `stage` and its Tandem container (`tandem <stage> ...`)."""
        (found,) = [
            (w, c)
            for w in self.workloads
            for c in w["spec"]["template"]["spec"]["containers"]
            if is_tandem(c) and c["args"][0] == stage
        ]
        return found

    def pod_labels(self, workload: dict) -> dict[str, str]:
        return workload["spec"]["template"]["metadata"]["labels"]

    def selected(self, selector: dict) -> list[dict]:
        """The workloads whose pods `selector` selects."""
        return [w for w in self.workloads if selects(selector, self.pod_labels(w))]

    def client(self, workload: dict | None) -> Client:
        """A client in one of these pods, or (None) one from elsewhere, outside the
        namespace."""
        if workload is None:
            return Client({}, {"kubernetes.io/metadata.name": "elsewhere"})
        return Client(self.pod_labels(workload), {"kubernetes.io/metadata.name": self.namespace})

    def env(self, container: dict) -> dict[str, str]:
        """The container's environment as the kubelet makes it: its ConfigMaps and Secrets
        (the ones among these objects), then `env` in order, each `$(VAR)` of an earlier one
        expanded."""
        sources = {"configMapRef": self.named("ConfigMap"), "secretRef": self.named("Secret")}
        keyed = {"configMapKeyRef": self.named("ConfigMap"), "secretKeyRef": self.named("Secret")}
        env: dict[str, str] = {}
        for source in container.get("envFrom", ()):
            ((kind, ref),) = source.items()
            env |= _data(sources[kind][ref["name"]])
        for var in container.get("env", ()):
            if "value" in var:
                env[var["name"]] = re.sub(r"\$\((\w+)\)", lambda m: env[m[1]], var["value"])
            else:
                ((kind, ref),) = var["valueFrom"].items()
                env[var["name"]] = _data(keyed[kind][ref["name"]])[ref["key"]]
        return env

    def ingress_allowed(self, target: dict, client: Client, port: int) -> bool:
        """Whether the NetworkPolicies let `client` connect to `port` of `target`'s pods:
        a pod no policy selects takes everything; a selected one what some rule allows."""
        labels = self.pod_labels(target)
        policies = [
            p for p in self.of_kind("NetworkPolicy")
            if selects(p["spec"]["podSelector"], labels)
            and "Ingress" in p["spec"].get("policyTypes", ["Ingress"])
        ]  # fmt: skip
        if not policies:
            return True
        named_ports = {
            p["name"]: p["containerPort"]
            for c in target["spec"]["template"]["spec"]["containers"]
            for p in c.get("ports", ())
            if "name" in p
        }
        for policy in policies:
            for rule in policy["spec"].get("ingress") or ():
                ports = [named_ports.get(p["port"], p["port"]) for p in rule.get("ports", ())]
                if ports and port not in ports:
                    continue
                peers = rule.get("from")
                if not peers or any(self._peer_matches(peer, client) for peer in peers):
                    return True
        return False

    def _peer_matches(self, peer: dict, client: Client) -> bool:
        if "ipBlock" in peer:
            return client.namespace_labels["kubernetes.io/metadata.name"] != self.namespace
        if "namespaceSelector" in peer:
            in_namespace = selects(peer["namespaceSelector"], client.namespace_labels)
        else:
            in_namespace = client.namespace_labels["kubernetes.io/metadata.name"] == self.namespace
        return in_namespace and selects(peer.get("podSelector", {}), client.pod_labels)


def _data(obj: dict) -> dict[str, str]:
    """A ConfigMap's or Secret's key -> value (a Secret's `data` decoded)."""
    if "stringData" in obj:
        return obj["stringData"]
    if obj["kind"] == "Secret":
        return {k: base64.b64decode(v).decode() for k, v in obj.get("data", {}).items()}
    return obj.get("data", {})


def is_tandem(container: dict) -> bool:
    return container["image"].rsplit("/", 1)[-1].split(":")[0] == TANDEM_IMAGE


def arg(container: dict, flag: str) -> str | None:
    args = container["args"]
    return args[args.index(flag) + 1] if flag in args else None


# What both deployments must hold.


def assert_no_service_links(objects: Objects) -> None:
    """Every pod runs without Kubernetes' <SERVICE>_PORT=tcp://... variables: a Service
    named `tandem` would set TANDEM_PORT, which the CLI reads as a number."""
    for w in objects.workloads:
        pod = w["spec"]["template"]["spec"]
        assert pod.get("enableServiceLinks") is False, w["metadata"]["name"]


def assert_stage_args_parse(objects: Objects) -> None:
    from tandem.cli import build_parser

    for stage in STAGES:
        _, container = objects.stage(stage)
        assert "command" not in container  # the image's entrypoint is `tandem`
        assert build_parser().parse_args(container["args"]).command == stage


def _pre_stop_seconds(container: dict) -> float:
    command = container["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep" and len(command) == 2, command
    return float(command[1])


def assert_stops_finish_within_the_grace_period(objects: Objects) -> None:
    """The gateway waits in preStop (so that the endpoints drop it before SIGTERM), then for
    its open requests (--shutdown-timeout); the workers drain within theirs. Kubernetes'
    grace period covers both, so it never kills a stage mid-drain."""
    from tandem.cli import build_parser

    for stage in ("gateway", *WORKER_STAGES):
        workload, container = objects.stage(stage)
        assert arg(container, "--shutdown-timeout") is not None, stage
        drain = build_parser().parse_args(container["args"]).shutdown_timeout
        pre_stop = _pre_stop_seconds(container) if stage == "gateway" else 0.0
        grace = workload["spec"]["template"]["spec"].get("terminationGracePeriodSeconds", 30)
        assert grace > pre_stop + drain, stage
    gateway = objects.stage("gateway")[1]
    assert _pre_stop_seconds(gateway) >= 1


def assert_a_disruption_budget_per_stage(objects: Objects) -> None:
    """Each stage has one PodDisruptionBudget, for its pods only, which lets a node drain
    evict at least one pod (a single-replica stage with minAvailable 1 never could)."""
    budgets = objects.of_kind("PodDisruptionBudget")
    for stage in STAGES:
        workload, _ = objects.stage(stage)
        mine = [b for b in budgets if workload in objects.selected(b["spec"]["selector"])]
        assert len(mine) == 1, f"{stage}: {len(mine)} PodDisruptionBudgets"
        budget = mine[0]
        assert objects.selected(budget["spec"]["selector"]) == [workload], stage
        spec = budget["spec"]
        if "maxUnavailable" in spec:
            assert spec["maxUnavailable"] not in (0, "0%"), stage
        elif stage in ("tokenizer", "scheduler"):
            assert spec["minAvailable"] in (0, "0%"), stage
    assert len(budgets) == len(STAGES)


def _ports(workload: dict) -> list[int]:
    return [
        p["containerPort"]
        for c in workload["spec"]["template"]["spec"]["containers"]
        for p in c.get("ports", ())
    ]


def assert_network_policies(objects: Objects, nats: str | None, redis: str | None) -> None:
    """NATS (4222) and Redis (6379) take connections from the Tandem stages only; the
    tokenizer's gRPC from the gateways only; from outside the namespace only the gateway's
    HTTP port is open; the scheduler and the workers take none. `nats`, `redis`: their
    Deployments' names here (None: an external one)."""
    stages = {s: objects.stage(s)[0] for s in STAGES}
    others = [w for w in objects.workloads if w not in stages.values()]
    outside = objects.client(None)
    assert objects.of_kind("NetworkPolicy")
    for name, port in ((nats, 4222), (redis, 6379)):
        if name is None:
            continue
        server = objects.named("Deployment")[name]
        assert port in _ports(server)
        for stage in stages.values():
            assert objects.ingress_allowed(server, objects.client(stage), port), (name, stage)
        for other in [outside] + [objects.client(w) for w in others]:
            assert not objects.ingress_allowed(server, other, port), (name, other)
    gateway_port = int(arg(objects.stage("gateway")[1], "--port"))
    tokenizer_port = int(arg(objects.stage("tokenizer")[1], "--port"))
    assert objects.ingress_allowed(stages["gateway"], outside, gateway_port)
    tokenizer = stages["tokenizer"]
    assert objects.ingress_allowed(tokenizer, objects.client(stages["gateway"]), tokenizer_port)
    for stage in ("prefill", "decode", "scheduler"):
        client = objects.client(stages[stage])
        assert not objects.ingress_allowed(tokenizer, client, tokenizer_port), stage
    for workload in objects.workloads:
        for port in _ports(workload):
            if workload is stages["gateway"] and port == gateway_port:
                continue
            assert not objects.ingress_allowed(workload, outside, port), (
                workload["metadata"]["name"],
                port,
            )
    for stage in ("scheduler", *WORKER_STAGES):
        for port in _ports(stages[stage]):
            for client in stages.values():
                assert not objects.ingress_allowed(stages[stage], objects.client(client), port)


def assert_no_jetstream(objects: Objects) -> None:
    """Tandem keeps nothing in NATS: its server runs without JetStream or a store."""
    for c in objects.containers:
        words = [*c.get("command", ()), *c.get("args", ())]
        assert not {"-js", "--jetstream", "-sd", "--store_dir"} & set(words), c["name"]
    assert not objects.of_kind("StatefulSet")
    assert not objects.of_kind("PersistentVolumeClaim")


def assert_services_select_one_workload_on_declared_ports(objects: Objects) -> None:
    for name, service in objects.named("Service").items():
        selected = objects.selected({"matchLabels": service["spec"]["selector"]})
        pods = [w["spec"]["template"] for w in selected]
        assert len(pods) == 1, name
        declared = {p for c in pods[0]["spec"]["containers"] for port in c.get("ports", ())
                    for p in (port["containerPort"], port.get("name"))}  # fmt: skip
        for port in service["spec"]["ports"]:
            assert port.get("targetPort", port["port"]) in declared, name


def assert_workload_selectors_match_their_pods(objects: Objects) -> None:
    for w in objects.workloads:
        assert selects(w["spec"]["selector"], objects.pod_labels(w)), w["metadata"]["name"]
        for other in objects.workloads:
            if other is not w:  # a selector that takes another's pods fights over them
                assert not selects(w["spec"]["selector"], objects.pod_labels(other))


def assert_probes_use_declared_ports(objects: Objects) -> None:
    """Every container has readiness and liveness probes, on ports it declares; a stage's
    on its --health-port when it has one."""
    for c in objects.containers:
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
            health_port = arg(c, "--health-port") if is_tandem(c) else None
            if health_port is not None:
                assert ports[handler["port"]]["containerPort"] == int(health_port), c["name"]


def assert_pods_run_as_non_root_with_bounded_resources(objects: Objects) -> None:
    for w in objects.workloads:
        pod = w["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True, w["metadata"]["name"]
        assert pod["securityContext"]["runAsUser"] > 0, w["metadata"]["name"]
        for c in pod["containers"]:
            assert c["securityContext"]["allowPrivilegeEscalation"] is False, c["name"]
            for kind in ("requests", "limits"):
                assert set(c["resources"][kind]) >= {"cpu", "memory"}, c["name"]
            if is_tandem(c):
                assert pod["securityContext"]["runAsUser"] == 10001  # the image's user


def assert_replicas_pinned_or_left_to_keda(objects: Objects) -> None:
    """The tokenizer and the scheduler run exactly one replica, never two at once; a
    Deployment that a ScaledObject scales has no `replicas` (an apply would reset the
    autoscaler's count), and one that none scales has its own."""
    for stage in ("tokenizer", "scheduler"):
        spec = objects.stage(stage)[0]["spec"]
        assert spec["replicas"] == 1 and spec["strategy"]["type"] == "Recreate", stage
    scaled = {d["spec"]["scaleTargetRef"]["name"] for d in objects.of_kind("ScaledObject")}
    assert scaled <= set(objects.named("Deployment"))
    for stage in SCALED_STAGES:
        workload, _ = objects.stage(stage)
        assert ("replicas" in workload["spec"]) != (workload["metadata"]["name"] in scaled), stage


# What every deployment (the plain manifests, the chart under each value set) must hold.
DEPLOYMENT_CHECKS = (
    assert_stage_args_parse,
    assert_services_select_one_workload_on_declared_ports,
    assert_workload_selectors_match_their_pods,
    assert_probes_use_declared_ports,
    assert_stops_finish_within_the_grace_period,
    assert_replicas_pinned_or_left_to_keda,
    assert_pods_run_as_non_root_with_bounded_resources,
    assert_no_service_links,
    assert_a_disruption_budget_per_stage,
    assert_no_jetstream,
)
