"""Alerts and the dashboard: the PrometheusRule and the Grafana dashboard the chart ships.

Metric and label names are checked against the proxy's own registry (proxy.metrics), the PromQL
is parsed by promtool, and the alerts are driven through `promtool test rules` with synthetic
series: each fires on its failure, and stays silent on healthy traffic and on the callers' own
errors. The README's alert block is compared with the rules the chart renders.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from proxy.classify import Category
from proxy.metrics import FAMILIES

from .conftest import ALL_OPTIONAL, CHART, ROOT, Render, run

DASHBOARD = CHART / "dashboards" / "openai-resilience-proxy.json"
README = ROOT / "README.md"
ALERTS = {"OpenAIProxyErrorRateHigh", "OpenAIProxyBreakerOpen", "OpenAIProxyQuotaExceeded"}
METRIC_RE = re.compile(r"\b(openai_proxy_[a-z_]+)")
BY_RE = re.compile(r"\b(?:by|on) \(([^)]*)\)")
MATCHERS_RE = re.compile(r"\b(openai_proxy_[a-z_]+)\{([^}]*)\}")
# Labels Prometheus adds to every scraped series (the target's), not the proxy.
TARGET_LABELS = {"namespace", "job", "instance", "pod"}
CALLERS_OWN = {"client", "authentication"}


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
    """The metric names an expression uses; each must exist, and each label it groups by, joins
    on or matches on too."""
    used = set(METRIC_RE.findall(expr))
    assert used, f"no openai_proxy_ metric in {expr!r}"
    unknown = used - set(METRICS)
    assert not unknown, f"{expr!r} uses metrics the proxy does not expose: {unknown}"
    known_labels = set().union(*(METRICS[m] for m in used))
    for group in BY_RE.findall(expr):
        labels = {label.strip() for label in group.split(",")} - TARGET_LABELS
        assert labels <= known_labels, f"{expr!r} groups by labels the metrics lack: {labels - known_labels}"
    for metric, matchers in MATCHERS_RE.findall(expr):
        names = {re.split(r"[=!]", m.strip())[0] for m in matchers.split(",") if m.strip()} - TARGET_LABELS
        assert names <= METRICS[metric], f"{expr!r} matches {metric} on labels it lacks: {names - METRICS[metric]}"
    return used


def one_line(expr: str) -> str:
    return " ".join(expr.split())


@pytest.fixture(scope="module")
def rule(render: Render) -> dict[str, Any]:
    return render(CHART, ALL_OPTIONAL).one("PrometheusRule")


@pytest.fixture(scope="module")
def rules(rule: dict[str, Any]) -> dict[str, dict[str, Any]]:
    (group,) = rule["spec"]["groups"]
    return {r["alert"]: r for r in group["rules"]}


def test_metric_families_are_the_documented_ones() -> None:
    assert {m for m in METRICS if m.startswith("openai_proxy_") and not m.endswith(("_sum", "_count"))} == {
        "openai_proxy_requests_total", "openai_proxy_errors_total", "openai_proxy_attempts_total",
        "openai_proxy_retries_total", "openai_proxy_retry_stops_total", "openai_proxy_breaker_state",
        "openai_proxy_breaker_transitions_total", "openai_proxy_retry_successes_total",
        "openai_proxy_request_duration_seconds_bucket", "openai_proxy_in_flight_requests",
        "openai_proxy_ratelimit_remaining_requests", "openai_proxy_ratelimit_remaining_tokens",
        "openai_proxy_build_info", "openai_proxy_stream_resumes_total",
    }
    assert "outcome" in METRICS["openai_proxy_request_duration_seconds_bucket"]
    assert "to" in METRICS["openai_proxy_breaker_transitions_total"]


# ---- PrometheusRule -----------------------------------------------------------------------------

def test_prometheus_rule_shape(rule: dict[str, Any], rules: dict[str, dict[str, Any]]) -> None:
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    assert rule["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert set(rules) == ALERTS
    for r in rules.values():
        check_names(r["expr"])
        assert r["labels"]["severity"] and r["annotations"]["summary"] and r["annotations"]["description"]
        # every alert names the namespace, job and route it is about
        assert set(re.findall(r"\bby \(([^)]*)\)", r["expr"])) == {"namespace, job, route"}, r["expr"]
    error_rate = one_line(rules["OpenAIProxyErrorRateHigh"]["expr"])
    assert error_rate == (
        '( sum by (namespace, job, route) (rate(openai_proxy_errors_total{category!~"client|authentication"}[5m])) '
        "/ sum by (namespace, job, route) (rate(openai_proxy_requests_total[5m])) ) > 0.05 "
        "and sum by (namespace, job, route) (increase(openai_proxy_requests_total[5m])) >= 10")
    assert rules["OpenAIProxyErrorRateHigh"]["for"] == "10m"
    assert rules["OpenAIProxyErrorRateHigh"]["labels"]["severity"] == "warning"
    breaker = one_line(rules["OpenAIProxyBreakerOpen"]["expr"])
    assert breaker == (
        "max by (namespace, job, route) (max_over_time(openai_proxy_breaker_state[2m])) >= 1 or "
        'sum by (namespace, job, route) (increase(openai_proxy_breaker_transitions_total{to="open"}[2m])) > 0')
    assert rules["OpenAIProxyBreakerOpen"]["for"] == "5m"
    assert 'category="quota_exceeded"' in rules["OpenAIProxyQuotaExceeded"]["expr"]
    assert "for" not in rules["OpenAIProxyQuotaExceeded"]
    assert rules["OpenAIProxyQuotaExceeded"]["labels"]["severity"] == "critical"


def test_excluded_categories_are_the_proxys_own(rules: dict[str, dict[str, Any]]) -> None:
    """The error-rate filter names real categories (a typo would silently count everything)."""
    (excluded,) = re.findall(r'category!~"([^"]*)"', rules["OpenAIProxyErrorRateHigh"]["expr"])
    assert set(excluded.split("|")) == CALLERS_OWN <= {c.value for c in Category}


def test_prometheus_rule_values_and_selector(render: Render) -> None:
    values = {"prometheusRule": {"enabled": True, "selector": 'namespace="chat"', "groupBy": ["cluster", "route"],
                                 "errorRate": {"threshold": 0.2, "for": "3m", "minRequests": 0,
                                               "excludeCategories": ["client", "authentication", "quota_exceeded"]},
                                 "breakerOpen": {"minutes": 15, "window": "90s"},
                                 "quotaExceeded": {"enabled": False}}}
    (group,) = render(CHART, values).one("PrometheusRule")["spec"]["groups"]
    rules = {r["alert"]: r for r in group["rules"]}
    assert set(rules) == ALERTS - {"OpenAIProxyQuotaExceeded"}
    error_rate = rules["OpenAIProxyErrorRateHigh"]["expr"]
    assert error_rate.rstrip().endswith("> 0.2") and "increase" not in error_rate  # minRequests 0: no guard
    assert 'category!~"client|authentication|quota_exceeded"' in error_rate
    assert rules["OpenAIProxyErrorRateHigh"]["for"] == "3m"
    assert rules["OpenAIProxyBreakerOpen"]["for"] == "15m"
    assert "[90s]" in rules["OpenAIProxyBreakerOpen"]["expr"]
    for r in rules.values():
        assert set(re.findall(r"\bby \(([^)]*)\)", r["expr"])) == {"cluster, route"}, r["expr"]
        for metric, selector in re.findall(r"(openai_proxy_[a-z_]+)(\{[^}]*\})?", r["expr"]):
            assert selector.endswith(',namespace="chat"}') or selector == '{namespace="chat"}', (metric, r["expr"])


@pytest.mark.parametrize("breaker,message", [({"minutes": 2, "window": "2m"}, "must be shorter than"),
                                             ({"window": "1h"}, "window")])
def test_breaker_window_must_fit_the_for(render_error: Callable[..., str], breaker: dict[str, Any],
                                        message: str) -> None:
    """A window as long as `for` would let one short opening page by itself."""
    err = render_error(CHART, {"prometheusRule": {"enabled": True, "breakerOpen": breaker}})
    assert message in err


def test_prometheus_rule_values_are_schema_checked(render_error: Callable[..., str]) -> None:
    err = render_error(CHART, {"prometheusRule": {"enabled": True, "errorRate": {"excludeCategories": ["clients"]}}})
    assert "excludeCategories" in err


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


# ---- the README shows the rules the chart ships -------------------------------------------------

README_BLOCK_RE = re.compile(r"alerts the Helm chart ships.*?\n```yaml\n(.*?)\n```", re.S)


def readme_rules_block() -> str:
    found = README_BLOCK_RE.findall(README.read_text())
    assert len(found) == 1, "README.md: expected one ```yaml block after '... alerts the Helm chart ships'"
    return found[0]  # type: ignore[no-any-return]


def shipped_rules(rules: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """The default rules as the README shows them: everything but the annotations."""
    return [{k: v for k, v in r.items() if k != "annotations"} for r in rules.values()]


class _BlockDumper(yaml.SafeDumper):
    """Multi-line strings as `|` blocks, as a person would write them in the README."""


_BlockDumper.add_representer(str, lambda dumper, text: dumper.represent_scalar(
    "tag:yaml.org,2002:str", text, style="|" if "\n" in text else None))


def test_readme_shows_the_rules_the_chart_ships(rules: dict[str, dict[str, Any]]) -> None:
    """A drifted README fails here; the message carries the block to paste."""
    expected = shipped_rules(rules)
    paste = yaml.dump(expected, Dumper=_BlockDumper, sort_keys=False, width=200, default_flow_style=False)
    assert yaml.safe_load(readme_rules_block()) == expected, (
        "README.md's alert block differs from the chart's rendered PrometheusRule; the chart renders:\n" + paste)


def _series(name: str, values: str, **labels: str) -> dict[str, str]:
    return {"series": name + "{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}", "values": values}


def req(route: str, status_class: str, values: str, ns: str = "ai", job: str = "p") -> dict[str, str]:
    return _series("openai_proxy_requests_total", values, namespace=ns, job=job, route=route, status_class=status_class)


def err(route: str, category: str, values: str, ns: str = "ai", job: str = "p") -> dict[str, str]:
    return _series("openai_proxy_errors_total", values, namespace=ns, job=job, route=route, category=category)


def state(route: str, values: str, ns: str = "ai", job: str = "p") -> dict[str, str]:
    return _series("openai_proxy_breaker_state", values, namespace=ns, job=job, route=route)


def moved(route: str, to: str, values: str, ns: str = "ai", job: str = "p") -> dict[str, str]:
    return _series("openai_proxy_breaker_transitions_total", values, namespace=ns, job=job, route=route, to=to)


def fired(route: str, severity: str = "warning", ns: str = "ai", job: str = "p") -> dict[str, dict[str, str]]:
    """An alert promtool must see firing: its labels, exactly."""
    return {"exp_labels": {"severity": severity, "namespace": ns, "job": job, "route": route}}


ALERT_TESTS = {
    "evaluation_interval": "1m",
    "tests": [
        {   # 10 % server errors: pending for 10 minutes, then firing; 1 % rate limits elsewhere stay under 5 %
            "interval": "1m",
            "input_series": [
                req("chat_completions", "2xx", "0+90x40"),
                req("chat_completions", "5xx", "0+10x40"),
                err("chat_completions", "server", "0+9x40"),
                err("chat_completions", "circuit_open", "0+1x40"),
                req("embeddings", "2xx", "0+99x40"),
                req("embeddings", "4xx", "0+1x40"),
                err("embeddings", "rate_limit", "0+1x40"),
            ],
            "alert_rule_test": [
                {"eval_time": "8m", "alertname": "OpenAIProxyErrorRateHigh", "exp_alerts": []},
                {"eval_time": "25m", "alertname": "OpenAIProxyErrorRateHigh",
                 "exp_alerts": [fired("chat_completions")]},
            ],
        },
        {   # the callers' own 400s and 401s at 15 % page nobody; the same 15 % as upstream 5xx does
            "interval": "1m",
            "input_series": [
                req("chat_completions", "2xx", "0+85x40"),
                req("chat_completions", "4xx", "0+15x40"),
                err("chat_completions", "client", "0+10x40"),
                err("chat_completions", "authentication", "0+5x40"),
                err("chat_completions", "server", "0x40"),
                req("embeddings", "2xx", "0+85x40"),
                req("embeddings", "5xx", "0+15x40"),
                err("embeddings", "server", "0+15x40"),
            ],
            "alert_rule_test": [
                {"eval_time": "30m", "alertname": "OpenAIProxyErrorRateHigh",
                 "exp_alerts": [fired("embeddings")]},
            ],
        },
        {   # one namespace failing 100 % beside a healthy one with 50x its traffic (1.96 % overall)
            "interval": "1m",
            "input_series": [
                req("chat_completions", "5xx", "0+4x40", ns="team-a", job="proxy"),
                err("chat_completions", "connect", "0+4x40", ns="team-a", job="proxy"),
                req("chat_completions", "2xx", "0+199x40", ns="team-b", job="proxy"),
                req("chat_completions", "5xx", "0+1x40", ns="team-b", job="proxy"),
                err("chat_completions", "connect", "0+1x40", ns="team-b", job="proxy"),
            ],
            "alert_rule_test": [
                {"eval_time": "30m", "alertname": "OpenAIProxyErrorRateHigh",
                 "exp_alerts": [fired("chat_completions", ns="team-a", job="proxy")]},
            ],
        },
        {   # 7 % failures spread over four categories, each under 5 %: the route's failures add up
            "interval": "1m",
            "input_series": [
                req("responses", "2xx", "0+186x40"),
                req("responses", "5xx", "0+8x40"),
                req("responses", "4xx", "0+3x40"),
                req("responses", "aborted", "0+3x40"),
                err("responses", "server", "0+4x40"),
                err("responses", "timeout", "0+4x40"),
                err("responses", "rate_limit", "0+3x40"),
                err("responses", "network", "0+3x40"),
            ],
            "alert_rule_test": [
                {"eval_time": "8m", "alertname": "OpenAIProxyErrorRateHigh", "exp_alerts": []},
                {"eval_time": "25m", "alertname": "OpenAIProxyErrorRateHigh",
                 "exp_alerts": [fired("responses")]},
            ],
        },
        {   # the minimum-traffic guard: a route with 1 request in 5 minutes, failing, pages nobody
            "interval": "1m",
            "input_series": [
                req("images", "5xx", "0+0.2x40"),
                err("images", "server", "0+0.2x40"),
            ],
            "alert_rule_test": [{"eval_time": "30m", "alertname": "OpenAIProxyErrorRateHigh", "exp_alerts": []}],
        },
        {   # a breaker open (with a half-open probe in between) for good, in one namespace only;
            # the same route elsewhere opens once and closes again
            "interval": "1m",
            "input_series": [
                state("chat_completions", "0x4 2x3 1 2x20", ns="team-a", job="proxy"),
                state("chat_completions", "0x4 2x3 0x20", ns="team-b", job="proxy"),
                state("images", "0x28", ns="team-b", job="proxy"),
            ],
            "alert_rule_test": [
                {"eval_time": "8m", "alertname": "OpenAIProxyBreakerOpen", "exp_alerts": []},
                {"eval_time": "15m", "alertname": "OpenAIProxyBreakerOpen",
                 "exp_alerts": [fired("chat_completions", ns="team-a", job="proxy")]},
            ],
        },
        {   # a breaker flapping open -> half-open -> closed between scrapes from minute 4: every
            # scrape reads closed (0), only the transitions counter sees it, and after 5 minutes of
            # it the alert fires; a lone opening (embeddings, minute 4) never does
            "interval": "1m",
            "input_series": [
                state("chat_completions", "0x30"),
                moved("chat_completions", "open", "0x3 1+1x27"),
                moved("chat_completions", "half_open", "0x3 1+1x27"),
                moved("chat_completions", "closed", "0x3 1+1x27"),
                state("embeddings", "0x30"),
                moved("embeddings", "open", "0x3 1x27"),
                moved("embeddings", "closed", "0x3 1x27"),
            ],
            "alert_rule_test": [
                {"eval_time": "6m", "alertname": "OpenAIProxyBreakerOpen", "exp_alerts": []},
                {"eval_time": "9m", "alertname": "OpenAIProxyBreakerOpen",
                 "exp_alerts": [fired("chat_completions")]},
                {"eval_time": "20m", "alertname": "OpenAIProxyBreakerOpen",
                 "exp_alerts": [fired("chat_completions")]},
            ],
        },
        {   # one insufficient_quota 429: critical at once, gone when the 5-minute window has passed
            "interval": "1m",
            "input_series": [
                err("responses", "quota_exceeded", "0x10 1x20"),
                err("responses", "server", "0+1x30"),
            ],
            "alert_rule_test": [
                {"eval_time": "5m", "alertname": "OpenAIProxyQuotaExceeded", "exp_alerts": []},
                {"eval_time": "12m", "alertname": "OpenAIProxyQuotaExceeded",
                 "exp_alerts": [fired("responses", severity="critical")]},
                {"eval_time": "25m", "alertname": "OpenAIProxyQuotaExceeded", "exp_alerts": []},
            ],
        },
        {   # healthy traffic (1 % server errors, callers' 4xx, closed breakers): nothing fires
            "interval": "1m",
            "input_series": [
                req("chat_completions", "2xx", "0+97x40"),
                req("chat_completions", "4xx", "0+2x40"),
                req("chat_completions", "5xx", "0+1x40"),
                err("chat_completions", "server", "0+1x40"),
                err("chat_completions", "client", "0+2x40"),
                err("chat_completions", "quota_exceeded", "0x40"),
                state("chat_completions", "0x40"),
                moved("chat_completions", "open", "0x40"),
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
    """Why the README's by-category query says `ignoring(category) group_left`: the plain division
    matches nothing."""
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

VARS_RE = re.compile(r'namespace=~"\$namespace", route=~"\$route"(, )?')


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())  # type: ignore[no-any-return]


def dashboard_exprs(dash: dict[str, Any]) -> dict[str, list[str]]:
    return {p["title"]: [t["expr"] for t in p.get("targets", [])] for p in dash["panels"] if p["type"] != "row"}


def grafana_to_promql(expr: str) -> str:
    """A panel query with Grafana's variables filled in, as Prometheus would receive it."""
    return (expr.replace("$__rate_interval", "5m").replace('"$namespace"', '".*"')
            .replace('"$route"', '".*"'))


def without_variables(expr: str) -> str:
    """A panel query with its namespace/route filter taken out, on one line: comparable with a rule."""
    return one_line(VARS_RE.sub("", expr).replace("{}", "").replace("$__rate_interval", "5m"))


def test_dashboard_configmap_ships_the_json(render: Render) -> None:
    cm = render(CHART, {"dashboard": {"enabled": True, "namespace": "monitoring"}}).one("ConfigMap", "-dashboard")
    assert cm["metadata"]["namespace"] == "monitoring"
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    (key,) = cm["data"]
    shipped, source = json.loads(cm["data"][key]), json.loads(DASHBOARD.read_text())
    # uid, title and file name are the release's (test_chart_ops); the rest is the file as is
    assert {k: v for k, v in shipped.items() if k not in ("uid", "title")} == {
        k: v for k, v in source.items() if k not in ("uid", "title")}


def test_dashboard_panels_cover_the_issue() -> None:
    dash = dashboard()
    assert dash["uid"] == "openai-resilience-proxy" and dash["title"]
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    for p in dash["panels"]:
        g = p["gridPos"]
        assert g["x"] + g["w"] <= 24 and g["h"] > 0
    variables = {v["name"] for v in dash["templating"]["list"]}
    assert {"datasource", "namespace", "route"} <= variables
    exprs = dashboard_exprs(dash)
    flat = {title: " ".join(one_line(e) for e in es) for title, es in exprs.items()}

    def panel_with(*needles: str) -> str:
        found = [t for t, e in flat.items() if all(n in e for n in needles)]
        assert found, f"no panel queries {needles}"
        return found[0]

    panel_with("sum by (category) (rate(openai_proxy_errors_total", "ignoring(category) group_left",
               "sum(rate(openai_proxy_requests_total")                           # error rate by category
    panel_with("sum by (category) (rate(openai_proxy_retries_total")          # retries
    panel_with("sum by (reason) (rate(openai_proxy_retry_stops_total")        # stop reasons
    panel_with("sum by (route) (rate(openai_proxy_retry_successes_total")     # retries that saved a request
    panel_with("max by (route) (openai_proxy_breaker_state")                   # breaker state
    panel_with("sum by (route, to) (increase(openai_proxy_breaker_transitions_total")  # breaker transitions
    for q in ("0.5", "0.9", "0.99"):                                          # latency of successes
        panel_with(f"histogram_quantile({q}, sum by (le) (rate(openai_proxy_request_duration_seconds_bucket",
                   'outcome="ok"')
    panel_with("histogram_quantile(0.99, sum by (route, le) (rate(openai_proxy_request_duration_seconds_bucket",
               'outcome="ok"')
    panel_with("histogram_quantile(0.99, sum by (le) (rate(openai_proxy_request_duration_seconds_bucket",
               'outcome="error"')                                             # latency of failures, apart
    panel_with("openai_proxy_ratelimit_remaining_requests")                   # rate-limit headroom
    panel_with("openai_proxy_ratelimit_remaining_tokens")
    panel_with("count by (version) (openai_proxy_build_info")                  # versions running
    panel_with("process_cpu_seconds_total", "and on (namespace, job, instance) openai_proxy_build_info")
    panel_with("process_resident_memory_bytes", "and on (namespace, job, instance) openai_proxy_build_info")
    # no latency query mixes failures in: fast 503s must not make an outage look fast
    for title, es in exprs.items():
        for e in es:
            if "openai_proxy_request_duration_seconds" in e:
                assert re.search(r'outcome="(ok|error)"', e), f"{title}: {e} mixes successes and failures"
    (timeline,) = [p for p in dash["panels"] if p["type"] == "state-timeline"]
    assert "openai_proxy_breaker_state" in timeline["targets"][0]["expr"]
    mappings = timeline["fieldConfig"]["defaults"]["mappings"]
    texts = {k: v["text"] for k, v in mappings[0]["options"].items()}
    assert texts == {"0": "closed", "1": "half-open", "2": "open"}
    used = set().union(*(check_names(e) for es in exprs.values() for e in es))
    assert {m for m in METRICS if m.startswith("openai_proxy_") and not m.endswith(("_sum", "_count"))} <= used


def test_dashboard_agrees_with_the_alerts(rules: dict[str, dict[str, Any]]) -> None:
    """The open-breakers stat counts the breaker alert's condition, the failed-share panels count
    what the error-rate alert counts (with the chart's default values)."""
    exprs = dashboard_exprs(dashboard())
    (stat,) = exprs["Open breakers"]
    assert without_variables(stat) == f"count( {one_line(rules['OpenAIProxyBreakerOpen']['expr'])} ) or vector(0)"
    ratio = re.fullmatch(r"\( (.*) \) > [0-9.]+ and .*", one_line(rules["OpenAIProxyErrorRateHigh"]["expr"]))
    assert ratio
    (by_route,) = exprs["Failed share by route"]
    assert without_variables(by_route) == ratio.group(1)
    (overall,) = exprs["Failed requests"]
    assert without_variables(overall) == re.sub(r"sum by \([^)]*\) ", "sum", ratio.group(1))


def test_dashboard_queries_parse(promtool: str, tmp_path: Path) -> None:
    """Each panel query (variables filled in) as a recording rule: promtool parses every one."""
    exprs = [grafana_to_promql(e) for es in dashboard_exprs(dashboard()).values() for e in es]
    rules = [{"record": f"dashboard:query_{i}", "expr": e} for i, e in enumerate(exprs)]
    path = tmp_path / "dashboard-rules.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    out = run([promtool, "check", "rules", str(path)]).stdout
    assert f"SUCCESS: {len(rules)} rules found" in out


def test_dashboard_latency_is_not_flattered_by_fast_failures(promtool: str, tmp_path: Path) -> None:
    """The issue's outage: 100 fast 503s a minute (under 25 ms) and one slow success every two
    minutes (1-2.5 s). Over every request p99 reads 25 ms; the dashboard's p99 of successes reads
    the success's duration, and its failure panel the 503s'."""
    exprs = dashboard_exprs(dashboard())
    ok_p99 = grafana_to_promql(exprs["Successful request duration"][2])
    error_p99 = grafana_to_promql(exprs["Failed request duration"][1])
    assert "0.99" in ok_p99 and "0.99" in error_p99
    mixed = ok_p99.replace(', outcome="ok"', "")
    buckets = {"0.005": (0, 0), "0.025": (100, 0), "0.1": (100, 0), "1": (100, 0), "2.5": (100, 0.5),
               "+Inf": (100, 0.5)}  # le -> (errors, successes) per minute, cumulative
    series = []
    for le, (errors, oks) in buckets.items():
        for outcome, per_minute in (("error", errors), ("ok", oks)):
            series.append({"series": f'openai_proxy_request_duration_seconds_bucket{{namespace="ai",job="p",'
                                     f'route="chat_completions",outcome="{outcome}",le="{le}"}}',
                           "values": f"0+{per_minute}x30"})
    (tmp_path / "empty.yaml").write_text("groups: []\n")
    tests = {"rule_files": ["empty.yaml"], "evaluation_interval": "1m", "tests": [{
        "interval": "1m", "input_series": series,
        "promql_expr_test": [
            {"expr": f"({mixed}) < bool 0.025", "eval_time": "20m", "exp_samples": [{"labels": "{}", "value": 1}]},
            {"expr": f"({ok_p99}) > bool 1", "eval_time": "20m", "exp_samples": [{"labels": "{}", "value": 1}]},
            {"expr": f"({error_p99}) < bool 0.025", "eval_time": "20m", "exp_samples": [{"labels": "{}", "value": 1}]},
        ]}]}
    (tmp_path / "t.yaml").write_text(yaml.safe_dump(tests))
    proc = run([promtool, "test", "rules", "t.yaml"], check=False, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
