"""Prometheus metrics of the runner (optional: `gco-infra run --metrics-port`).

Counters per stack for ticks, Pulumi operations and failures, the time of each stack's last
successful tick, and operation durations. Each Runner process has its own registry, so tests and
several runners in one process do not share series.
"""

from __future__ import annotations

import time
from typing import Any, Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from .plan import EXIT_CONFIG, EXIT_FAILED, EXIT_LOCKED, EXIT_OK, EXIT_REFUSED, EXIT_STORE, StackResult

_OPERATION_BUCKETS = (0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800)
_SUCCESS = ("none", "targeted", "full")
OUTCOMES = {EXIT_OK: "ok", EXIT_FAILED: "failed", EXIT_REFUSED: "refused", EXIT_LOCKED: "locked",
            EXIT_STORE: "table_unreadable", EXIT_CONFIG: "config_error"}
"""Tick outcome label by the exit code `run --once` would return for that tick."""


class RunnerMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.ticks = Counter("gco_runner_ticks", "Runner ticks, by outcome (ok, failed, refused, locked, "
                             "table_unreadable, config_error).", ["outcome"], registry=r)
        self.stack_ticks = Counter("gco_runner_stack_ticks", "Stack results per tick, by action (none, targeted, "
                                   "full, skipped, refused, failed).", ["stack", "action"], registry=r)
        self.operations = Counter("gco_runner_operations", "Pulumi operations run, by kind (targeted, full).",
                                  ["stack", "kind"], registry=r)
        self.failures = Counter("gco_runner_failures", "Stack ticks that failed or had failing endpoints.",
                                ["stack"], registry=r)
        self.endpoint_changes = Counter("gco_runner_endpoint_changes", "Resources changed by Pulumi operations, "
                                        "by change (create, update, delete).", ["stack", "change"], registry=r)
        self.status_writes = Counter("gco_runner_status_writes", "Region status writes to the table.", ["stack"],
                                     registry=r)
        self.last_success = Gauge("gco_runner_last_success_timestamp_seconds", "Unix time of the stack's last "
                                  "tick that ended without failure.", ["stack"], registry=r)
        self.operation_seconds = Histogram("gco_runner_operation_seconds", "Duration of Pulumi operations.",
                                           ["stack", "kind"], buckets=_OPERATION_BUCKETS, registry=r)
        self.tick_seconds = Histogram("gco_runner_tick_seconds", "Duration of whole ticks.",
                                      buckets=_OPERATION_BUCKETS, registry=r)
        self.table_reads = Counter("gco_runner_table_reads", "How ticks read the table: scan (the whole table) or "
                                   "stream (only the items its stream says were written).", ["mode"], registry=r)

    def observe(self, results: Iterable[StackResult], seconds: float, outcome: str, table_read: str = "") -> None:
        """Record one tick: its stack results, its duration, its outcome and how it read the table
        (Runner.last_read, e.g. 'scan (periodic)' or 'stream, no writes')."""
        now = time.time()
        if table_read:
            self.table_reads.labels(table_read.split(" ", 1)[0].rstrip(",")).inc()
        for res in results:
            self.stack_ticks.labels(res.stack, res.action).inc()
            kind = res.action if res.action in ("targeted", "full") else "failed" if res.operations else None
            if res.operations and kind:
                self.operations.labels(res.stack, kind).inc(res.operations)
                self.operation_seconds.labels(res.stack, kind).observe(res.seconds)
            for change, count in (("create", res.created), ("update", res.updated), ("delete", res.deleted)):
                if count:
                    self.endpoint_changes.labels(res.stack, change).inc(count)
            if res.status_writes:
                self.status_writes.labels(res.stack).inc(res.status_writes)
            if res.action == "failed" or res.failed:
                self.failures.labels(res.stack).inc()
            elif res.action in _SUCCESS:
                self.last_success.labels(res.stack).set(now)
        self.ticks.labels(outcome).inc()
        self.tick_seconds.observe(seconds)

    def serve(self, port: int, addr: str = "0.0.0.0") -> Any:
        """Serve /metrics on a daemon thread; returns the server (``shutdown()`` stops it)."""
        server, _ = start_http_server(port, addr=addr, registry=self.registry)
        return server
