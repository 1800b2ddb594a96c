"""deploy/helm/tandem checked offline with Helm itself (helm-python-sdk: Helm v4 as a
library): linted strictly, then rendered with several value sets, each rendering validated
object by object (Kubernetes' own schemas; KEDA's documented fields for ScaledObjects) and held
to what deploy/k8s holds too (tests/helpers/k8s.py), and to what each value promises."""

from __future__ import annotations

import base64
import copy
import json
import re
from functools import cache

import pytest
import yaml
from helm_python.chart import Chart, lint
from helm_python.errors import HelmRenderError, HelmValuesError

from tandem.services.servers import password_env
from tests.helpers import k8s
from tests.helpers.paths import DEPLOY_DIR

CHART_DIR = DEPLOY_DIR / "helm" / "tandem"
NAMESPACE = "llm"

# name -> (release name, values): the defaults and the switches a user would flip.
VALUE_SETS = {
    "defaults": ("tandem", {}),
    "keda-off": (
        "tandem",
        {s: {"keda": {"enabled": False}, "replicas": 2} for s in k8s.SCALED_STAGES},
    ),
    "external-nats-redis": (
        "prod",
        {
            "nats": {"enabled": False},
            "externalNats": {"address": "nats.infra.svc:4222"},
            "redis": {"enabled": False},
            "externalRedis": {"host": "redis.infra.svc", "port": 6380, "db": 2, "tls": True},
            "prometheus": {"enabled": False},
            "keda": {"prometheusAddress": "http://prometheus.monitoring.svc:9090"},
        },
    ),
    "existing-secret": ("tandem", {"secrets": {"existingSecret": "tandem-credentials"}}),
    "model-volume-gpu": (
        "tandem",
        {
            "model": {"existingClaim": "models", "path": "/models/SmolLM2-135M-Instruct"},
            **{
                role: {
                    "image": {"tag": "cuda"},
                    "resources": {
                        "requests": {"cpu": "2", "memory": "4Gi"},
                        "limits": {"cpu": "4", "memory": "8Gi", "nvidia.com/gpu": 1},
                    },
                    "nodeSelector": {"gpu": "true"},
                    "tolerations": [
                        {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
                    ],
                    "extraArgs": ["--max-num-seqs", "128"],
                    "extraEnv": [{"name": "TANDEM_TRACE_FILE", "value": "/tmp/spans.jsonl"}],
                }
                for role in k8s.WORKER_STAGES
            },
            "networkPolicy": {
                "gatewayFrom": [
                    {
                        "namespaceSelector": {
                            "matchLabels": {"kubernetes.io/metadata.name": "elsewhere"}
                        }
                    }
                ]
            },
        },
    ),
}


@cache
def _chart() -> Chart:
    return Chart.load(str(CHART_DIR))


def render(values: dict, name: str = "tandem") -> dict[str, str]:
    """Template path -> rendered text, as `helm template --namespace llm` gives it."""
    return _chart().render(values=values, name=name, namespace=NAMESPACE)


def parse(rendering: dict[str, str]) -> k8s.Objects:
    docs = [d for path, text in rendering.items() if not path.endswith("NOTES.txt")
            for d in yaml.safe_load_all(text)]  # fmt: skip
    return k8s.Objects(docs, NAMESPACE)


@cache
def rendered(value_set: str) -> k8s.Objects:
    name, values = VALUE_SETS[value_set]
    return parse(render(values, name))


def fullname(value_set: str) -> str:
    release = VALUE_SETS[value_set][0]
    return release if "tandem" in release else f"{release}-tandem"


def secret_ref(var: dict) -> tuple[str, str]:
    ref = var["valueFrom"]["secretKeyRef"]
    return ref["name"], ref["key"]


def env_vars(container: dict) -> dict[str, dict]:
    return {v["name"]: v for v in container.get("env", ())}


ALL = pytest.mark.parametrize("value_set", VALUE_SETS)


@ALL
def test_the_chart_lints_clean(value_set):
    report = lint(str(CHART_DIR), VALUE_SETS[value_set][1], strict=True, namespace=NAMESPACE,
                  kube_version=f"v{k8s.K8S_VERSION}.0")  # fmt: skip
    assert report["errors"] == []
    # severity 1 is information (Chart.yaml has no icon); 2 warning, 3 error
    assert [m for m in report["messages"] if m["severity"] >= 2] == []


@ALL
def test_every_rendered_object_matches_its_schema(value_set):
    objects = rendered(value_set)
    assert len(objects.docs) > 20
    for doc in objects.docs:
        k8s.validate(doc)
        assert doc["metadata"]["namespace"] == NAMESPACE, doc["metadata"]["name"]


@ALL
@pytest.mark.parametrize(
    "check",
    k8s.DEPLOYMENT_CHECKS,
    ids=lambda f: f.__name__.removeprefix("assert_"),
)
def test_what_every_deployment_holds(value_set, check):
    check(rendered(value_set))


@ALL
def test_network_policies_let_in_only_what_tandem_needs(value_set):
    objects = rendered(value_set)
    values = VALUE_SETS[value_set][1]
    bundled = {part: values.get(part, {}).get("enabled", True) for part in ("nats", "redis")}
    k8s.assert_network_policies(
        objects,
        nats=f"{fullname(value_set)}-nats" if bundled["nats"] else None,
        redis=f"{fullname(value_set)}-redis" if bundled["redis"] else None,
    )
    gateway, container = objects.stage("gateway")
    port = int(k8s.arg(container, "--port"))
    if value_set == "model-volume-gpu":  # gatewayFrom narrows who reaches the gateway
        assert not objects.ingress_allowed(gateway, objects.client(objects.stage("decode")[0]),
                                           port)  # fmt: skip


def test_no_jetstream_flag_anywhere_in_the_chart():
    for value_set in VALUE_SETS:
        for path, text in render(VALUE_SETS[value_set][1], VALUE_SETS[value_set][0]).items():
            assert not re.search(r"""(^|[\s"'\[,])-(js|sd)\b""", text), path
            assert "jetstream" not in text.lower(), path


@ALL
def test_secrets_reach_the_stages_through_their_environment(value_set):
    """The API key, each role's NATS password and Redis' come from one Secret (the chart's
    or `existingSecret`) by reference; no pod spec holds a secret's value."""
    objects = rendered(value_set)
    values = VALUE_SETS[value_set][1]
    existing = values.get("secrets", {}).get("existingSecret")
    secret = existing or fullname(value_set)
    if existing:
        assert objects.of_kind("Secret") == []
    else:
        (own,) = objects.of_kind("Secret")
        assert own["metadata"]["name"] == secret
        held = {k: base64.b64decode(v).decode() for k, v in own["data"].items()}
        assert set(held) == {"TANDEM_API_KEY", "REDIS_PASSWORD",
                             *(password_env(s) for s in k8s.STAGES)}  # fmt: skip
        specs = json.dumps([w["spec"] for w in objects.workloads])
        assert not [k for k, v in held.items() if v in specs]
    gateway = env_vars(objects.stage("gateway")[1])
    assert secret_ref(gateway["TANDEM_API_KEY"]) == (secret, "TANDEM_API_KEY")
    for stage in k8s.STAGES:
        env = env_vars(objects.stage(stage)[1])
        assert secret_ref(env["NATS_PASSWORD"]) == (secret, password_env(stage)), stage
        assert env["NATS_USER"]["value"] == stage
        assert env["NATS_URL"]["value"] == "nats://$(NATS_USER):$(NATS_PASSWORD)@$(NATS_ADDRESS)"
    scheduler = env_vars(objects.stage("scheduler")[1])
    assert secret_ref(scheduler["REDIS_PASSWORD"]) == (secret, "REDIS_PASSWORD")
    assert re.fullmatch(r"rediss?://:\$\(REDIS_PASSWORD\)@\$\(REDIS_ADDRESS\)",
                        scheduler["REDIS_URL"]["value"])  # fmt: skip
    deployments = objects.named("Deployment")
    if (nats := deployments.get(f"{fullname(value_set)}-nats")) is not None:
        (container,) = nats["spec"]["template"]["spec"]["containers"]
        assert container["envFrom"] == [{"secretRef": {"name": secret}}]
    if (redis := deployments.get(f"{fullname(value_set)}-redis")) is not None:
        (container,) = redis["spec"]["template"]["spec"]["containers"]
        assert secret_ref(env_vars(container)["REDIS_PASSWORD"]) == (secret, "REDIS_PASSWORD")
        assert k8s.arg(container, "--requirepass") == "$(REDIS_PASSWORD)"


def test_each_stage_connects_as_its_role_to_the_bundled_servers():
    """As the kubelet expands them: each stage's NATS_URL has its role's user and password,
    the scheduler's REDIS_URL Redis' password, and both name Services of the release."""
    objects = rendered("defaults")
    (secret,) = objects.of_kind("Secret")
    held = {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}
    services = objects.named("Service")
    for stage in k8s.STAGES:
        url = objects.env(objects.stage(stage)[1])["NATS_URL"]
        assert url == f"nats://{stage}:{held[password_env(stage)]}@tandem-nats:4222", stage
        assert any(p["port"] == 4222 for p in services["tandem-nats"]["spec"]["ports"])
    redis_url = objects.env(objects.stage("scheduler")[1])["REDIS_URL"]
    assert redis_url == f"redis://:{held['REDIS_PASSWORD']}@tandem-redis:6379/0"
    for value in held.values():  # safe in a URL, and never a number to NATS' config
        assert re.fullmatch(r"[A-Za-z][A-Za-z0-9]{31}", value)
    gateway = objects.stage("gateway")[1]
    assert k8s.arg(gateway, "--tokenizer-url") == "tandem-tokenizer:50051"


def test_given_passwords_are_used_and_unsafe_ones_refused():
    values = {"secrets": {"apiKey": "key with spaces/ok", "redisPassword": "Redis-pass-1",
                          "natsPasswords": {"decode": "Decode_pass_2"}}}  # fmt: skip
    (secret,) = [d for d in yaml.safe_load_all(render(values)["tandem/templates/secret.yaml"])
                 if d]  # fmt: skip
    held = {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}
    assert held["TANDEM_API_KEY"] == "key with spaces/ok"
    assert held["REDIS_PASSWORD"] == "Redis-pass-1"
    assert held["NATS_DECODE_PASSWORD"] == "Decode_pass_2"
    for bad in ("p@ss:word", "12345678", "short"):
        with pytest.raises(HelmValuesError):
            render({"secrets": {"natsPasswords": {"gateway": bad}}})


def test_keda_scales_the_stages_with_the_plain_manifests_triggers():
    """The ScaledObjects are deploy/k8s/keda.yaml's, pointed at the release's Deployments
    and Prometheus."""
    keda_yaml = (DEPLOY_DIR / "k8s" / "keda.yaml").read_text()
    plain = {d["metadata"]["name"]: d for d in yaml.safe_load_all(keda_yaml)}
    objects = rendered("defaults")
    scaled = objects.named("ScaledObject")
    assert set(scaled) == {f"tandem-{s}" for s in k8s.SCALED_STAGES}
    services = objects.named("Service")
    for stage in k8s.SCALED_STAGES:
        spec = copy.deepcopy(scaled[f"tandem-{stage}"]["spec"])  # rendered() is shared
        assert spec["scaleTargetRef"] == {"name": f"tandem-{stage}"}
        for trigger in spec["triggers"]:
            address = trigger["metadata"].pop("serverAddress")
            assert address == f"http://tandem-prometheus.{NAMESPACE}.svc:9090"
            assert "tandem-prometheus" in services
        want = plain[stage]["spec"]
        for trigger in want["triggers"]:
            del trigger["metadata"]["serverAddress"]
        assert spec | {"scaleTargetRef": want["scaleTargetRef"]} == want, stage


def test_without_keda_the_stages_run_a_fixed_number_of_replicas():
    objects = rendered("keda-off")
    assert objects.of_kind("ScaledObject") == []
    for stage in k8s.SCALED_STAGES:
        assert objects.stage(stage)[0]["spec"]["replicas"] == 2, stage


def test_external_nats_and_redis_replace_the_bundled_ones():
    objects = rendered("external-nats-redis")
    names = {d["metadata"]["name"] for d in objects.docs}
    assert not {n for n in names if re.search(r"-(nats|redis|prometheus)\b", n)}
    (config,) = objects.of_kind("ConfigMap")
    assert config["metadata"]["name"] == "prod-tandem"
    assert config["data"]["NATS_ADDRESS"] == "nats.infra.svc:4222"
    assert config["data"]["REDIS_ADDRESS"] == "redis.infra.svc:6380/2"
    scheduler = env_vars(objects.stage("scheduler")[1])
    assert scheduler["REDIS_URL"]["value"].startswith("rediss://")
    for so in objects.of_kind("ScaledObject"):
        for trigger in so["spec"]["triggers"]:
            assert trigger["metadata"]["serverAddress"] == "http://prometheus.monitoring.svc:9090"
    # The stages connect without credentials to a NATS without Tandem's accounts
    _, values = VALUE_SETS["external-nats-redis"]
    bare = values | {"externalNats": {"address": "nats:4222", "roleAccounts": False}}
    env = env_vars(parse(render(bare, "prod")).stage("gateway")[1])
    assert env["NATS_URL"]["value"] == "nats://$(NATS_ADDRESS)" and "NATS_PASSWORD" not in env


@pytest.mark.parametrize(
    "values, message",
    [
        ({"nats": {"enabled": False}}, "externalNats.address"),
        ({"redis": {"enabled": False}}, "externalRedis.host"),
        ({"prometheus": {"enabled": False}}, "keda.prometheusAddress"),
        ({"gateway": {"terminationGracePeriodSeconds": 30}}, "gateway.terminationGrace"),
        ({"decode": {"shutdownTimeout": 120}}, "decode.terminationGrace"),
    ],
)
def test_settings_that_cannot_work_are_refused(values, message):
    with pytest.raises(HelmRenderError, match=message):
        render(values)


def test_the_values_schema_rejects_what_the_chart_does_not_know():
    no_threshold = {"keda": {"triggers": [{"name": "x", "query": "up"}]}}
    for values in ({"gatway": {}}, {"tokenizer": {"replicas": 2}}, {"prefill": no_threshold}):
        with pytest.raises(HelmValuesError):
            render(values)


def test_the_model_volume_is_mounted_where_the_stages_read_it():
    objects = rendered("model-volume-gpu")
    for stage in ("gateway", "tokenizer", *k8s.WORKER_STAGES):
        workload, container = objects.stage(stage)
        pod = workload["spec"]["template"]["spec"]
        assert k8s.arg(container, "--model") == "/models/SmolLM2-135M-Instruct", stage
        assert container["volumeMounts"] == [{"name": "model", "mountPath": "/models",
                                              "readOnly": True}]  # fmt: skip
        assert pod["volumes"] == [{"name": "model", "persistentVolumeClaim": {
            "claimName": "models", "readOnly": True}}]  # fmt: skip
    for role in k8s.WORKER_STAGES:
        workload, container = objects.stage(role)
        pod = workload["spec"]["template"]["spec"]
        assert container["image"] == "tandem:cuda"
        assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
        assert pod["nodeSelector"] == {"gpu": "true"} and pod["tolerations"]
        assert container["args"][-2:] == ["--max-num-seqs", "128"]
        assert env_vars(container)["TANDEM_TRACE_FILE"]["value"] == "/tmp/spans.jsonl"
    workload, container = objects.stage("scheduler")
    assert "--model" not in container["args"] and "volumes" not in workload["spec"]["template"]
    # a folder on each node instead, its path the mount itself
    workload, container = parse(render({"model": {"hostPath": "/srv/models"}})).stage("prefill")
    assert k8s.arg(container, "--model") == "/models"
    assert workload["spec"]["template"]["spec"]["volumes"][0]["hostPath"]["path"] == "/srv/models"


def test_prometheus_scrapes_every_gateway_pod():
    objects = rendered("defaults")
    config = yaml.safe_load(
        objects.named("ConfigMap")["tandem-prometheus"]["data"]["prometheus.yml"]
    )
    ((sd,),) = [job["dns_sd_configs"] for job in config["scrape_configs"]]
    assert sd["names"] == [f"tandem-gateway-pods.{NAMESPACE}.svc"]
    pods = objects.named("Service")["tandem-gateway-pods"]["spec"]
    assert pods["clusterIP"] == "None" and pods["publishNotReadyAddresses"] is True
    assert sd["port"] == int(k8s.arg(objects.stage("gateway")[1], "--port"))


def test_the_notes_say_how_to_reach_the_gateway_with_the_key():
    notes = render({})["tandem/templates/NOTES.txt"]
    assert "svc/tandem-gateway" in notes and "secret tandem" in notes
    assert "TANDEM_API_KEY" in notes


def test_nats_runs_with_the_role_accounts_of_the_subject_table():
    from tandem.services.servers import deploy_accounts_conf

    objects = rendered("defaults")
    nats = objects.named("Deployment")["tandem-nats"]
    pod = nats["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    conf = k8s.arg(container, "-c")
    (mount,) = [m for m in container["volumeMounts"] if conf.startswith(m["mountPath"] + "/")]
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    config_map = objects.named("ConfigMap")[volume["configMap"]["name"]]
    assert config_map["data"][conf.removeprefix(mount["mountPath"] + "/")] == deploy_accounts_conf()
