"""The shipped monitoring (deploy/): Prometheus config and rules, their unit tests, and the Grafana dashboard
against what the service really exports. A rule or panel on a renamed metric or label raises no error
anywhere: it only never fires, or draws nothing."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from service_fixtures import photo_bytes

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
RULES = DEPLOY / "prometheus-rules.yml"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "carvae.json"

pytest_plugins = ["service_fixtures"]

# Labels Prometheus adds to every scraped series (job, instance) or that every histogram bucket has (le).
SCRAPE_LABELS = {"job", "instance", "le"}
# Enough of PromQL to find what an expression reads: metric names (ours, the process and Python collectors'),
# recording rules (level:metric:operation), label matchers, by/without lists and legend templates.
_METRIC = re.compile(r"\b(?:carvae|process|python)_[a-z0-9_]+\b")
_RECORDED = re.compile(r"\b[a-z_]+:[a-z0-9_]+:[a-z0-9_]+\b")
_MATCHER = re.compile(r"([a-zA-Z_]\w*)\s*(?:=~|!~|!=|=)\s*\"")
_GROUPING = re.compile(r"\b(?:by|without)\s*\(([^)]*)\)")
_TEMPLATE = re.compile(r"\{\{\s*\$labels\.(\w+)\s*\}\}|\{\{\s*(\w+)\s*\}\}")

promtool = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(promtool is None, reason="promtool (Debian: prometheus) not installed")


def _promtool(*args: str) -> subprocess.CompletedProcess[str]:
    assert promtool is not None
    return subprocess.run([promtool, *args], cwd=DEPLOY, capture_output=True, text=True, timeout=60)


@needs_promtool
def test_prometheus_config_and_rules_are_valid() -> None:
    for args in (("check", "config", "prometheus.yml"), ("check", "rules", RULES.name)):
        result = _promtool(*args)
        assert result.returncode == 0, result.stdout + result.stderr


@needs_promtool
def test_alerts_fire_on_what_their_summaries_say() -> None:
    """deploy/prometheus-rules.test.yml: each alert fires on its condition, after its `for`, and not below
    its threshold; the recording rules compute what their names say."""
    result = _promtool("test", "rules", "prometheus-rules.test.yml")
    assert result.returncode == 0, result.stdout + result.stderr


def _rules() -> list[dict[str, Any]]:
    return [rule for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]]


def _panel_queries() -> list[tuple[str, str]]:
    """(expr, legendFormat) of every panel's targets, rows' panels included."""

    def panels(node: dict[str, Any]) -> list[dict[str, Any]]:
        found = node.get("panels", [])
        return [p for panel in found for p in (panel, *panels(panel))]

    board = json.loads(DASHBOARD.read_text())
    return [
        (target["expr"], target.get("legendFormat", ""))
        for panel in panels(board)
        for target in panel.get("targets", [])
    ]


@pytest.fixture
def exported(client: TestClient) -> dict[str, set[str]]:
    """Every sample name on /metrics, with the label names it has, once each op and error has been seen."""
    files = {"file": ("car.png", photo_bytes(), "image/png")}
    assert client.post("/reconstruct", files=files).status_code == 200
    assert client.post("/encode", files=files).status_code == 200
    assert client.post("/sample", json={"n": 1}).status_code == 200
    assert client.get("/no-such-page").status_code == 404
    labels: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(client.get("/metrics").text):
        for sample in family.samples:
            labels.setdefault(sample.name, set()).update(sample.labels)
    return labels


def _check(expr: str, templates: str, exported: dict[str, set[str]], recorded: dict[str, set[str]]) -> None:
    names = set(_METRIC.findall(expr))
    missing = names - set(exported)
    assert not missing, f"{expr!r} reads {sorted(missing)}, which the service does not export"
    used_records = set(_RECORDED.findall(expr))
    assert used_records <= set(recorded), f"{expr!r} reads an undefined recording rule"
    available = set().union(*(exported[n] for n in names), *(recorded[r] for r in used_records))
    available |= SCRAPE_LABELS
    wanted = {name for group in _GROUPING.findall(expr) for name in re.split(r"\s*,\s*", group.strip())}
    wanted |= set(_MATCHER.findall(expr))
    wanted |= {a or b for a, b in _TEMPLATE.findall(templates)} - {"instance", "job"}
    wanted.discard("")
    assert wanted <= available, f"{expr!r} uses labels {sorted(wanted - available)} that its series lack"


def test_rules_read_metrics_and_labels_the_service_exports(exported: dict[str, set[str]]) -> None:
    recorded: dict[str, set[str]] = {}
    for rule in _rules():
        expr = rule["expr"]
        if "up{" in expr:  # Prometheus' own series for the scrape
            continue
        _check(expr, json.dumps(rule.get("annotations", {})), exported, recorded)
        if "record" in rule:
            recorded[rule["record"]] = {
                n for group in _GROUPING.findall(expr) for n in re.split(r"\s*,\s*", group.strip())
            } - {"le"}
    assert {"CarvaeDown", "CarvaeNotReady", "CarvaeServerErrors", "CarvaeSlow"} <= {
        rule.get("alert") for rule in _rules()
    }


def test_dashboard_panels_read_metrics_and_labels_the_service_exports(exported: dict[str, set[str]]) -> None:
    queries = _panel_queries()
    assert len(queries) >= 10
    for expr, legend in queries:
        _check(expr, legend, exported, {})


def test_dashboard_queries_are_rates_of_counters_and_quantiles_of_buckets() -> None:
    """A counter or a histogram's parts only mean something as a rate; a quantile needs the buckets by le."""
    for expr, _ in _panel_queries():
        for name in _METRIC.findall(expr):
            if name.endswith(("_total", "_bucket", "_sum", "_count")):
                assert re.search(rf"rate\(\s*{name}\b", expr), f"{name} not under rate() in {expr!r}"
        if "histogram_quantile" in expr:
            assert "_bucket" in expr and re.search(r"by \([^)]*\ble\b", expr), expr


def test_every_counter_of_the_service_is_on_the_dashboard(exported: dict[str, set[str]]) -> None:
    """A counter the README tells operators to watch (carvae_server_refusals_total: a rise is a scanner, a
    slowloris or a connection limit reached) was on no panel, and those refusals are in no other series."""
    graphed = {name for expr, _ in _panel_queries() for name in _METRIC.findall(expr)}
    counters = {name for name in exported if name.startswith("carvae_") and name.endswith("_total")}
    assert counters - graphed == set()
