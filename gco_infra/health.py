"""The health job: readiness, the Ingress watchdog, promotion and purge, written back to the table.

One active replica per cluster (a coordination.k8s.io Lease). Each tick lists Deployments and
Ingresses once per allowed namespace (by label), not once per endpoint, and writes a region's
status only when it changed. The watchdog timer (``unready_since``) lives in the table, so a
restart or a new leader neither resets it nor re-admits a dead endpoint to the shared ALB.

The decisions (what a region's status becomes, which Ingresses go, whether a record may be purged)
are pure functions in watchdog.py; ``HealthJob`` does the I/O around them.
"""

from __future__ import annotations

import copy
import socket
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any, Callable, Iterable, Mapping

import urllib3
from kubernetes import client

from .endpoint import validate_all
from .store import EndpointStore, StoreError
from .watchdog import Observed, Record, decide, purge_blocker, read_records, stored_entry, track_of

LABEL = "gco.io/type=inference"
REQUEST_TIMEOUT = 5.0
"""Seconds before any one Kubernetes API call gives up (the Lease's included)."""

KUBE_ERRORS = (client.ApiException, urllib3.exceptions.HTTPError)
"""What a Kubernetes call raises: an API error, or no answer in time (urllib3 timeouts, refused connections)."""




def without_retries(api: client.ApiClient) -> client.ApiClient:
    """The same cluster and credentials, but no urllib3 retries: a call's timeout then bounds the call.

    (A GET that times out is otherwise retried three times, so a hung apiserver holds a tick four
    times as long.) The caller's client is left as it was.
    """
    cfg = copy.copy(api.configuration)
    cfg.retries = False
    bounded = client.ApiClient(cfg)
    bounded.default_headers.update(api.default_headers)
    return bounded


# ---- leader election -------------------------------------------------------------------------------------------


class LeaseElector:
    """Leader election on a Lease: renew every tick; act only within renew_deadline of the last renewal.

    renew_deadline < lease_seconds, so a leader that cannot renew stops acting before anyone else
    may take the lease over. The deadline runs on this process's monotonic clock, from the start of
    the last successful renewal: a wall-clock jump (NTP, a VM resumed) neither extends nor shortens
    it. The wall clock (``clock``) only stamps the Lease's acquire and renew times, which other
    replicas read.
    """

    def __init__(self, api: client.ApiClient, namespace: str, name: str = "gco-health", *, identity: str | None = None,
                 lease_seconds: int = 30, renew_deadline: float = 20.0, request_timeout: float = REQUEST_TIMEOUT,
                 clock: Callable[[], float] = time.time, monotonic: Callable[[], float] = time.monotonic) -> None:
        if renew_deadline >= lease_seconds:
            raise ValueError("renew_deadline must be shorter than the lease duration")
        if request_timeout <= 0:
            raise ValueError("request_timeout must be positive")
        self.coord = client.CoordinationV1Api(without_retries(api))
        self.namespace, self.name = namespace, name
        self.identity = identity or f"{socket.gethostname()}-{id(self):x}"
        self.lease_seconds, self.renew_deadline, self.request_timeout = lease_seconds, renew_deadline, request_timeout
        self.clock, self.monotonic = clock, monotonic
        self._renewed_at: float | None = None
        """monotonic() when the last successful renewal started."""
        self._seen: tuple[Any, ...] | None = None
        self._seen_at = 0.0
        """The other holder's Lease as last read, and monotonic() when it last changed."""

    def is_leader(self) -> bool:
        return self._renewed_at is not None and self.monotonic() - self._renewed_at < self.renew_deadline

    def _unconfirmed(self) -> bool:
        """A renewal that could not reach the apiserver: still the leader until the deadline, not after."""
        if not self.is_leader():
            self._renewed_at = None
        return self.is_leader()

    def try_acquire_or_renew(self) -> bool:
        started, now = self.monotonic(), self.clock()
        micro = datetime.fromtimestamp(now, timezone.utc)
        timeout = self.request_timeout
        try:
            lease = self.coord.read_namespaced_lease(self.name, self.namespace, _request_timeout=timeout)
        except client.ApiException as exc:
            if exc.status != 404:
                return self._unconfirmed()
            body = client.V1Lease(metadata=client.V1ObjectMeta(name=self.name, namespace=self.namespace),
                                  spec=client.V1LeaseSpec(holder_identity=self.identity, lease_duration_seconds=self.lease_seconds,
                                                          acquire_time=micro, renew_time=micro, lease_transitions=0))
            try:
                self.coord.create_namespaced_lease(self.namespace, body, _request_timeout=timeout)
            except client.ApiException:  # someone else created it first, or we may not
                self._renewed_at = None
                return False
            except urllib3.exceptions.HTTPError:
                return self._unconfirmed()
            self._renewed_at = started
            return True
        except urllib3.exceptions.HTTPError:
            return self._unconfirmed()
        spec = lease.spec
        holder = spec.holder_identity
        renew = spec.renew_time.timestamp() if spec.renew_time else 0.0
        duration = spec.lease_duration_seconds or self.lease_seconds
        seen = (holder, renew, lease.metadata.resource_version)
        first_look = self._seen is None
        if seen != self._seen:
            self._seen, self._seen_at = seen, started
        # Expired by the Lease's own times (all a fresh process can know) and, once this replica has
        # watched the Lease, also unchanged for a whole lease on its own monotonic clock: a holder
        # that keeps renewing is never taken over because this node's wall clock runs ahead.
        watched_long = started - self._seen_at >= duration
        expired = renew + duration < now and (first_look or watched_long)
        if holder != self.identity and not expired:
            self._renewed_at = None
            return False
        if holder != self.identity:
            spec.lease_transitions = (spec.lease_transitions or 0) + 1
            spec.acquire_time = micro
        spec.holder_identity, spec.renew_time, spec.lease_duration_seconds = self.identity, micro, self.lease_seconds
        try:
            # resourceVersion in the body makes this a compare-and-swap: two candidates never both win.
            self.coord.replace_namespaced_lease(self.name, self.namespace, lease, _request_timeout=timeout)
        except client.ApiException as exc:
            if exc.status == 409:  # someone else wrote the Lease since we read it
                self._renewed_at = None
                return False
            return self._unconfirmed()
        except urllib3.exceptions.HTTPError:
            return self._unconfirmed()
        self._renewed_at = started
        return True

    def release(self) -> None:
        self._renewed_at = None


# ---- the job ---------------------------------------------------------------------------------------------------


@dataclass
class HealthReport:
    leader: bool = False
    endpoints: int = 0
    writes: int = 0
    withdrawn: list[str] = field(default_factory=list)
    readmitted: list[str] = field(default_factory=list)
    promoted: list[str] = field(default_factory=list)
    purged: list[str] = field(default_factory=list)
    invalid: list[str] = field(default_factory=list)
    """Invalid records still watched (leniently read: never promoted or purged)."""
    problems: dict[str, str] = field(default_factory=dict)
    """Records this tick could not handle, with the reason; every other record went on."""
    api_calls: int = 0
    error: str | None = None


RECORD_ERRORS = (StoreError, *KUBE_ERRORS, TypeError, ValueError, KeyError, AttributeError, ArithmeticError)
"""What handling one record may raise on data of the wrong shape or a failed call: that record's problem."""


class HealthJob:
    def __init__(self, store: EndpointStore, api: client.ApiClient, region: str, namespaces: Iterable[str], *,
                 threshold: float = 300.0, known_regions: Iterable[str] | None = None,
                 elector: LeaseElector | None = None, request_timeout: float = REQUEST_TIMEOUT,
                 clock: Callable[[], float] = time.time) -> None:
        self.store, self.region, self.namespaces = store, region, tuple(namespaces)
        bounded = without_retries(api)
        self.apps, self.net = client.AppsV1Api(bounded), client.NetworkingV1Api(bounded)
        self.threshold, self.clock, self.elector, self.request_timeout = threshold, clock, elector, request_timeout
        self.known_regions = {region, *known_regions} if known_regions is not None else None
        """The platform's regions; unset, promotion waits for every target region and a record is purged
        only when this region is its only target (nothing else is known)."""
        self.last_success: float | None = None

    def observe(self, report: HealthReport) -> dict[str, Observed]:
        """One list per kind per namespace: constant in the number of endpoints."""
        seen: dict[str, Observed] = {}
        for ns in self.namespaces:
            report.api_calls += 1
            for d in self.apps.list_namespaced_deployment(ns, label_selector=LABEL, _request_timeout=self.request_timeout).items:
                labels = d.metadata.labels or {}
                name = labels.get("app")
                if not name:
                    continue
                o = seen.setdefault(name, Observed())
                t = o.canary if track_of(name, d.metadata.name, labels) == "canary" else o.primary
                want = d.spec.replicas if d.spec.replicas is not None else 1
                st = d.status
                t.seen = True
                t.desired += want
                t.ready += (st.ready_replicas or 0) if st else 0
                if st is None or (st.observed_generation or 0) < (d.metadata.generation or 0) or (st.updated_replicas or 0) < want:
                    t.updated = False
            report.api_calls += 1
            for i in self.net.list_namespaced_ingress(ns, label_selector=LABEL, _request_timeout=self.request_timeout).items:
                name = (i.metadata.labels or {}).get("app")
                if name:
                    seen.setdefault(name, Observed()).ingresses.append((ns, i.metadata.name))
        return seen

    def tick(self) -> HealthReport:
        report = HealthReport()
        if self.elector is not None and not self.elector.try_acquire_or_renew():
            return report
        report.leader = True
        try:
            items = self.store.list_endpoints()
            observed = self.observe(report)
        except (StoreError, *KUBE_ERRORS) as exc:
            report.error = str(exc)
            return report
        records, report.problems = read_records(items, validate_all(items, allowed_namespaces=self.namespaces))
        now = self.clock()
        for record in records:
            if not self._acting():
                report.error = "lost the lease"
                return report
            obs = observed.get(record.name, Observed())
            if not self._watches(record, obs):
                continue
            report.endpoints += 1
            if not record.valid:
                report.invalid.append(record.name)
            try:
                self._region(record, obs, now, report)
            except RECORD_ERRORS as exc:
                report.problems[record.name] = f'endpoint "{record.name}": {type(exc).__name__}: {exc}'[:500]
        self._promote_and_purge(records, observed, report)
        self.last_success = now
        return report

    def _acting(self) -> bool:
        return self.elector is None or self.elector.is_leader()

    def _watches(self, record: Record, obs: Observed) -> bool:
        """Records that should run here, and any record whose objects still run here: an invalid one's
        last declaration, or a deleted or untargeted one whose removal has not happened yet (refused
        by the deletion bound, failed, pending). A dead endpoint must leave the shared ALB either way."""
        if obs.seen:
            return True
        if record.endpoint is not None:
            return record.endpoint.targets(self.region) and record.endpoint.desired_state != "deleted"
        return self.region in record.targets

    def _leaving(self, record: Record) -> bool:
        """A valid record that no longer asks to run here (its objects are still being removed)."""
        ep = record.endpoint
        return ep is not None and (ep.desired_state == "deleted" or not ep.targets(self.region))

    def _region(self, record: Record, obs: Observed, now: float, report: HealthReport) -> None:
        stored, problem = stored_entry(record.item, self.region)
        if problem is not None:  # never written over or acted on: someone has to look at it
            report.problems[record.name] = f'endpoint "{record.name}": {problem}'
            return
        desired = record.endpoint.desired_state if record.endpoint is not None else None
        leaving = self._leaving(record)
        decision = decide(stored, obs, desired_state=None if leaving else desired, now=now,
                          threshold=self.threshold, keep_state=leaving)
        if decision.status is not None:
            # The intent is recorded before acting on it: if the write loses a race, nothing is deleted
            # and the next tick decides again from what the table then says.
            if not self._acting() or not self.store.write_region_status(record.name, self.region, decision.status,
                                                                        expected=stored):
                return
            report.writes += 1
        for ns, name in decision.delete:
            self._delete_ingress(ns, name)
        if decision.event == "withdrawn":
            report.withdrawn.append(record.name)
        elif decision.event == "readmitted":
            report.readmitted.append(record.name)

    def _delete_ingress(self, namespace: str, name: str) -> None:
        if not self._acting():
            return
        try:
            self.net.delete_namespaced_ingress(name, namespace, _request_timeout=self.request_timeout)
        except client.ApiException as exc:
            if exc.status != 404:
                raise

    def _promote_and_purge(self, records: Iterable[Record], observed: Mapping[str, Observed], report: HealthReport) -> None:
        for record in records:
            ep = record.endpoint
            if ep is None or ep.desired_state not in ("deploying", "deleted"):
                continue  # invalid records are watched, never promoted or purged
            if not self._acting():
                return
            try:
                if ep.desired_state == "deploying":
                    regions = [r for r in ep.target_regions if self.known_regions is None or r in self.known_regions]
                    if regions and all(ep.status_in(r).state == "running" for r in regions):
                        if self.store.set_desired_state(ep.name, "running", expected="deploying"):
                            report.promoted.append(ep.name)
                elif purge_blocker(record, region=self.region, known_regions=self.known_regions or {self.region},
                                   objects_here=observed.get(ep.name, Observed()).seen) is None:
                    if self.store.purge(ep.name, expected_updated_at=ep.updated_at):
                        report.purged.append(ep.name)
            except StoreError as exc:
                report.problems[ep.name] = f'endpoint "{ep.name}": {exc}'[:500]


# ---- liveness ------------------------------------------------------------------------------------------------------


def serve_liveness(healthy: Callable[[], bool], port: int) -> HTTPServer:
    """/healthz answers 200 only while ``healthy()`` (a real signal, not `exists /proc/1`)."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server API
            ok = self.path == "/healthz" and healthy()
            self.send_response(200 if ok else 503)
            self.end_headers()
            self.wfile.write(b"ok\n" if ok else b"stale\n")

        def log_message(self, *args: Any) -> None:
            pass

    server = HTTPServer(("0.0.0.0", port), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def job_is_healthy(job: HealthJob, max_age: float) -> Callable[[], bool]:
    """Fresh ticks, or standing by while another replica holds the lease."""
    def check() -> bool:
        fresh = job.last_success is not None and time.time() - job.last_success < max_age
        return fresh or (job.elector is not None and not job.elector.is_leader())
    return check


__all__ = ["HealthJob", "HealthReport", "LeaseElector", "serve_liveness", "job_is_healthy", "without_retries"]
