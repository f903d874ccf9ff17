"""Alerts and the dashboard: the PrometheusRule and the Grafana dashboard the chart ships.

Metric and label names are checked against the proxy's own registry (proxy.metrics), the PromQL
is parsed by promtool, and the alerts are driven through `promtool test rules` with synthetic
series: each fires on its failure, and stays silent on healthy traffic.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from proxy.metrics import FAMILIES

from .conftest import ALL_OPTIONAL, CHART, Render, run

DASHBOARD = CHART / "dashboards" / "openai-resilience-proxy.json"
ALERTS = {"OpenAIProxyErrorRateHigh", "OpenAIProxyBreakerOpen", "OpenAIProxyQuotaExceeded"}
METRIC_RE = re.compile(r"\b(openai_proxy_[a-z_]+)")
BY_RE = re.compile(r"\bby \(([^)]*)\)")


def proxy_metrics() -> dict[str, set[str]]:
    """Every series name the proxy exposes -> its label names, from the proxy's own registry."""
    names: dict[str, set[str]] = {}
    for fam in FAMILIES:
        labels, kind, base = set(fam.labels), fam.kind, fam.name
        if kind == "counter":
            names[base] = labels
        elif kind == "histogram":
            for suffix in ("_bucket", "_sum", "_count"):
                names[base + suffix] = labels | ({"le"} if suffix == "_bucket" else set())
        else:
            names[base] = labels
    return names


METRICS = proxy_metrics()


def check_names(expr: str) -> set[str]:
    """The metric names an expression uses; each must exist, and each `by (...)` label too."""
    used = set(METRIC_RE.findall(expr))
    assert used, f"no openai_proxy_ metric in {expr!r}"
    unknown = used - set(METRICS)
    assert not unknown, f"{expr!r} uses metrics the proxy does not expose: {unknown}"
    known_labels = set().union(*(METRICS[m] for m in used))
    for group in BY_RE.findall(expr):
        labels = {label.strip() for label in group.split(",")} - {"namespace"}
        assert labels <= known_labels, f"{expr!r} groups by labels the metrics lack: {labels - known_labels}"
    return used


@pytest.fixture(scope="module")
def rule(render: Render) -> dict[str, Any]:
    return render(CHART, ALL_OPTIONAL).one("PrometheusRule")


def test_metric_families_are_the_documented_ones() -> None:
    assert {m for m in METRICS if not m.endswith(("_sum", "_count"))} == {
        "openai_proxy_requests_total", "openai_proxy_errors_total", "openai_proxy_attempts_total",
        "openai_proxy_retries_total", "openai_proxy_retry_stops_total", "openai_proxy_breaker_state",
        "openai_proxy_request_duration_seconds_bucket", "openai_proxy_in_flight_requests",
        "openai_proxy_ratelimit_remaining_requests", "openai_proxy_ratelimit_remaining_tokens",
    }


# ---- PrometheusRule -----------------------------------------------------------------------------

def test_prometheus_rule_shape(rule: dict[str, Any]) -> None:
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    assert rule["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    (group,) = rule["spec"]["groups"]
    rules = {r["alert"]: r for r in group["rules"]}
    assert set(rules) == ALERTS
    for r in rules.values():
        check_names(r["expr"])
        assert r["labels"]["severity"] and r["annotations"]["summary"] and r["annotations"]["description"]
    error_rate = " ".join(rules["OpenAIProxyErrorRateHigh"]["expr"].split())
    assert ("sum by (category) (rate(openai_proxy_errors_total[5m])) / ignoring(category) group_left "
            "sum(rate(openai_proxy_requests_total[5m]))") in error_rate
    assert error_rate.endswith("> 0.05") and rules["OpenAIProxyErrorRateHigh"]["for"] == "10m"
    assert rules["OpenAIProxyBreakerOpen"]["for"] == "5m"
    assert 'category="quota_exceeded"' in rules["OpenAIProxyQuotaExceeded"]["expr"]
    assert rules["OpenAIProxyQuotaExceeded"]["labels"]["severity"] == "critical"


def test_prometheus_rule_values_and_selector(render: Render) -> None:
    values = {"prometheusRule": {"enabled": True, "selector": 'namespace="chat"',
                                 "errorRate": {"threshold": 0.2, "for": "3m"}, "breakerOpen": {"minutes": 15},
                                 "quotaExceeded": {"enabled": False}}}
    (group,) = render(CHART, values).one("PrometheusRule")["spec"]["groups"]
    rules = {r["alert"]: r for r in group["rules"]}
    assert set(rules) == ALERTS - {"OpenAIProxyQuotaExceeded"}
    assert rules["OpenAIProxyErrorRateHigh"]["expr"].rstrip().endswith("> 0.2")
    assert rules["OpenAIProxyErrorRateHigh"]["for"] == "3m"
    assert rules["OpenAIProxyBreakerOpen"]["for"] == "15m"
    for r in rules.values():
        for selector in re.findall(r"openai_proxy_[a-z_]+(\{[^}]*\})?", r["expr"]):
            assert selector == '{namespace="chat"}', r["expr"]


def _rules_file(rule: dict[str, Any], tmp_path: Path) -> Path:
    """The PrometheusRule's groups as a plain Prometheus rules file (annotations dropped, so
    promtool's expected alerts need list labels only)."""
    groups = json.loads(json.dumps(rule["spec"]["groups"]))
    for g in groups:
        for r in g["rules"]:
            r.pop("annotations", None)
    path = tmp_path / "rules.yaml"
    path.write_text(yaml.safe_dump({"groups": groups}))
    return path


def test_promtool_accepts_the_rules(rule: dict[str, Any], promtool: str, tmp_path: Path) -> None:
    path = tmp_path / "full-rules.yaml"
    path.write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}))  # annotations and all
    out = run([promtool, "check", "rules", str(path)]).stdout
    assert "SUCCESS: 3 rules found" in out


ALERT_TESTS = {
    "evaluation_interval": "1m",
    "tests": [
        {   # 10 % server errors: pending for 10 minutes, then firing; 1 % rate limits stay under 5 %
            "interval": "1m",
            "input_series": [
                {"series": 'openai_proxy_requests_total{route="chat_completions",status_class="2xx"}', "values": "0+90x40"},
                {"series": 'openai_proxy_requests_total{route="chat_completions",status_class="5xx"}', "values": "0+10x40"},
                {"series": 'openai_proxy_errors_total{route="chat_completions",category="server"}', "values": "0+9x40"},
                {"series": 'openai_proxy_errors_total{route="chat_completions",category="circuit_open"}', "values": "0+1x40"},
                {"series": 'openai_proxy_errors_total{route="embeddings",category="rate_limit"}', "values": "0+1x40"},
                {"series": 'openai_proxy_requests_total{route="embeddings",status_class="2xx"}', "values": "0+0x40"},
            ],
            "alert_rule_test": [
                {"eval_time": "8m", "alertname": "OpenAIProxyErrorRateHigh", "exp_alerts": []},
                {"eval_time": "25m", "alertname": "OpenAIProxyErrorRateHigh",
                 "exp_alerts": [{"exp_labels": {"severity": "warning", "category": "server"}}]},
            ],
        },
        {   # a breaker open (with a half-open probe in between) for good; one that closes again
            "interval": "1m",
            "input_series": [
                {"series": 'openai_proxy_breaker_state{route="chat_completions"}', "values": "0x4 2x3 1 2x20"},
                {"series": 'openai_proxy_breaker_state{route="embeddings"}', "values": "0x4 2x3 0x20"},
                {"series": 'openai_proxy_breaker_state{route="images"}', "values": "0x28"},
            ],
            "alert_rule_test": [
                {"eval_time": "8m", "alertname": "OpenAIProxyBreakerOpen", "exp_alerts": []},
                {"eval_time": "15m", "alertname": "OpenAIProxyBreakerOpen",
                 "exp_alerts": [{"exp_labels": {"severity": "warning", "route": "chat_completions"}}]},
            ],
        },
        {   # one insufficient_quota 429: critical at once, gone when the 5-minute window has passed
            "interval": "1m",
            "input_series": [
                {"series": 'openai_proxy_errors_total{route="responses",category="quota_exceeded"}', "values": "0x10 1x20"},
                {"series": 'openai_proxy_errors_total{route="responses",category="server"}', "values": "0+1x30"},
            ],
            "alert_rule_test": [
                {"eval_time": "5m", "alertname": "OpenAIProxyQuotaExceeded", "exp_alerts": []},
                {"eval_time": "12m", "alertname": "OpenAIProxyQuotaExceeded",
                 "exp_alerts": [{"exp_labels": {"severity": "critical", "route": "responses"}}]},
                {"eval_time": "25m", "alertname": "OpenAIProxyQuotaExceeded", "exp_alerts": []},
            ],
        },
        {   # healthy traffic: nothing fires
            "interval": "1m",
            "input_series": [
                {"series": 'openai_proxy_requests_total{route="chat_completions",status_class="2xx"}', "values": "0+100x40"},
                {"series": 'openai_proxy_errors_total{route="chat_completions",category="server"}', "values": "0+1x40"},
                {"series": 'openai_proxy_errors_total{route="chat_completions",category="quota_exceeded"}', "values": "0x40"},
                {"series": 'openai_proxy_breaker_state{route="chat_completions"}', "values": "0x40"},
            ],
            "alert_rule_test": [{"eval_time": "30m", "alertname": name, "exp_alerts": []} for name in sorted(ALERTS)],
        },
    ],
}


def test_alerts_fire_on_their_failures_and_only_then(rule: dict[str, Any], promtool: str, tmp_path: Path) -> None:
    rules = _rules_file(rule, tmp_path)
    tests = tmp_path / "tests.yaml"
    tests.write_text(yaml.safe_dump({"rule_files": [rules.name], **ALERT_TESTS}))
    proc = run([promtool, "test", "rules", str(tests)], check=False, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_the_issue_error_rate_query_needs_group_left(promtool: str, tmp_path: Path) -> None:
    """Why the rule says `ignoring(category) group_left`: the plain division matches nothing."""
    plain = "sum by (category) (rate(openai_proxy_errors_total[5m])) / sum(rate(openai_proxy_requests_total[5m]))"
    matched = ("sum by (category) (rate(openai_proxy_errors_total[5m])) / ignoring(category) group_left "
               "sum(rate(openai_proxy_requests_total[5m]))")
    (tmp_path / "empty.yaml").write_text("groups: []\n")
    series = [{"series": 'openai_proxy_requests_total{route="r",status_class="2xx"}', "values": "0+100x20"},
              {"series": 'openai_proxy_errors_total{route="r",category="server"}', "values": "0+10x20"}]
    tests = {"rule_files": ["empty.yaml"], "evaluation_interval": "1m", "tests": [{
        "interval": "1m", "input_series": series,
        "promql_expr_test": [
            {"expr": plain, "eval_time": "10m", "exp_samples": []},
            {"expr": f"round({matched}, 0.001)", "eval_time": "10m",
             "exp_samples": [{"labels": '{category="server"}', "value": 0.1}]},
        ]}]}
    (tmp_path / "t.yaml").write_text(yaml.safe_dump(tests))
    proc = run([promtool, "test", "rules", "t.yaml"], check=False, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr


# ---- Grafana dashboard --------------------------------------------------------------------------

def dashboard_exprs(dash: dict[str, Any]) -> dict[str, list[str]]:
    return {p["title"]: [t["expr"] for t in p.get("targets", [])] for p in dash["panels"] if p["type"] != "row"}


def grafana_to_promql(expr: str) -> str:
    """A panel query with Grafana's variables filled in, as Prometheus would receive it."""
    return (expr.replace("$__rate_interval", "5m").replace('"$namespace"', '".*"')
            .replace('"$route"', '".*"'))


def test_dashboard_configmap_ships_the_json(render: Render) -> None:
    cm = render(CHART, {"dashboard": {"enabled": True, "namespace": "monitoring"}}).one("ConfigMap", "-dashboard")
    assert cm["metadata"]["namespace"] == "monitoring"
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(cm["data"]["openai-resilience-proxy.json"]) == json.loads(DASHBOARD.read_text())


def test_dashboard_panels_cover_the_issue() -> None:
    dash = json.loads(DASHBOARD.read_text())
    assert dash["uid"] == "openai-resilience-proxy" and dash["title"]
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    for p in dash["panels"]:
        g = p["gridPos"]
        assert g["x"] + g["w"] <= 24 and g["h"] > 0
    variables = {v["name"] for v in dash["templating"]["list"]}
    assert {"datasource", "route"} <= variables
    exprs = dashboard_exprs(dash)
    flat = {title: " ".join(" ".join(e.split()) for e in es) for title, es in exprs.items()}

    def panel_with(*needles: str) -> str:
        found = [t for t, e in flat.items() if all(n in e for n in needles)]
        assert found, f"no panel queries {needles}"
        return found[0]

    panel_with("sum by (category) (rate(openai_proxy_errors_total", "ignoring(category) group_left",
               "sum(rate(openai_proxy_requests_total")                           # error rate by category
    panel_with("sum by (category) (rate(openai_proxy_retries_total")          # retries
    panel_with("sum by (reason) (rate(openai_proxy_retry_stops_total")        # stop reasons
    panel_with("max by (route) (openai_proxy_breaker_state")                   # breaker state
    for q in ("0.5", "0.9", "0.99"):                                          # latency quantiles
        panel_with(f"histogram_quantile({q}, sum by (le) (rate(openai_proxy_request_duration_seconds_bucket")
    panel_with("openai_proxy_ratelimit_remaining_requests")                   # rate-limit headroom
    panel_with("openai_proxy_ratelimit_remaining_tokens")
    (timeline,) = [p for p in dash["panels"] if p["type"] == "state-timeline"]
    assert "openai_proxy_breaker_state" in timeline["targets"][0]["expr"]
    mappings = timeline["fieldConfig"]["defaults"]["mappings"]
    texts = {k: v["text"] for k, v in mappings[0]["options"].items()}
    assert texts == {"0": "closed", "1": "half-open", "2": "open"}
    used = set().union(*(check_names(e) for es in exprs.values() for e in es))
    assert {m for m in METRICS if not m.endswith(("_sum", "_count"))} <= used


def test_dashboard_queries_parse(promtool: str, tmp_path: Path) -> None:
    """Each panel query (variables filled in) as a recording rule: promtool parses every one."""
    exprs = [grafana_to_promql(e) for es in dashboard_exprs(json.loads(DASHBOARD.read_text())).values() for e in es]
    rules = [{"record": f"dashboard:query_{i}", "expr": e} for i, e in enumerate(exprs)]
    path = tmp_path / "dashboard-rules.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    out = run([promtool, "check", "rules", str(path)]).stdout
    assert f"SUCCESS: {len(rules)} rules found" in out
