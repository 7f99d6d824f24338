"""The health job: readiness, the Ingress watchdog, promotion and purge, written back to the table.

One active replica per cluster (a coordination.k8s.io Lease). Each tick lists Deployments and
Ingresses once per allowed namespace (by label), not once per endpoint, and writes a region's
status only when it changed. The watchdog timer (``unready_since``) lives in the table, so a
restart or a new leader neither resets it nor re-admits a dead endpoint to the shared ALB.
"""

from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any, Callable, Iterable, Mapping

from kubernetes import client

from .endpoint import Endpoint, validate_all
from .store import EndpointStore, StoreError

LABEL = "gco.io/type=inference"


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def _parse_iso(text: str | None) -> float | None:
    if not text:
        return None
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


# ---- leader election -------------------------------------------------------------------------------------------


class LeaseElector:
    """Leader election on a Lease: renew every tick; act only within renew_deadline of the last renewal.

    renew_deadline < lease_duration, so a leader that cannot renew stops acting before anyone else
    may take the lease over.
    """

    def __init__(self, api: client.ApiClient, namespace: str, name: str = "gco-health", *, identity: str | None = None,
                 lease_seconds: int = 30, renew_deadline: float = 20.0, clock: Callable[[], float] = time.time) -> None:
        if renew_deadline >= lease_seconds:
            raise ValueError("renew_deadline must be shorter than the lease duration")
        self.coord = client.CoordinationV1Api(api)
        self.namespace, self.name = namespace, name
        self.identity = identity or f"{socket.gethostname()}-{id(self):x}"
        self.lease_seconds, self.renew_deadline, self.clock = lease_seconds, renew_deadline, clock
        self._renewed_at: float | None = None

    def is_leader(self) -> bool:
        return self._renewed_at is not None and self.clock() - self._renewed_at < self.renew_deadline

    def try_acquire_or_renew(self) -> bool:
        now = self.clock()
        micro = datetime.fromtimestamp(now, timezone.utc)
        try:
            lease = self.coord.read_namespaced_lease(self.name, self.namespace)
        except client.ApiException as exc:
            if exc.status != 404:
                self._renewed_at = None if not self.is_leader() else self._renewed_at
                return self.is_leader()
            body = client.V1Lease(metadata=client.V1ObjectMeta(name=self.name, namespace=self.namespace),
                                  spec=client.V1LeaseSpec(holder_identity=self.identity, lease_duration_seconds=self.lease_seconds,
                                                          acquire_time=micro, renew_time=micro, lease_transitions=0))
            try:
                self.coord.create_namespaced_lease(self.namespace, body)
            except client.ApiException:
                return False
            self._renewed_at = now
            return True
        spec = lease.spec
        holder = spec.holder_identity
        renew = spec.renew_time.timestamp() if spec.renew_time else 0.0
        expired = renew + (spec.lease_duration_seconds or self.lease_seconds) < now
        if holder != self.identity and not expired:
            self._renewed_at = None
            return False
        if holder != self.identity:
            spec.lease_transitions = (spec.lease_transitions or 0) + 1
            spec.acquire_time = micro
        spec.holder_identity, spec.renew_time, spec.lease_duration_seconds = self.identity, micro, self.lease_seconds
        try:
            # resourceVersion in the body makes this a compare-and-swap: two candidates never both win.
            self.coord.replace_namespaced_lease(self.name, self.namespace, lease)
        except client.ApiException:
            self._renewed_at = None
            return False
        self._renewed_at = now
        return True

    def release(self) -> None:
        self._renewed_at = None


# ---- readiness ---------------------------------------------------------------------------------------------------


@dataclass
class Observed:
    ready: int = 0
    desired: int = 0
    updated: bool = True
    ingresses: list[tuple[str, str]] = field(default_factory=list)
    """(namespace, name) of Ingresses that exist for the endpoint."""


@dataclass
class HealthReport:
    leader: bool = False
    endpoints: int = 0
    writes: int = 0
    withdrawn: list[str] = field(default_factory=list)
    readmitted: list[str] = field(default_factory=list)
    promoted: list[str] = field(default_factory=list)
    purged: list[str] = field(default_factory=list)
    api_calls: int = 0
    error: str | None = None


class HealthJob:
    def __init__(self, store: EndpointStore, api: client.ApiClient, region: str, namespaces: Iterable[str], *,
                 threshold: float = 300.0, known_regions: Iterable[str] | None = None,
                 elector: LeaseElector | None = None, clock: Callable[[], float] = time.time) -> None:
        self.store, self.region, self.namespaces = store, region, tuple(namespaces)
        self.apps, self.net = client.AppsV1Api(api), client.NetworkingV1Api(api)
        self.threshold, self.clock, self.elector = threshold, clock, elector
        self.known_regions = set(known_regions) if known_regions is not None else None
        self.last_success: float | None = None

    def observe(self, report: HealthReport) -> dict[str, Observed]:
        """One list per kind per namespace: constant in the number of endpoints."""
        seen: dict[str, Observed] = {}
        for ns in self.namespaces:
            report.api_calls += 1
            for d in self.apps.list_namespaced_deployment(ns, label_selector=LABEL).items:
                name = (d.metadata.labels or {}).get("app")
                if not name:
                    continue
                o = seen.setdefault(name, Observed())
                want = d.spec.replicas if d.spec.replicas is not None else 1
                st = d.status
                o.desired += want
                o.ready += (st.ready_replicas or 0) if st else 0
                if st is None or (st.observed_generation or 0) < (d.metadata.generation or 0) or (st.updated_replicas or 0) < want:
                    o.updated = False
            report.api_calls += 1
            for i in self.net.list_namespaced_ingress(ns, label_selector=LABEL).items:
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
        except (StoreError, client.ApiException) as exc:
            report.error = str(exc)
            return report
        by_name = {i.get("endpoint_name"): i for i in items}
        validated = validate_all(items, allowed_namespaces=self.namespaces)
        now = self.clock()
        for ep in validated.endpoints.values():
            if not self._acting():
                report.error = "lost the lease"
                return report
            if ep.targets(self.region) and ep.desired_state != "deleted":
                report.endpoints += 1
                self._region(ep, by_name[ep.name], observed.get(ep.name, Observed()), now, report)
        self._promote_and_purge(validated.endpoints.values(), report)
        self.last_success = now
        return report

    def _acting(self) -> bool:
        return self.elector is None or self.elector.is_leader()

    def _region(self, ep: Endpoint, item: Mapping[str, Any], obs: Observed, now: float, report: HealthReport) -> None:
        stored = dict((item.get("region_status") or {}).get(self.region) or {})
        new = dict(stored)
        if stored.get("state") in (None, "pending", "error") and not obs.desired and not obs.ingresses and ep.desired_state != "stopped":
            return  # not applied here yet (or failed): the runner owns that status
        new["replicas_ready"], new["replicas_desired"] = obs.ready, obs.desired
        if ep.desired_state == "stopped":
            new["state"] = "stopped"
            new.pop("unready_since", None)
            for ns, name in obs.ingresses:  # stopped endpoints never keep an Ingress
                self._delete_ingress(ns, name)
        else:
            if obs.ready >= obs.desired and obs.desired > 0 and obs.updated:
                new["state"] = "running"
            elif stored.get("state") in ("running", "updating"):
                new["state"] = "updating"
            else:
                new["state"] = "creating"
            if obs.ready == 0 and obs.desired > 0:
                since = _parse_iso(stored.get("unready_since")) or now
                new["unready_since"] = _iso(since)
                if now - since >= self.threshold and stored.get("ingress") != "withdrawn":
                    for ns, name in obs.ingresses:
                        self._delete_ingress(ns, name)
                    new["ingress"] = "withdrawn"
                    new["message"] = f"no ready replica for {int(now - since)}s: Ingress withdrawn from the shared ALB"
                    report.withdrawn.append(ep.name)
                elif stored.get("ingress") == "withdrawn":
                    for ns, name in obs.ingresses:  # someone re-created it while still dead
                        self._delete_ingress(ns, name)
            else:
                new.pop("unready_since", None)
                if stored.get("ingress") == "withdrawn" and obs.ready > 0:
                    new["ingress"] = "active"
                    new["message"] = "ready again: Ingress re-admitted on the next runner tick"
                    report.readmitted.append(ep.name)
        keys = ("state", "replicas_ready", "replicas_desired", "ingress", "unready_since")
        if all(new.get(k) == stored.get(k) for k in keys):
            return
        new["last_sync"] = _iso(now)
        if self._acting() and self.store.write_region_status(ep.name, self.region, new, expected=stored or None):
            report.writes += 1

    def _delete_ingress(self, namespace: str, name: str) -> None:
        if not self._acting():
            return
        try:
            self.net.delete_namespaced_ingress(name, namespace)
        except client.ApiException as exc:
            if exc.status != 404:
                raise

    def _promote_and_purge(self, endpoints: Iterable[Endpoint], report: HealthReport) -> None:
        for ep in endpoints:
            regions = [r for r in ep.target_regions if self.known_regions is None or r in self.known_regions]
            states = [ep.status_in(r).state for r in regions]
            if not self._acting():
                return
            if ep.desired_state == "deploying" and regions and all(s == "running" for s in states):
                if self.store.set_desired_state(ep.name, "running", expected="deploying"):
                    report.promoted.append(ep.name)
            elif ep.desired_state == "deleted" and all(s == "deleted" for s in states):
                if self.store.purge(ep.name, expected_updated_at=ep.updated_at):
                    report.purged.append(ep.name)


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


__all__ = ["HealthJob", "HealthReport", "LeaseElector", "serve_liveness", "job_is_healthy"]
