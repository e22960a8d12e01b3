"""The Grafana dashboard and the Prometheus alert rules name only metrics jitgate exports.

Every PromQL expression is parsed (promql-parser, the Rust parser behind GreptimeDB, as a
Python module) and each metric it selects is looked up in the exposition a real jitgate
serves at /_jit/metrics, with histogram and counter suffixes. Where promtool is installed
(Debian's `prometheus` package; .ci/run installs it), it also checks the rules and runs
their unit tests (deploy/prometheus/alerts.test.yaml).
Label matchers are checked against the label names jitgate gives that metric.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import promql_parser
import pytest
import yaml
from conftest import ROOT, ProxyFactory
from prometheus_client.parser import text_string_to_metric_families

from proxy.state import STATE

DASHBOARD = ROOT / "deploy" / "grafana" / "jitgate.json"
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yaml"
ALERTS_TESTS = ROOT / "deploy" / "prometheus" / "alerts.test.yaml"

# Suffixes a family of each type is scraped under (prometheus-client, text format 0.0.4).
SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "summary": ("", "_sum", "_count", "_created"),
    "gauge": ("",),
    "info": ("_info",),
    "unknown": ("",),
}
# Labels Prometheus adds to every scraped series (target labels and Kubernetes discovery).
TARGET_LABELS = {"job", "instance", "namespace", "pod", "container", "service", "endpoint"}
# Grafana's interval variables, replaced before parsing; `$var` inside strings is left.
GRAFANA_INTERVAL = re.compile(r"\$__(rate_interval|interval|range)|\$\{__\w+\}")
LABEL_VALUES = re.compile(r"^label_values\((?:(?P<expr>.+),\s*)?(?P<label>\w+)\)$")


@dataclass(frozen=True)
class Exported:
    """What one scrape of /_jit/metrics shows: sample names and the labels seen on each."""

    labels: dict[str, set[str]] = field(default_factory=dict)

    @classmethod
    def parse(cls, text: str) -> Exported:
        labels: dict[str, set[str]] = {}
        for family in text_string_to_metric_families(text):
            for suffix in SUFFIXES[family.type]:
                labels.setdefault(family.name + suffix, set())
            for sample in family.samples:
                labels.setdefault(sample.name, set()).update(sample.labels)
        return cls(labels)


def selectors(expr: str) -> list[tuple[str, set[str]]]:
    """Return (metric name, label names matched) for every selector in a PromQL expression."""
    found: list[tuple[str, set[str]]] = []

    def visit(node: Any) -> None:
        if isinstance(node, promql_parser.VectorSelector):
            matched = {m.name for m in node.matchers.matchers}
            name = node.name or next(
                (m.value for m in node.matchers.matchers if m.name == "__name__"), None
            )
            if name is None:
                raise ValueError(f"a selector without a metric name in {expr!r}")
            found.append((name, matched - {"__name__"}))

    promql_parser.walk(promql_parser.parse(expr), visit)
    return found


def check_expr(expr: str, exported: Exported) -> list[str]:
    """Return the problems of one expression: unknown metrics, labels it never has."""
    problems = []
    for name, labels in selectors(expr):
        if name not in exported.labels:
            problems.append(f"{name}: not a metric jitgate exports")
            continue
        seen = exported.labels[name]
        unknown = labels - seen - TARGET_LABELS
        if unknown:
            problems.append(f"{name}: no label {sorted(unknown)} (it has {sorted(seen)})")
    return problems


def dashboard_exprs(dashboard: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """Yield (where, PromQL) for every panel target and query variable of a dashboard."""

    def panels(items: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for p in items:
            yield p
            yield from panels(p.get("panels", []))

    for p in panels(dashboard["panels"]):
        for t in p.get("targets", []):
            yield f"panel {p['title']!r} {t['refId']}", GRAFANA_INTERVAL.sub("5m", t["expr"])
    for var in dashboard.get("templating", {}).get("list", []):
        if var["type"] != "query":
            continue
        query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
        m = LABEL_VALUES.match(query)
        assert m, f"variable {var['name']}: only label_values(...) queries are checked"
        if m["expr"]:
            yield f"variable {var['name']}", m["expr"]


def alert_exprs(rules: dict[str, Any]) -> Iterator[tuple[str, str]]:
    for group in rules["groups"]:
        for rule in group["rules"]:
            yield f"rule {rule.get('alert') or rule.get('record')}", rule["expr"]


@pytest.fixture
async def exported(make_proxy: ProxyFactory) -> Exported:
    """A real jitgate's exposition, with the label names of families that have no samples yet.

    A labelled family shows no series until its first use (no Redis error has happened
    here); its label names are then read from the metric objects jitgate registered.
    """
    client = await make_proxy()
    assert (await client.get("/api/projects/1/session_recordings/demo-1/snapshots")).status == 401
    text = await (await client.get("/_jit/metrics")).text()
    found = Exported.parse(text)
    for metric in vars(client.app[STATE].metrics).values():
        names = getattr(metric, "_labelnames", None)  # prometheus-client's metric objects
        if names is None:
            continue
        for suffix in SUFFIXES[metric._type]:
            extra = {"le"} if suffix == "_bucket" else set()
            found.labels[metric._name + suffix].update(names, extra)
    return found


def test_every_dashboard_metric_is_exported(exported: Exported) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = list(dashboard_exprs(dashboard))
    assert len(exprs) >= 20
    problems = [f"{where}: {p}" for where, e in exprs for p in check_expr(e, exported)]
    assert problems == []


def test_every_alert_metric_is_exported(exported: Exported) -> None:
    rules = yaml.safe_load(ALERTS.read_text())
    exprs = list(alert_exprs(rules))
    problems = [f"{where}: {p}" for where, e in exprs for p in check_expr(e, exported)]
    assert problems == []
    names = {where for where, _ in exprs}
    for alert in (
        "JitgateRedisUnavailable", "JitgateAuditBacklogGrowing", "JitgateAuditSpoolNearFull",
        "JitgateAuditNotWritable", "JitgatePolicyReloadFailed", "JitgateUnavailableAnswers",
        "JitgateBreakGlassUsed",
    ):  # fmt: skip
        assert f"rule {alert}" in names


def test_the_dashboard_covers_the_operating_questions() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    used = {name for _, e in dashboard_exprs(dashboard) for name, _ in selectors(e)}
    for metric in (
        "jitgate_requests_total", "jitgate_request_duration_seconds_bucket",
        "jitgate_active_grants", "jitgate_audit_backlog", "jitgate_audit_records_delivered_total",
        "jitgate_audit_write_failures_total", "jitgate_audit_records_dropped_total",
        "jitgate_audit_writable", "jitgate_grant_view_current", "jitgate_redis_errors_total",
        "jitgate_policy_reloads_total", "jitgate_notifications_sent_total",
    ):  # fmt: skip
        assert metric in used, metric


def test_histogram_and_counter_suffixes_come_from_the_type() -> None:
    exported = Exported.parse(
        "# HELP h x\n# TYPE h histogram\n# HELP c x\n# TYPE c counter\n# HELP g x\n# TYPE g gauge\n"
    )
    assert set(exported.labels) == {
        "h_bucket", "h_sum", "h_count", "h_created", "c_total", "c_created", "g",
    }  # fmt: skip


@pytest.mark.parametrize(
    ("expr", "problem"),
    [
        ("rate(jitgate_request_total[5m])", "jitgate_request_total: not a metric"),
        ("jitgate_active_grant", "jitgate_active_grant: not a metric"),
        ("jitgate_request_duration_seconds_buckets", "not a metric"),
        ('sum(rate({__name__="jitgate_requests"}[5m]))', "jitgate_requests: not a metric"),
        ('sum by (decision) (rate(jitgate_requests_total{decison="allow"}[5m]))', "no label"),
        ('rate(jitgate_redis_errors_total{operation="ping"}[5m])', "no label"),
        ('jitgate_active_grants{sink="redis"}', "no label"),
        ("histogram_quantile(0.9, rate(jitgate_audit_backlog_bucket[5m]))", "not a metric"),
    ],
)
def test_a_misspelt_metric_or_label_is_caught(exported: Exported, expr: str, problem: str) -> None:
    problems = check_expr(expr, exported)
    assert len(problems) == 1 and problem in problems[0], problems


def test_functions_keywords_strings_and_durations_are_not_metrics(exported: Exported) -> None:
    expr = (
        'sum by (route, le) (rate(jitgate_request_duration_seconds_bucket{route=~"rate|sum"}'
        "[5m] offset 1h)) > bool 0 and on() vector(1) or absent(jitgate_active_grants)"
    )
    assert {n for n, _ in selectors(expr)} == {
        "jitgate_request_duration_seconds_bucket", "jitgate_active_grants",
    }  # fmt: skip
    assert check_expr(expr, exported) == []


def test_an_expression_that_does_not_parse_fails() -> None:
    with pytest.raises(ValueError):
        selectors("sum(rate(jitgate_requests_total[5m])")


def test_grafana_variables_are_substituted_before_parsing() -> None:
    dashboard = {
        "panels": [
            {"title": "t", "targets": [{"refId": "A", "expr": "rate(m[$__rate_interval])"}]}
        ],
        "templating": {"list": [{"name": "v", "type": "query", "query": "label_values(m, job)"}]},
    }
    assert list(dashboard_exprs(dashboard)) == [
        ("panel 't' A", "rate(m[5m])"),
        ("variable v", "m"),
    ]


def test_grafana_dashboard_is_importable_json() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] and dashboard["title"] and dashboard["schemaVersion"] >= 36
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    boxes = [(p["title"], p["gridPos"]) for p in dashboard["panels"]]
    for i, (title, a) in enumerate(boxes):
        assert a["x"] + a["w"] <= 24, title
        for other, b in boxes[i + 1 :]:
            apart = (
                a["x"] + a["w"] <= b["x"] or b["x"] + b["w"] <= a["x"]
                or a["y"] + a["h"] <= b["y"] or b["y"] + b["h"] <= a["y"]
            )  # fmt: skip
            assert apart, f"{title!r} overlaps {other!r}"
    for p in dashboard["panels"]:
        if p["type"] != "row":
            assert p["datasource"]["uid"] == "${datasource}", p["title"]


def test_alert_rules_have_the_fields_prometheus_needs() -> None:
    rules = yaml.safe_load(ALERTS.read_text())
    for group in rules["groups"]:
        assert set(group) <= {"name", "interval", "rules", "limit"}
        for rule in group["rules"]:
            assert set(rule) <= {"alert", "expr", "for", "labels", "annotations"}, rule
            assert rule["labels"]["severity"] in ("critical", "warning")
            assert rule["annotations"]["summary"]
            if "for" in rule:
                assert re.fullmatch(r"\d+[smh]", rule["for"])


def test_spool_alert_threshold_follows_the_kubernetes_config() -> None:
    from proxy.settings.read import parse_size

    config = yaml.safe_load((ROOT / "deploy/kubernetes/base/jitgate.yaml").read_text())
    rules = {
        r["alert"]: r for g in yaml.safe_load(ALERTS.read_text())["groups"] for r in g["rules"]
    }
    max_bytes = parse_size(config["audit"]["spool"]["max_bytes"])
    assert f"0.8 * {max_bytes}" in rules["JitgateAuditSpoolNearFull"]["expr"]


PROMTOOL = shutil.which("promtool")


@pytest.mark.skipif(
    PROMTOOL is None and not os.environ.get("CI"),
    reason="promtool is not installed (Debian: apt-get install prometheus; .ci/run installs it)",
)
def test_promtool_checks_and_unit_tests_the_rules() -> None:
    """Where promtool is installed: its own check, and the rules' unit tests firing on series."""
    assert PROMTOOL is not None, "promtool is missing under CI"
    for args in (["check", "rules", str(ALERTS)], ["test", "rules", str(ALERTS_TESTS)]):
        out = subprocess.run([PROMTOOL, *args], capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stdout + out.stderr
    tested = {
        t["alertname"]
        for case in yaml.safe_load(ALERTS_TESTS.read_text())["tests"]
        for t in case["alert_rule_test"]
    }
    assert {
        "JitgateRedisUnavailable", "JitgateAuditBacklogGrowing", "JitgateAuditSpoolNearFull",
        "JitgateAuditNotWritable", "JitgatePolicyReloadFailed", "JitgateUnavailableAnswers",
        "JitgateBreakGlassUsed",
    } <= tested  # fmt: skip
