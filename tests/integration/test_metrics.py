"""The runner's Prometheus metrics, scraped over HTTP and parsed as Prometheus would."""

from __future__ import annotations

import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from gco_infra.localenv import free_port
from gco_infra.metrics import OUTCOMES, RunnerMetrics
from gco_infra.plan import EXIT_FAILED, EXIT_OK, StackResult


def scrape(port: int) -> dict[tuple[str, tuple], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def test_ticks_operations_failures_and_last_success_per_stack():
    metrics = RunnerMetrics()
    port = free_port()
    server = metrics.serve(port, addr="127.0.0.1")
    try:
        ok = StackResult(stack="us-east-1", region="us-east-1", action="targeted", operations=1, updated=2,
                         seconds=3.0, status_writes=1)
        idle = StackResult(stack="eu-west-1", region="eu-west-1")
        metrics.observe([ok, idle], 3.5, OUTCOMES[EXIT_OK], table_read="scan (first read)")
        got = scrape(port)
        assert got[("gco_runner_table_reads_total", (("mode", "scan"),))] == 1
        assert got[("gco_runner_ticks_total", (("outcome", "ok"),))] == 1
        assert got[("gco_runner_operations_total", (("kind", "targeted"), ("stack", "us-east-1")))] == 1
        assert ("gco_runner_operations_total", (("kind", "targeted"), ("stack", "eu-west-1"))) not in got
        assert got[("gco_runner_endpoint_changes_total", (("change", "update"), ("stack", "us-east-1")))] == 2
        first_success = got[("gco_runner_last_success_timestamp_seconds", (("stack", "us-east-1"),))]
        assert first_success > 0
        assert got[("gco_runner_last_success_timestamp_seconds", (("stack", "eu-west-1"),))] > 0

        failed = StackResult(stack="us-east-1", region="us-east-1", action="failed", operations=1, failed=1,
                             seconds=1.0, endpoint_errors={"a": "boom"})
        metrics.observe([failed], 1.0, OUTCOMES[EXIT_FAILED], table_read="stream, 1 re-read")
        got = scrape(port)
        assert got[("gco_runner_table_reads_total", (("mode", "stream"),))] == 1
        assert got[("gco_runner_failures_total", (("stack", "us-east-1"),))] == 1
        assert got[("gco_runner_ticks_total", (("outcome", "failed"),))] == 1
        assert got[("gco_runner_operations_total", (("kind", "failed"), ("stack", "us-east-1")))] == 1
        # A failure does not move the last success forward.
        assert got[("gco_runner_last_success_timestamp_seconds", (("stack", "us-east-1"),))] == first_success
        assert got[("gco_runner_tick_seconds_count", ())] == 2
    finally:
        server.shutdown()


def test_registries_are_per_runner():
    a, b = RunnerMetrics(), RunnerMetrics()
    a.observe([], 0.1, "ok")
    assert a.registry.get_sample_value("gco_runner_ticks_total", {"outcome": "ok"}) == 1
    assert b.registry.get_sample_value("gco_runner_ticks_total", {"outcome": "ok"}) is None
