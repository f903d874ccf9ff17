"""The chart's production pieces (issue 17, item 5): autoscaler, NetworkPolicy, topology spread,
the default PodDisruptionBudget, the native preStop sleep, the PodMonitor, release-scoped names.

Each is rendered by a real `helm template`, linted by `helm lint --strict` and validated against
the Kubernetes schemas of 1.28 to 1.31; the rule groups of two releases go through promtool.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from .conftest import CHART, Render, run

PROXY = "openai-resilience-proxy"
KUBE_VERSIONS = ["1.28.0", "1.29.0", "1.30.0", "1.31.0"]
PRODUCTION = {
    "autoscaling": {"enabled": True, "targetMemoryUtilizationPercentage": 80},
    "networkPolicy": {"enabled": True, "traffic": {"namespaces": ["chat"],
                                                   "namespaceSelector": {"matchLabels": {"llm-client": "true"}}}},
    "podMonitor": {"enabled": True},
    "prometheusRule": {"enabled": True},
    "dashboard": {"enabled": True},
}
SIDECAR_MONITORED = {PROXY: {"podMonitor": {"enabled": True}}}


def pod_labels(r: Any) -> dict[str, str]:
    return r.one("Deployment")["spec"]["template"]["metadata"]["labels"]  # type: ignore[no-any-return]


def proxy_of(spec: dict[str, Any]) -> dict[str, Any]:
    return next(c for where in ("initContainers", "containers") for c in spec.get(where) or [] if c["name"] == PROXY)


# ---- lint and Kubernetes schemas, 1.28-1.31 -----------------------------------------------------

@pytest.mark.parametrize("kube", KUBE_VERSIONS)
@pytest.mark.parametrize("values", [PRODUCTION, {"mode": "sidecar", "podMonitor": {"enabled": True}}],
                         ids=["gateway-production", "sidecar-podmonitor"])
def test_helm_lint_strict(helm: str, kube: str, values: dict[str, Any], tmp_path: Path) -> None:
    (tmp_path / "v.yaml").write_text(yaml.safe_dump(values))
    out = run([helm, "lint", "--strict", str(CHART), "--kube-version", kube, "-f", str(tmp_path / "v.yaml")]).stdout
    assert "1 chart(s) linted, 0 chart(s) failed" in out


@pytest.mark.parametrize("kube", KUBE_VERSIONS)
def test_production_manifests_validate(render: Render, example_chart: Path, kubernetes_validate: Any,
                                       kube: str) -> None:
    seen: set[str] = set()
    for r in (render(CHART, PRODUCTION, "--kube-version", kube),
              render(example_chart, SIDECAR_MONITORED, "--kube-version", kube)):
        for doc in r.docs:
            if doc["apiVersion"].startswith("monitoring.coreos.com/"):
                continue  # CRDs: not in the schemas; asserted by hand below
            try:
                kubernetes_validate.validate(doc, kube.rsplit(".", 1)[0] + ".0", strict=True)
            except Exception as exc:
                pytest.fail(f"{doc['kind']}/{doc['metadata']['name']} is invalid for Kubernetes {kube}:\n{exc}")
            seen.add(doc["kind"])
    assert {"HorizontalPodAutoscaler", "NetworkPolicy", "PodDisruptionBudget", "Deployment"} <= seen


# ---- HorizontalPodAutoscaler --------------------------------------------------------------------

def test_autoscaler_scales_the_gateway_deployment(render: Render) -> None:
    assert "HorizontalPodAutoscaler" not in render().kinds()
    r = render(CHART, PRODUCTION)
    hpa, deploy = r.one("HorizontalPodAutoscaler"), r.one("Deployment")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                             "name": deploy["metadata"]["name"]}
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (2, 10)
    targets = {m["resource"]["name"]: m["resource"]["target"] for m in hpa["spec"]["metrics"]}
    assert targets == {"cpu": {"type": "Utilization", "averageUtilization": 70},
                       "memory": {"type": "Utilization", "averageUtilization": 80}}
    assert "replicas" not in deploy["spec"]  # an upgrade must not reset what the autoscaler chose
    behavior = {"scaleDown": {"stabilizationWindowSeconds": 600}}
    assert render(CHART, {"autoscaling": {"enabled": True, "behavior": behavior}}).one(
        "HorizontalPodAutoscaler")["spec"]["behavior"] == behavior


@pytest.mark.parametrize("values,message", [
    ({"autoscaling": {"enabled": True, "minReplicas": 5, "maxReplicas": 3}}, "minReplicas 5 is above maxReplicas 3"),
    ({"autoscaling": {"enabled": True, "targetCPUUtilizationPercentage": None}}, "targetCPUUtilizationPercentage"),
    ({"autoscaling": {"enabled": True}, "resources": {"requests": {"cpu": None}}}, "resources.requests.cpu"),
    ({"autoscaling": {"enabled": True}, "mode": "sidecar"}, "autoscaling.enabled: gateway mode only"),
    ({"networkPolicy": {"enabled": True}, "mode": "sidecar"}, "networkPolicy.enabled: gateway mode only"),
    ({"networkPolicy": {"enabled": True, "admin": {"namespaceSelector": None}}}, "networkPolicy.admin"),
    ({"podDisruptionBudget": {"enabled": True}, "mode": "sidecar"}, "podDisruptionBudget.enabled: gateway mode only"),
    ({"serviceMonitor": {"enabled": True}, "mode": "sidecar"}, "set podMonitor.enabled instead"),
    ({"serviceMonitor": {"enabled": True}, "podMonitor": {"enabled": True}}, "enable one"),
    ({"preStopAction": "native"}, "preStopAction"),
], ids=["min-above-max", "no-target", "cpu-without-request", "hpa-sidecar", "netpol-sidecar", "netpol-no-admin",
        "pdb-sidecar", "servicemonitor-sidecar", "both-monitors", "prestop-typo"])
def test_a_misconfiguration_fails_naming_the_key(render_error: Any, values: dict[str, Any], message: str) -> None:
    assert message in render_error(CHART, values)


# ---- NetworkPolicy ------------------------------------------------------------------------------

def test_network_policy_admits_traffic_and_scrapes_only(render: Render) -> None:
    assert "NetworkPolicy" not in render().kinds()
    r = render(CHART, PRODUCTION)
    np = r.one("NetworkPolicy")
    assert np["apiVersion"] == "networking.k8s.io/v1"
    assert np["spec"]["podSelector"]["matchLabels"].items() <= pod_labels(r).items()
    assert np["spec"]["policyTypes"] == ["Ingress"]  # egress to api.openai.com is by DNS name: not expressible
    traffic, admin = np["spec"]["ingress"]
    assert traffic["ports"] == [{"port": 8080, "protocol": "TCP"}]
    assert traffic["from"] == [
        {"namespaceSelector": {"matchExpressions": [{"key": "kubernetes.io/metadata.name", "operator": "In",
                                                     "values": ["ai", "chat"]}]}},
        {"namespaceSelector": {"matchLabels": {"llm-client": "true"}}},
    ]
    assert admin["ports"] == [{"port": 9090, "protocol": "TCP"}]
    assert admin["from"] == [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}]
    container_ports = {p["containerPort"] for p in proxy_of(r.pod_spec())["ports"]}
    assert {traffic["ports"][0]["port"], admin["ports"][0]["port"]} == container_ports


def test_network_policy_narrows_to_pods(render: Render) -> None:
    values = {"networkPolicy": {"enabled": True, "traffic": {"podSelector": {"matchLabels": {"app": "chat"}}},
                                "admin": {"podSelector": {"matchLabels": {"app": "prometheus"}}}}}
    traffic, admin = render(CHART, values).one("NetworkPolicy")["spec"]["ingress"]
    (peer,) = traffic["from"]  # no namespaceSelector peer: an empty one would admit every namespace
    assert peer["podSelector"] == {"matchLabels": {"app": "chat"}}
    assert admin["from"] == [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}},
                              "podSelector": {"matchLabels": {"app": "prometheus"}}}]


# ---- topology spread ----------------------------------------------------------------------------

def test_replicas_spread_across_nodes_and_zones_by_default(render: Render) -> None:
    r = render()
    constraints = r.pod_spec()["topologySpreadConstraints"]
    assert [c["topologyKey"] for c in constraints] == ["kubernetes.io/hostname", "topology.kubernetes.io/zone"]
    for c in constraints:
        assert c["whenUnsatisfiable"] == "ScheduleAnyway" and c["maxSkew"] == 1  # soft: never blocks scheduling
        assert c["labelSelector"]["matchLabels"].items() <= pod_labels(r).items()
        assert c["matchLabelKeys"] == ["pod-template-hash"]
    assert "topologySpreadConstraints" not in render(CHART, {"topologySpreadConstraints": []}).pod_spec()
    own = {"topologyKey": "zone", "maxSkew": 2, "whenUnsatisfiable": "DoNotSchedule",
           "labelSelector": {"matchLabels": {"tier": "llm"}}}
    assert render(CHART, {"topologySpreadConstraints": [own]}).pod_spec()["topologySpreadConstraints"] == [own]


# ---- PodDisruptionBudget ------------------------------------------------------------------------

@pytest.mark.parametrize("values,expected", [
    ({}, True),
    ({"replicaCount": 1}, False),
    ({"replicaCount": 1, "podDisruptionBudget": {"enabled": True}}, True),
    ({"podDisruptionBudget": {"enabled": False}}, False),
    ({"autoscaling": {"enabled": True, "minReplicas": 1}}, False),
    ({"autoscaling": {"enabled": True, "minReplicas": 3}, "replicaCount": 1}, True),
    ({"mode": "sidecar"}, False),
], ids=["default-2-replicas", "1-replica", "forced", "off", "hpa-min-1", "hpa-min-3", "sidecar"])
def test_pdb_is_on_by_default_with_more_than_one_replica(render: Render, values: dict[str, Any],
                                                         expected: bool) -> None:
    r = render(CHART, values)
    assert ("PodDisruptionBudget" in r.kinds()) is expected
    if expected:
        pdb = r.one("PodDisruptionBudget")
        assert pdb["spec"] == {"maxUnavailable": 1, "selector": r.one("Deployment")["spec"]["selector"]}


# ---- preStop ------------------------------------------------------------------------------------

@pytest.mark.parametrize("kube,action,expected", [
    ("1.31.0", "auto", {"sleep": {"seconds": 5}}),
    ("1.30.0", "auto", {"sleep": {"seconds": 5}}),
    ("1.29.0", "auto", {"exec": {"command": ["sleep", "5"]}}),
    ("1.28.0", "auto", {"exec": {"command": ["sleep", "5"]}}),
    ("1.30.0", "exec", {"exec": {"command": ["sleep", "5"]}}),
    ("1.29.0", "sleep", {"sleep": {"seconds": 5}}),
])
def test_pre_stop_uses_the_native_sleep_from_1_30(render: Render, kube: str, action: str,
                                                  expected: dict[str, Any]) -> None:
    spec = render(CHART, {"preStopAction": action}, "--kube-version", kube).pod_spec()
    assert proxy_of(spec)["lifecycle"]["preStop"] == expected


# ---- PodMonitor ---------------------------------------------------------------------------------

def test_sidecar_mode_podmonitor_scrapes_the_application_pods(render: Render, example_chart: Path) -> None:
    r = render(example_chart, SIDECAR_MONITORED)
    pm = r.one("PodMonitor")
    assert pm["apiVersion"] == "monitoring.coreos.com/v1"
    assert pm["spec"]["selector"]["matchLabels"].items() <= pod_labels(r).items()  # the application's pods
    assert pm["spec"]["namespaceSelector"] == {"matchNames": ["ai"]}
    (endpoint,) = pm["spec"]["podMetricsEndpoints"]
    admin = next(p for p in proxy_of(r.pod_spec())["ports"] if p["name"] == endpoint["port"])
    assert admin["containerPort"] == 9090 and endpoint["path"] == "/metrics"
    assert (endpoint["interval"], endpoint["scrapeTimeout"]) == ("30s", "10s")
    ann = r.one("Deployment")["spec"]["template"]["metadata"]["annotations"]
    assert "prometheus.io/scrape" not in ann  # scraped once, by the PodMonitor
    custom = {PROXY: {"podMonitor": {"enabled": True, "selector": {"matchLabels": {"app": "chat"}}}}}
    assert render(example_chart, custom).one("PodMonitor")["spec"]["selector"] == {"matchLabels": {"app": "chat"}}


def test_gateway_podmonitor_selects_the_gateway_pods(render: Render) -> None:
    r = render(CHART, PRODUCTION)
    assert r.one("PodMonitor")["spec"]["selector"]["matchLabels"] == r.one("Deployment")["spec"]["selector"][
        "matchLabels"]
    assert "prometheus.io/scrape" not in r.one("Deployment")["spec"]["template"]["metadata"]["annotations"]


# ---- release-scoped names -----------------------------------------------------------------------

def _dashboard(r: Any) -> tuple[str, dict[str, Any]]:
    (key, text), = r.one("ConfigMap", "-dashboard")["data"].items()
    return key, json.loads(text)


def test_each_release_gets_its_own_dashboard(render: Render) -> None:
    (key_a, a), (key_b, b) = (_dashboard(render(CHART, PRODUCTION, release=rel)) for rel in ("chat", "search"))
    assert a["uid"] != b["uid"] and a["title"] != b["title"] and key_a != key_b
    for dash in (a, b):
        assert re.fullmatch(r"[A-Za-z0-9_-]{1,40}", dash["uid"]), dash["uid"]  # Grafana's uid limit
    assert a["title"].endswith("(ai/chat)") and key_a == "ai-chat-openai-resilience-proxy.json"
    assert {k: v for k, v in a.items() if k not in ("uid", "title")} == {
        k: v for k, v in b.items() if k not in ("uid", "title")}
    long = _dashboard(render(CHART, PRODUCTION, release="x" * 50))[1]["uid"]
    assert len(long) == 40


def test_two_releases_rule_groups_load_together(render: Render, promtool: str, tmp_path: Path) -> None:
    """The operator and the rulers (Thanos, Mimir) want unique group names; promtool refuses a
    file with one name twice. Two releases' groups in one file pass."""
    groups = [g for rel in ("chat", "search")
              for g in render(CHART, PRODUCTION, release=rel).one("PrometheusRule")["spec"]["groups"]]
    assert [g["name"] for g in groups] == ["ai.chat-openai-resilience-proxy", "ai.search-openai-resilience-proxy"]
    path = tmp_path / "rules.yaml"
    path.write_text(yaml.safe_dump({"groups": groups}))
    proc = run([promtool, "check", "rules", str(path)])  # exits 1 on a repeated group name
    assert "repeated" not in proc.stdout + proc.stderr



# ---- config reload instead of a roll (issue 17, item 3) -----------------------------------------

def _config_and_checksum(r: Any) -> tuple[dict[str, Any], str]:
    config = yaml.safe_load(r.one("ConfigMap", PROXY)["data"]["config.yaml"])
    return config, r.one("Deployment")["spec"]["template"]["metadata"]["annotations"][f"checksum/{PROXY}-config"]


def test_sidecar_mode_reloads_the_config_instead_of_restarting_the_application(render: Render,
                                                                                example_chart: Path) -> None:
    """auto: a sidecar watches its ConfigMap, so a route or upstream change reaches it without
    restarting the application's pod; a change it cannot apply in place (a listener, the log setup)
    still changes the pod's checksum and rolls it."""
    def sidecar(config: dict[str, Any]) -> tuple[dict[str, Any], str]:
        return _config_and_checksum(render(example_chart, {PROXY: {"config": config}}))

    base, checksum = sidecar({})
    assert base["reload"] == {"watch": True}
    routes = [{"name": "chat", "methods": ["POST"], "path": "/v1/chat/completions", "retry": {"max_attempts": 5}}]
    changed, same = sidecar({"routes": routes, "upstream": {"url": "https://eu.api.openai.com"}})
    assert changed["routes"] == routes and same == checksum
    assert sidecar({"log": {"level": "debug"}})[1] != checksum
    assert sidecar({"shutdown_grace": "45s"})[1] != checksum
    assert sidecar({"reload": {"interval": "30s"}})[0]["reload"] == {"watch": True, "interval": "30s"}


def test_gateway_mode_rolls_on_any_change_unless_reload_is_asked_for(render: Render) -> None:
    routes = [{"name": "chat", "path": "/v1/chat/completions"}]
    base, checksum = _config_and_checksum(render(CHART))
    assert "reload" not in base
    assert _config_and_checksum(render(CHART, {"config": {"routes": routes}}))[1] != checksum
    on, on_checksum = _config_and_checksum(render(CHART, {"configReload": True}))
    assert on["reload"] == {"watch": True}
    assert _config_and_checksum(render(CHART, {"configReload": True, "config": {"routes": routes}}))[1] == on_checksum
    off, _ = _config_and_checksum(render(CHART, {"mode": "gateway", "configReload": False}))
    assert "reload" not in off


def test_a_bad_config_reload_value_is_named(render_error: Any) -> None:
    assert "configReload" in render_error(CHART, {"configReload": "yes"})
