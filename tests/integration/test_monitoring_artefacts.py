"""The shipped monitoring artefacts: Prometheus alert rules (and their promtool
unit tests) and the Grafana dashboard.

The rules are checked and unit-tested with promtool (Debian package
``prometheus``; skipped when it is missing). Both artefacts must only use
metric names relayd really exports: the set is built from a live
``Metrics().exposition()``, so renaming a metric without updating the
artefacts fails here.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from relayd.metrics import Metrics
from tests.conftest import need

try:
    import yaml
except ImportError:  # PyYAML is not a dependency; Debian has python3-yaml
    yaml = None

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "etc" / "prometheus" / "relayd-alerts.yml"
RULES_TEST = ROOT / "etc" / "prometheus" / "relayd-alerts.test.yml"
DASHBOARD = ROOT / "etc" / "grafana" / "relayd-dashboard.json"

ALERTS = {
    "RelaydDown",
    "RelaydQueueGrowing",
    "RelaydOldestMessage",
    "RelaydBounceRate",
    "RelaydSmarthostFailing",
    "RelaydAuthFailureSpike",
    "RelaydAuthBackendFailing",
    "RelaydTLSHandshakeFailures",
    "RelaydTLSCertificateExpiring",
    "RelaydSpoolRejecting",
    "RelaydSpoolDiskFilling",
}

# Series Prometheus itself adds to every scrape.
PROMETHEUS_NAMES = {"up"}

# PromQL words that look like metric names but are not.
KEYWORDS = {
    "and", "or", "unless", "by", "without", "on", "ignoring", "group_left",
    "group_right", "bool", "offset", "atan2", "inf", "nan",
}


def exported_names() -> set[str]:
    """Every series name relayd's /metrics can contain.

    Labelled metrics have no samples until a child is used, so the names come
    from the families (``# TYPE`` lines) as well as from the samples, with the
    suffixes prometheus-client and Prometheus give each type.
    """
    text = Metrics().exposition().decode()
    names: set[str] = set()
    for family in text_string_to_metric_families(text):
        names.update(sample.name for sample in family.samples)
        if family.type == "counter":
            names.update({family.name + "_total", family.name + "_created"})
        elif family.type == "histogram":
            names.update(family.name + s for s in ("_bucket", "_sum", "_count", "_created"))
        elif family.type == "summary":
            names.update(family.name + s for s in ("", "_sum", "_count", "_created"))
        else:
            names.add(family.name)
    return names


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression (or a Grafana query) selects."""
    e = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # string literals
    e = re.sub(r"\{[^{}]*\}", "", e)  # label matchers
    e = re.sub(r"\[[^\]]*\]", "", e)  # ranges and subqueries
    e = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", e)
    e = re.sub(r"\$\{[^}]*\}|\$\w+", "", e)  # Grafana variables
    names = set()
    for m in re.finditer(r"(?<![\w.:])[A-Za-z_:][A-Za-z0-9_:]*", e):
        word = m.group()
        if e[m.end():].lstrip().startswith("("):
            continue  # a function
        if word.lower() in KEYWORDS:
            continue
        names.add(word)
    return names


def test_metric_names_extraction() -> None:
    expr = (
        'histogram_quantile(0.95, sum by (le, route) '
        '(rate(relayd_delivery_seconds_bucket{route=~"$route"}[$__rate_interval])))'
        ' / on (route) group_left up{job="relayd"} > 1e3 and bool foo offset 5m'
    )
    assert metric_names(expr) == {"relayd_delivery_seconds_bucket", "up", "foo"}


def test_exported_names_cover_the_design_contract() -> None:
    names = exported_names()
    # design.md §1 "Metrics": the fixed names.
    for name in (
        "relayd_smtp_connections_total", "relayd_smtp_connections_active",
        "relayd_messages_received_total", "relayd_smtp_rejects_total",
        "relayd_auth_attempts_total", "relayd_queue_messages",
        "relayd_queue_oldest_age_seconds", "relayd_deliveries_total",
        "relayd_delivery_seconds_bucket", "relayd_delivery_seconds_sum",
        "relayd_delivery_seconds_count",
    ):
        assert name in names
    # Added for operators (issue 7): TLS, AUTH failures, sizes, the spool's disk.
    for name in (
        "relayd_tls_handshakes_total", "relayd_tls_handshake_failures_total",
        "relayd_tls_sessions_total", "relayd_auth_failures_total",
        "relayd_message_size_bytes_bucket", "relayd_spool_free_bytes",
        "relayd_spool_free_inodes", "relayd_build_info",
    ):
        assert name in names


# -- alert rules --------------------------------------------------------------


def rule_exprs() -> dict[str, list[str]]:
    """alert name -> its expressions, with PyYAML if importable, else by
    reading the ``- alert:`` and ``expr:`` lines (plain, or ``>-``/``|``
    block scalars)."""
    text = RULES.read_text()
    exprs: dict[str, list[str]] = {}
    if yaml is not None:
        for group in yaml.safe_load(text)["groups"]:
            for rule in group["rules"]:
                exprs.setdefault(rule["alert"], []).append(str(rule["expr"]))
        return exprs
    lines = text.splitlines()
    alert = None
    for i, line in enumerate(lines):
        if m := re.match(r"\s*- alert:\s*(\S+)", line):
            alert = m.group(1)
        elif m := re.match(r"(\s*)expr:\s*(.*)$", line):
            assert alert is not None, f"expr before any alert at line {i + 1}"
            indent, value = len(m.group(1)), m.group(2).strip()
            if value in ("|", "|-", ">", ">-"):
                block = []
                for follow in lines[i + 1:]:
                    if follow.strip() and len(follow) - len(follow.lstrip()) <= indent:
                        break
                    block.append(follow.strip())
                value = " ".join(block)
            exprs.setdefault(alert, []).append(value.strip("'\""))
    return exprs


def test_rules_define_the_alerts() -> None:
    assert set(rule_exprs()) == ALERTS


def test_rules_use_only_exported_metrics() -> None:
    allowed = exported_names() | PROMETHEUS_NAMES
    for alert, exprs in rule_exprs().items():
        for expr in exprs:
            used = metric_names(expr)
            assert used, f"{alert}: no metric found in {expr!r}"
            assert used <= allowed, f"{alert}: unknown metrics {sorted(used - allowed)}"


@pytest.mark.skipif(yaml is None, reason="PyYAML is not installed")
def test_rules_have_for_severity_and_annotations() -> None:
    doc = yaml.safe_load(RULES.read_text())
    assert [g["name"] for g in doc["groups"]] == ["relayd"]
    for rule in doc["groups"][0]["rules"]:
        assert rule.get("for"), rule["alert"]
        assert rule["labels"]["severity"] in ("warning", "critical"), rule["alert"]
        assert {"summary", "description"} <= set(rule["annotations"]), rule["alert"]
        assert "{{ $labels." in rule["annotations"]["summary"], rule["alert"]


def test_promtool_check_rules() -> None:
    promtool = need("promtool")
    result = subprocess.run(
        [promtool, "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_test_rules() -> None:
    promtool = need("promtool")
    result = subprocess.run(
        [promtool, "test", "rules", str(RULES_TEST)],
        capture_output=True, text=True, timeout=120, cwd=RULES_TEST.parent,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    # Every alert is exercised with at least one firing expectation.
    tested = set(re.findall(r"alertname:\s*(\w+)\s*\n\s*exp_alerts:\s*\n", RULES_TEST.read_text()))
    assert tested == ALERTS


# -- Grafana dashboard ----------------------------------------------------------


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def panels(dash: dict) -> list[dict]:
    out = []
    for panel in dash["panels"]:
        out.append(panel)
        out.extend(panel.get("panels", []))  # collapsed rows
    return out


def panel_exprs(dash: dict) -> list[tuple[str, str]]:
    return [
        (panel["title"], target["expr"])
        for panel in panels(dash)
        for target in panel.get("targets", [])
        if "expr" in target
    ]


def variable_queries(dash: dict) -> list[tuple[str, str]]:
    out = []
    for var in dash["templating"]["list"]:
        if var["type"] != "query":
            continue
        query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
        out.append((var["name"], query))
    return out


def test_dashboard_uses_only_exported_metrics() -> None:
    allowed = exported_names() | PROMETHEUS_NAMES
    dash = dashboard()
    exprs = panel_exprs(dash)
    assert exprs
    for title, expr in exprs:
        used = metric_names(expr)
        assert used, f"{title}: no metric found in {expr!r}"
        assert used <= allowed, f"{title}: unknown metrics {sorted(used - allowed)}"
    for name, query in variable_queries(dash):
        m = re.fullmatch(r"label_values\((.*),\s*(\w+)\)", query.strip())
        assert m, f"${name}: {query!r}"
        used = metric_names(m.group(1))
        assert used and used <= allowed, f"${name}: {query!r}"


def test_dashboard_shape() -> None:
    dash = dashboard()
    assert 36 <= dash["schemaVersion"] <= 39
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource"
    assert variables["DS_PROMETHEUS"]["query"] == "prometheus"
    assert variables["listener"]["type"] == variables["route"]["type"] == "query"
    for panel in panels(dash):
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${DS_PROMETHEUS}", panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${DS_PROMETHEUS}", panel["title"]
    ids = [p["id"] for p in panels(dash)]
    assert len(ids) == len(set(ids))
    used = {name for _, expr in panel_exprs(dash) for name in metric_names(expr)}
    for name in (
        "relayd_messages_received_total", "relayd_deliveries_total", "relayd_queue_messages",
        "relayd_queue_oldest_age_seconds", "relayd_delivery_seconds_bucket",
        "relayd_smtp_rejects_total", "relayd_smtp_connections_active",
        "relayd_auth_attempts_total", "relayd_tls_certificate_expiry_seconds",
        "relayd_tls_handshakes_total", "relayd_tls_handshake_failures_total",
        "relayd_tls_sessions_total", "relayd_auth_failures_total",
        "relayd_message_size_bytes_bucket", "relayd_spool_free_bytes",
    ):
        assert name in used, name
    assert any("histogram_quantile(0.95" in expr for _, expr in panel_exprs(dash))


def test_dashboard_queries_parse(tmp_path: Path) -> None:
    """promtool parses every panel query (Grafana variables filled in), by
    checking them as recording rules."""
    promtool = need("promtool")
    rules = ["groups:", "  - name: dashboard", "    rules:"]
    for i, (_, expr) in enumerate(panel_exprs(dashboard())):
        expr = expr.replace("$__rate_interval", "5m")
        expr = re.sub(r"\$\{?\w+\}?", ".*", expr)
        rules.append(f"      - record: dashboard:query{i}")
        rules.append(f"        expr: {json.dumps(expr)}")
    path = tmp_path / "dashboard-rules.yml"
    path.write_text("\n".join(rules) + "\n")
    result = subprocess.run(
        [promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
