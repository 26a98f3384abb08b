"""deploy/prometheus and deploy/grafana against the real tools: promtool checks and unit-tests the
alert rules and the example config, a real Prometheus scrapes a running pullthrough and evaluates
the rules, and every query of the Grafana dashboard runs in it on metrics pullthrough exports."""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from proxy import __version__
from tests.conftest import require_tool
from tests.servers.prometheus import Prometheus

pytestmark = pytest.mark.real

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
RULES = DEPLOY / "prometheus" / "pullthrough.rules.yml"
RULE_TESTS = DEPLOY / "prometheus" / "pullthrough.rules.test.yml"
EXAMPLE_CONFIG = DEPLOY / "prometheus" / "prometheus.yml"
DASHBOARD = DEPLOY / "grafana" / "pullthrough.json"
JOB = "pullthrough"  # the job name the rules and the dashboard assume


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([require_tool("promtool"), *args], capture_output=True, text=True, timeout=120)


def test_alert_rules_pass_promtool_check_and_their_unit_tests() -> None:
    checked = promtool("check", "rules", str(RULES))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    tested = promtool("test", "rules", str(RULE_TESTS))
    assert tested.returncode == 0, tested.stdout + tested.stderr
    assert "SUCCESS" in tested.stdout


def test_every_alert_has_a_severity_a_summary_a_description_and_a_runbook_and_a_unit_test() -> None:
    rules = [rule for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]]
    tested = {check["alertname"] for test in yaml.safe_load(RULE_TESTS.read_text())["tests"] for check in test["alert_rule_test"]}
    for rule in rules:
        assert rule["labels"]["severity"] in ("critical", "warning", "info"), rule["alert"]
        assert {"summary", "description", "runbook"} <= rule["annotations"].keys(), rule["alert"]
    assert {rule["alert"] for rule in rules} == tested
    assert {"PullthroughTargetDown", "PullthroughUpstreamDown", "PullthroughHitRatioCollapse", "PullthroughCacheNearCap",
            "PullthroughFillFailures"} <= tested


def test_the_example_prometheus_config_is_valid() -> None:
    checked = promtool("check", "config", str(EXAMPLE_CONFIG))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert f"job_name: {JOB}" in EXAMPLE_CONFIG.read_text()


@pytest.fixture
def scraped(upstream, pullthrough, tmp_path: Path) -> Iterator[tuple[Any, Prometheus]]:  # type: ignore[no-untyped-def]
    binary = require_tool("prometheus")
    pt = pullthrough(max_size=5_000_000_000)
    prometheus = Prometheus.start(binary, tmp_path / "prometheus", job=JOB, targets=[pt.host], rule_files=[RULES])
    yield pt, prometheus
    prometheus.stop()


def test_a_real_prometheus_scrapes_pullthrough_and_evaluates_the_alert_rules(upstream, scraped) -> None:  # type: ignore[no-untyped-def]
    pt, prometheus = scraped
    image = upstream.images["library/single:1"]
    paths = ["/v2/", "/v2/", f"/v2/library/single/manifests/{image.manifest_digest}", f"/v2/library/single/blobs/{image.layers[0].digest}"]
    with httpx.Client(base_url=pt.url, timeout=30) as http:
        for path in paths:
            assert http.get(path).status_code == 200, path

    def target_up() -> dict[str, Any] | None:
        targets = prometheus.api("targets")["activeTargets"]
        return next((t for t in targets if t["labels"]["job"] == JOB and t["health"] == "up"), None)

    target = prometheus.wait_for(target_up, "the pullthrough target up")
    assert target["scrapeUrl"] == f"{pt.url}/metrics" and target["lastError"] == ""

    def build_info() -> dict[str, Any] | None:
        result = prometheus.query(f'pullthrough_build_info{{job="{JOB}"}}')
        return result[0] if result else None

    info = prometheus.wait_for(build_info, "pullthrough_build_info")
    assert info["metric"]["version"] == __version__ and float(info["value"][1]) == 1

    def oci_requests() -> float | None:
        result = prometheus.query(f'sum(pullthrough_request_duration_seconds_count{{job="{JOB}",family="oci"}})')
        return float(result[0]["value"][1]) if result and float(result[0]["value"][1]) == len(paths) else None

    assert prometheus.wait_for(oci_requests, f"{len(paths)} oci requests counted") == len(paths)
    assert float(prometheus.query(f'pullthrough_cache_max_bytes{{job="{JOB}"}}')[0]["value"][1]) == 5_000_000_000

    expected = {rule["alert"] for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]}

    def rules_evaluated() -> dict[str, str] | None:
        groups = prometheus.api("rules", type="alert")["groups"]
        health = {rule["name"]: rule["health"] for group in groups for rule in group["rules"]}
        return health if set(health) == expected and all(h == "ok" for h in health.values()) else None

    health = prometheus.wait_for(rules_evaluated, "every alert rule loaded and evaluated")
    assert health == {name: "ok" for name in expected}


# -- the Grafana dashboard ------------------------------------------------------------------------------

METRIC = re.compile(r"\b(?:pullthrough|process)_[a-zA-Z0-9_]+")


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, expr) for every query of every panel, rows' nested panels included."""
    dashboard = json.loads(DASHBOARD.read_text())
    panels = [*dashboard["panels"], *(p for row in dashboard["panels"] for p in row.get("panels", []))]
    return [(panel["title"], target["expr"]) for panel in panels for target in panel.get("targets", [])]


def exported_names(text: str) -> set[str]:
    """Every series name an exposition declares: its samples, and the series a family with no
    sample yet will have (a labelled counter nobody has counted is a TYPE line only)."""
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum"), "gauge": ("",), "info": ("_info",)}
    names: set[str] = set()
    for family in text_string_to_metric_families(text):
        names.update(sample.name for sample in family.samples)
        names.update(family.name + suffix for suffix in suffixes.get(family.type, ("",)))
    return names


def test_the_grafana_dashboard_queries_run_on_metrics_pullthrough_exports(upstream, scraped) -> None:  # type: ignore[no-untyped-def]
    pt, prometheus = scraped
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["schemaVersion"] >= 39
    assert [i["name"] for i in dashboard["__inputs"]] == ["DS_PROMETHEUS"]
    queries = dashboard_queries()
    titles = {title for title, _ in queries}
    for wanted in ("Request rate by route family and cache result", "Hit ratio", "Latency to the last byte (p50, p95, p99)",
                   "Bytes served: hit vs miss, and fetched from upstreams", "Upstream errors by kind", "Upstream up",
                   "Cache size vs max_size", "Fills in progress and failed", "Resident memory", "CPU"):
        assert wanted in titles, wanted
    for panel in dashboard["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${DS_PROMETHEUS}", panel["title"]

    exported = exported_names(httpx.get(f"{pt.url}/metrics", timeout=10).text)
    used = {(title, name) for title, expr in queries for name in METRIC.findall(expr)}
    assert {name for _, name in used} >= {"pullthrough_upstream_errors_total", "pullthrough_upstream_up", "process_resident_memory_bytes"}
    assert sorted((title, name) for title, name in used if name not in exported) == []

    prometheus.wait_for(lambda: prometheus.query(f'up{{job="{JOB}"}}') or None, "a first scrape")
    for title, expr in queries:
        runnable = expr.replace("$__rate_interval", "1m").replace("$instance", ".*")
        response = httpx.get(f"{prometheus.url}/api/v1/query", params={"query": runnable}, timeout=10).json()
        assert response["status"] == "success", (title, expr, response.get("error"))
