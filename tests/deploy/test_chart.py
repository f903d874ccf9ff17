"""The Helm chart, rendered by a real `helm template` and linted by `helm lint`.

Gateway mode, sidecar mode through the example application chart (native and classic), and every
optional part on; the rendered manifests are parsed and asserted, checked against the Kubernetes
schemas, and the ConfigMap's config is run through the proxy's own --check-config.
"""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path
from typing import Any

import msgspec
import pytest
import yaml

from proxy import config as proxy_config
from proxy.__main__ import SYSTEM_CONFIG
from proxy.units import parse_duration

from .conftest import ALL_OPTIONAL, CHART, KUBE_VERSION, ROOT, Render, Rendered, run

ADMIN_PORT = 9090
PROXY = "openai-resilience-proxy"
CORE_KINDS = {"ConfigMap", "Service", "Deployment", "PodDisruptionBudget"}
SCHEMA_PATH = CHART / "values.schema.json"


def proxy_container(spec: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """Where the proxy sits in a pod spec ("initContainers" or "containers") and its container."""
    found = [(where, c) for where in ("initContainers", "containers") for c in spec.get(where) or []
             if c["name"] == PROXY]
    assert len(found) == 1, f"expected the proxy container once, found {found}"
    return found[0]


def assert_probes_on_admin_port(c: dict[str, Any]) -> None:
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": ADMIN_PORT}
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": ADMIN_PORT}
    assert c["startupProbe"]["httpGet"] == {"path": "/readyz", "port": ADMIN_PORT}
    assert {"name": "proxy-admin", "containerPort": ADMIN_PORT, "protocol": "TCP"} in c["ports"]


def assert_locked_down(c: dict[str, Any]) -> None:
    sc = c["securityContext"]
    assert sc["runAsNonRoot"] is True
    assert sc["runAsUser"] != 0
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert "add" not in sc["capabilities"]
    assert sc.get("privileged") in (None, False)
    assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
    # a read-only root needs the writable /tmp
    assert {"name": f"{PROXY}-tmp", "mountPath": "/tmp"} in c["volumeMounts"]


def assert_config_mounted(spec: dict[str, Any], c: dict[str, Any], configmap: dict[str, Any]) -> None:
    mount = next(m for m in c["volumeMounts"] if m["mountPath"] == str(Path(SYSTEM_CONFIG).parent))
    assert mount["readOnly"] is True
    volume = next(v for v in spec["volumes"] if v["name"] == mount["name"])
    assert volume["configMap"]["name"] == configmap["metadata"]["name"]
    assert {"name": "PROXY_CONFIG", "value": SYSTEM_CONFIG} in c["env"]
    assert "config.yaml" in configmap["data"]


def grace_seconds(config: dict[str, Any]) -> float:
    return parse_duration(config.get("shutdown_grace", "30s"))


def check_config(config_text: str, tmp_path: Path) -> dict[str, Any]:
    """The proxy's own verdict on a config file: --check-config must exit 0; the effective config."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "config.yaml"
    path.write_text(config_text)
    proc = subprocess.run([sys.executable, "-m", "proxy", "--check-config", "--config", str(path)],
                          capture_output=True, text=True, timeout=30, env={"PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, f"--check-config rejected the rendered config:\n{proc.stderr}\n{config_text}"
    return yaml.safe_load(proc.stdout)  # type: ignore[no-any-return]


# ---- lint ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("values", [None, {"mode": "sidecar"}, ALL_OPTIONAL], ids=["gateway", "sidecar", "all-optional"])
def test_helm_lint_chart(helm: str, values: dict[str, Any] | None, tmp_path: Path) -> None:
    args = [helm, "lint", "--strict", str(CHART), "--kube-version", KUBE_VERSION]
    if values is not None:
        (tmp_path / "v.yaml").write_text(yaml.safe_dump(values))
        args += ["-f", str(tmp_path / "v.yaml")]
    out = run(args).stdout
    assert "1 chart(s) linted, 0 chart(s) failed" in out


def test_helm_lint_example_app(helm: str, example_chart: Path) -> None:
    out = run([helm, "lint", "--strict", str(example_chart), "--kube-version", KUBE_VERSION]).stdout
    assert "1 chart(s) linted, 0 chart(s) failed" in out


# ---- gateway mode -------------------------------------------------------------------------------

def test_gateway_renders_deployment_service_configmap(render: Render) -> None:
    r = render()
    assert sorted(r.kinds()) == ["ConfigMap", "Deployment", "PodDisruptionBudget", "Service"]  # PDB: 2 replicas
    deploy = r.one("Deployment")
    spec = r.pod_spec()
    where, c = proxy_container(spec)
    assert where == "containers" and "restartPolicy" not in c
    assert deploy["spec"]["replicas"] == 2
    assert c["image"] == f"{PROXY}:{yaml.safe_load((CHART / 'Chart.yaml').read_text())['appVersion']}"
    assert_probes_on_admin_port(c)
    assert_locked_down(c)
    assert_config_mounted(spec, c, r.one("ConfigMap"))
    pod_sc = spec["securityContext"]
    assert pod_sc["runAsNonRoot"] is True and pod_sc["runAsUser"] != 0
    assert spec["automountServiceAccountToken"] is False
    assert c["resources"]["requests"] and c["resources"]["limits"]["memory"]
    # scrape annotations (no ServiceMonitor by default)
    ann = deploy["spec"]["template"]["metadata"]["annotations"]
    assert ann["prometheus.io/scrape"] == "true" and ann["prometheus.io/port"] == str(ADMIN_PORT)
    assert ann["prometheus.io/path"] == "/metrics"
    assert len(ann["checksum/openai-resilience-proxy-config"]) == 64
    # the Service reaches the named container ports and selects the pods
    svc = r.one("Service")
    ports = {p["name"]: p for p in svc["spec"]["ports"]}
    assert ports["http"]["port"] == 8080 and ports["http"]["targetPort"] == "proxy-http"
    assert ports["admin"]["port"] == ADMIN_PORT and ports["admin"]["targetPort"] == "proxy-admin"
    assert {p["name"] for p in c["ports"]} == {"proxy-http", "proxy-admin"}
    labels = deploy["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= labels.items()
    assert deploy["spec"]["selector"]["matchLabels"] == svc["spec"]["selector"]


def test_gateway_config_listens_on_all_interfaces_and_passes_check_config(render: Render, tmp_path: Path) -> None:
    effective = check_config(render().one("ConfigMap")["data"]["config.yaml"], tmp_path)
    assert effective["listen"] == {"host": "0.0.0.0", "port": 8080, "max_connections": 4096}
    assert effective["admin"] == {"host": "0.0.0.0", "port": ADMIN_PORT}


def test_gateway_refuses_a_loopback_listener(render_error: Any) -> None:
    err = render_error(CHART, {"config": {"listen": {"host": "127.0.0.1"}}})
    assert "config.listen.host" in err and "gateway" in err


def test_termination_grace_is_above_the_drain(render: Render) -> None:
    spec = render().pod_spec()
    _, c = proxy_container(spec)
    pre_stop = c["lifecycle"]["preStop"]["sleep"]["seconds"]  # Kubernetes 1.30: the native sleep action
    assert spec["terminationGracePeriodSeconds"] > pre_stop + grace_seconds({})  # 45 > 5 + 30
    spec = render(CHART, {"config": {"shutdown_grace": "2m"}}).pod_spec()
    assert spec["terminationGracePeriodSeconds"] == 5 + 120 + 10
    spec = render(CHART, {"config": {"shutdown_grace": "1500ms"}, "preStopSleepSeconds": 0}).pod_spec()
    assert spec["terminationGracePeriodSeconds"] == 2 + 10
    assert "lifecycle" not in proxy_container(spec)[1]
    assert render(CHART, {"terminationGracePeriodSeconds": 90}).pod_spec()["terminationGracePeriodSeconds"] == 90


def test_termination_grace_shorter_than_the_drain_fails(render_error: Any) -> None:
    err = render_error(CHART, {"terminationGracePeriodSeconds": 30})
    assert "terminationGracePeriodSeconds" in err and "35" in err


def test_config_change_rolls_the_pods(render: Render) -> None:
    def checksum(r: Rendered) -> str:
        return r.one("Deployment")["spec"]["template"]["metadata"]["annotations"]["checksum/openai-resilience-proxy-config"]

    base = render()
    changed = render(CHART, {"config": {"log": {"level": "debug"}}})
    unrelated = render(CHART, {"replicaCount": 3})
    assert checksum(changed) != checksum(base)
    assert changed.one("ConfigMap")["data"] != base.one("ConfigMap")["data"]
    assert checksum(unrelated) == checksum(base)


def test_every_documented_config_key_passes_the_schema_and_the_proxy(render: Render, tmp_path: Path) -> None:
    """config/default.yaml (every key, written out) as values.config: the chart's schema accepts it,
    and the proxy reads the rendered file back to the same effective config."""
    default = yaml.safe_load((ROOT / "config" / "default.yaml").read_text())
    values = copy.deepcopy(default)
    del values["admin"]["port"]  # the chart's `ports` own the ports,
    del values["listen"]  # and gateway mode the traffic listener's address
    cm = render(CHART, {"config": values}).one("ConfigMap")
    rendered = check_config(cm["data"]["config.yaml"], tmp_path / "rendered")
    expected = check_config((ROOT / "config" / "default.yaml").read_text(), tmp_path / "default")
    expected["listen"]["host"] = "0.0.0.0"
    assert rendered == expected


@pytest.mark.parametrize("example", sorted((ROOT / "config" / "examples").glob("*.yaml")), ids=lambda p: p.name)
def test_config_examples_pass_the_schema_and_the_proxy(render: Render, example: Path, tmp_path: Path) -> None:
    values = yaml.safe_load(example.read_text())
    for section in ("listen", "admin"):
        (values.get(section) or {}).pop("port", None)
    check_config(render(CHART, {"config": values}).one("ConfigMap")["data"]["config.yaml"], tmp_path)


# ---- every optional part on ---------------------------------------------------------------------

def test_all_optional_parts(render: Render) -> None:
    r = render(CHART, ALL_OPTIONAL)
    assert sorted(r.kinds()) == sorted(["ConfigMap", "ConfigMap", "Deployment", "Service", "ServiceMonitor",
                                        "PrometheusRule", "PodDisruptionBudget"])
    labels = r.one("Deployment")["spec"]["template"]["metadata"]["labels"]
    pdb = r.one("PodDisruptionBudget")
    assert pdb["apiVersion"] == "policy/v1"
    assert pdb["spec"]["maxUnavailable"] == 1 and "minAvailable" not in pdb["spec"]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    # ServiceMonitor on, so no scrape annotations (no double scrape)
    ann = r.one("Deployment")["spec"]["template"]["metadata"]["annotations"]
    assert "prometheus.io/scrape" not in ann
    sm = r.one("ServiceMonitor")
    assert sm["apiVersion"] == "monitoring.coreos.com/v1"
    assert sm["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    svc = r.one("Service")
    assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    assert sm["spec"]["namespaceSelector"] == {"matchNames": ["ai"]}
    (endpoint,) = sm["spec"]["endpoints"]
    assert endpoint["port"] in {p["name"] for p in svc["spec"]["ports"]}
    assert next(p for p in svc["spec"]["ports"] if p["name"] == endpoint["port"])["port"] == ADMIN_PORT
    assert endpoint["path"] == "/metrics"
    dash = r.one("ConfigMap", "-dashboard")
    assert dash["metadata"]["labels"]["grafana_dashboard"] == "1"


@pytest.mark.parametrize("pdb,expected", [({"minAvailable": 1}, {"minAvailable": 1}),
                                          ({"maxUnavailable": "25%"}, {"maxUnavailable": "25%"})])
def test_pdb_takes_one_bound(render: Render, pdb: dict[str, Any], expected: dict[str, Any]) -> None:
    spec = render(CHART, {"podDisruptionBudget": {"enabled": True, **pdb}}).one("PodDisruptionBudget")["spec"]
    assert {k: spec[k] for k in ("minAvailable", "maxUnavailable") if k in spec} == expected


# ---- sidecar mode, through the example application chart ---------------------------------------

def test_sidecar_mode_renders_only_the_configmap(render: Render) -> None:
    assert render(CHART, {"mode": "sidecar"}).kinds() == ["ConfigMap"]


def test_example_app_runs_the_proxy_as_a_native_sidecar(render: Render, example_chart: Path, tmp_path: Path) -> None:
    r = render(example_chart)
    assert sorted(r.kinds()) == ["ConfigMap", "Deployment"]  # the proxy's ConfigMap, the app's Deployment
    spec = r.pod_spec()
    where, proxy = proxy_container(spec)
    assert where == "initContainers"
    assert proxy["restartPolicy"] == "Always"  # a native sidecar: starts before the app, stops after it
    assert "lifecycle" not in proxy  # Kubernetes stops it after the app: no preStop pause needed
    assert_probes_on_admin_port(proxy)
    assert_locked_down(proxy)
    assert_config_mounted(spec, proxy, r.one("ConfigMap"))
    (app,) = spec["containers"]
    assert app["name"] == "app"
    assert {"name": "OPENAI_BASE_URL", "value": "http://127.0.0.1:8080/v1"} in app["env"]
    ann = r.one("Deployment")["spec"]["template"]["metadata"]["annotations"]
    assert len(ann["checksum/openai-resilience-proxy-config"]) == 64
    assert ann["prometheus.io/port"] == str(ADMIN_PORT)
    config = yaml.safe_load(r.one("ConfigMap")["data"]["config.yaml"])
    assert spec["terminationGracePeriodSeconds"] > grace_seconds(config)
    effective = check_config(r.one("ConfigMap")["data"]["config.yaml"], tmp_path)
    assert effective["listen"] == {"host": "127.0.0.1", "port": 8080, "max_connections": 4096}  # only the pod reaches it
    assert effective["admin"] == {"host": "0.0.0.0", "port": ADMIN_PORT}  # the kubelet and Prometheus do


@pytest.mark.parametrize("native,kube,expected", [
    ("auto", "1.30.0", "initContainers"),
    ("auto", "1.29.0", "initContainers"),
    ("auto", "1.28.9", "containers"),
    (False, "1.30.0", "containers"),
    (True, "1.28.9", "initContainers"),
])
def test_sidecar_native_or_classic(render: Render, example_chart: Path, native: Any, kube: str, expected: str) -> None:
    r = render(example_chart, {PROXY: {"sidecar": {"native": native}}}, "--kube-version", kube)
    spec = r.pod_spec()
    where, proxy = proxy_container(spec)
    assert where == expected
    if where == "initContainers":
        assert proxy["restartPolicy"] == "Always"
        assert [c["name"] for c in spec["containers"]] == ["app"]
    else:
        # the classic fallback: next to the app, a preStop pause keeps it serving while the app drains
        assert "restartPolicy" not in proxy and "initContainers" not in spec
        assert [c["name"] for c in spec["containers"]] == ["app", PROXY]
        # (Kubernetes' own sleep action from 1.30; `sleep` in the image below)
        expected_pre_stop = {"sleep": {"seconds": 5}} if kube >= "1.30" else {"exec": {"command": ["sleep", "5"]}}
        assert proxy["lifecycle"]["preStop"] == expected_pre_stop
    assert_probes_on_admin_port(proxy)
    assert_locked_down(proxy)


def test_example_app_config_change_rolls_its_pods(render: Render, example_chart: Path) -> None:
    def checksum(r: Rendered) -> str:
        return r.one("Deployment")["spec"]["template"]["metadata"]["annotations"]["checksum/openai-resilience-proxy-config"]

    assert checksum(render(example_chart)) != checksum(
        render(example_chart, {PROXY: {"config": {"log": {"level": "debug"}}}}))


def test_sidecar_templates_refuse_gateway_mode(render_error: Any, example_chart: Path) -> None:
    err = render_error(example_chart, {PROXY: {"mode": "gateway"}})
    assert "mode: sidecar" in err


# ---- values.schema.json -------------------------------------------------------------------------

BAD_VALUES = [
    ({"replicaCont": 3}, "replicaCont"),
    ({"mode": "sidekick"}, "mode"),
    ({"serviceMonitor": {"enabeld": True}}, "enabeld"),
    ({"probes": {"liveness": {"periodSecond": 5}}}, "periodSecond"),
    ({"config": {"shutdown_grase": "30s"}}, "shutdown_grase"),
    ({"config": {"shutdown_grace": "30"}}, "shutdown_grace"),
    ({"config": {"defaults": {"retry": {"max_atempts": 3}}}}, "max_atempts"),
    ({"config": {"defaults": {"retry": {"retry_on": ["timeouts"]}}}}, "retry_on"),
    ({"config": {"routes": [{"name": "x", "path": "/v1/x", "retry": {"backof": {}}}]}}, "backof"),
    ({"config": {"listen": {"port": 8081}}}, "port"),
    ({"config": {"log": {"level": "verbose"}}}, "level"),
    ({"config": {"workers": 2}}, "workers"),
]


@pytest.mark.parametrize("values,path", BAD_VALUES, ids=[f"{i}-{p}" for i, (_, p) in enumerate(BAD_VALUES)])
def test_schema_rejects_typos_and_bad_values(render_error: Any, values: dict[str, Any], path: str) -> None:
    err = render_error(CHART, values)
    assert "schema" in err and path in err, err


def test_schema_checks_the_dependency_values_of_an_application_chart(render_error: Any, example_chart: Path) -> None:
    err = render_error(example_chart, {PROXY: {"config": {"defaults": {"timeouts": {"frist_byte": "1m"}}}}})
    assert "schema" in err and "frist_byte" in err, err


def _schema_keys(node: dict[str, Any], schema: dict[str, Any]) -> set[str]:
    if "$ref" in node:
        node = schema["definitions"][node["$ref"].rsplit("/", 1)[1]]
    return set(node["properties"])


def test_schema_config_keys_match_the_proxy(tmp_path: Path) -> None:
    """values.schema.json repeats the proxy's config keys (so a typo fails at install): it must
    name exactly the keys proxy/config.py accepts, section by section."""
    import json

    schema = json.loads(SCHEMA_PATH.read_text())
    config = schema["properties"]["config"]
    fields = {name: {f.name for f in msgspec.structs.fields(cls)}
              for name, cls in [("File", proxy_config._File), ("Route", proxy_config._RouteSpec),
                                ("Listen", proxy_config.Listen), ("Admin", proxy_config.Admin),
                                ("Upstream", proxy_config.Upstream), ("Log", proxy_config.Log),
                                ("Policy", proxy_config.Policy), ("Timeouts", proxy_config.Timeouts),
                                ("Retry", proxy_config.Retry), ("Backoff", proxy_config.Backoff),
                                ("Budget", proxy_config.Budget), ("Breaker", proxy_config.Breaker)]}
    props = config["properties"]
    retry = schema["definitions"]["retry"]
    assert set(props) == fields["File"]
    assert _schema_keys(props["upstream"], schema) == fields["Upstream"]
    assert _schema_keys(props["log"], schema) == fields["Log"]
    assert _schema_keys(props["defaults"], schema) == fields["Policy"]
    assert _schema_keys(schema["definitions"]["route"], schema) == fields["Route"]
    assert _schema_keys(schema["definitions"]["timeouts"], schema) == fields["Timeouts"]
    assert set(retry["properties"]) == fields["Retry"]
    assert set(retry["properties"]["backoff"]["properties"]) == fields["Backoff"]
    assert set(retry["properties"]["budget"]["properties"]) == fields["Budget"]
    assert _schema_keys(schema["definitions"]["breaker"], schema) == fields["Breaker"]
    # ports belong to the chart's `ports`; the hosts may be set in config
    assert _schema_keys(props["listen"], schema) == fields["Listen"] - {"port"}
    assert _schema_keys(props["admin"], schema) == fields["Admin"] - {"port"}
    assert schema["definitions"]["categories"]["items"]["enum"] == list(proxy_config.CategoryName.__args__)


# ---- Kubernetes schemas -------------------------------------------------------------------------

def _renders(render: Render, example_chart: Path) -> dict[str, tuple[Rendered, str]]:
    return {
        "gateway": (render(), KUBE_VERSION),
        "all-optional": (render(CHART, ALL_OPTIONAL), KUBE_VERSION),
        "sidecar-native": (render(example_chart), KUBE_VERSION),
        "sidecar-native-1.29": (render(example_chart, None, "--kube-version", "1.29.0"), "1.29.0"),
        "sidecar-classic-1.28": (render(example_chart, None, "--kube-version", "1.28.9"), "1.28.0"),
    }


def test_manifests_validate_against_kubernetes_schemas(render: Render, example_chart: Path,
                                                       kubernetes_validate: Any) -> None:
    seen: set[str] = set()
    for name, (r, version) in _renders(render, example_chart).items():
        for doc in r.docs:
            if doc["apiVersion"].startswith("monitoring.coreos.com/"):
                continue  # CRDs: not in the schemas; asserted by hand in test_all_optional_parts and test_monitoring
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except Exception as exc:  # the library's ValidationError carries the path
                pytest.fail(f"{name}: {doc['kind']}/{doc['metadata']['name']} is invalid for Kubernetes {version}:\n{exc}")
            seen.add(doc["kind"])
    assert seen == CORE_KINDS


def test_strict_schema_validation_catches_an_unknown_field(render: Render, example_chart: Path,
                                                           kubernetes_validate: Any) -> None:
    deploy = copy.deepcopy(render(example_chart).one("Deployment"))
    deploy["spec"]["template"]["spec"]["initContainers"][0]["restartPolicyy"] = "Always"
    with pytest.raises(kubernetes_validate.ValidationError, match="restartPolicyy"):
        kubernetes_validate.validate(deploy, KUBE_VERSION, strict=True)
