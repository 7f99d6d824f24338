"""The health job: readiness, the Ingress watchdog, promotion and purge, written back to the table.

One active replica per cluster (a coordination.k8s.io Lease). Each tick observes Deployments and
Ingresses per allowed namespace (by label), not per endpoint: from a watch-backed cache
(kubecache.ObjectCache) while its streams are current, otherwise with one list per kind and
namespace; it writes a region's status only when it changed. The table is followed through its
stream (store.TableCache), so a tick in which nothing was written reads no item and validates
nothing again. Objects are read as the API server's JSON into only the fields the decisions use
(the client's models cost seconds at a thousand objects).
The watchdog timer (``unready_since``) lives in the table, so a restart or a new leader neither
resets it nor re-admits a dead endpoint to the shared ALB.

The decisions (what a region's status becomes, which Ingresses go, whether a record may be purged)
are pure functions in watchdog.py; ``HealthJob`` does the I/O around them.
"""

from __future__ import annotations

import copy
import json
import socket
import threading
import time
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any, Callable, Iterable, Mapping

import urllib3
from kubernetes import client

from . import rollout
from .endpoint import RolloutPolicy, endpoint_to_item, region_statuses, validate_all
from .kubecache import DEPLOYMENTS, INGRESSES, ObjectCache
from .manifests import REVISION_ANNOTATION
from .store import EndpointStore, StoreError, TableCache
from .watchdog import Observed, Record, decide, purge_blocker, read_records, stored_entry, track_of

LABEL = "gco.io/type=inference"
REQUEST_TIMEOUT = 5.0
"""Seconds before any one Kubernetes API call gives up (the Lease's included)."""

KUBE_ERRORS = (client.ApiException, urllib3.exceptions.HTTPError)
"""What a Kubernetes call raises: an API error, or no answer in time (urllib3 timeouts, refused connections)."""


class ObserveError(RuntimeError):
    """A list answered with something that is not a list of objects: nothing is known this tick."""


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


# ---- what the cluster shows, from the API server's JSON (pure) ----------------------------------------------------


def list_items(body: bytes | str, what: str) -> list[Mapping[str, Any]]:
    """The ``items`` of a list's JSON answer; ObserveError when it is not a list of objects."""
    try:
        items = json.loads(body).get("items")
    except (ValueError, AttributeError) as exc:
        raise ObserveError(f"listing {what}: the answer is not a JSON object: {exc}") from exc
    if items is None:
        return []
    if not isinstance(items, list) or not all(isinstance(i, Mapping) for i in items):
        raise ObserveError(f"listing {what}: the answer's items are not a list of objects")
    return items


def _field(obj: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    value = obj.get(key)
    return value if isinstance(value, Mapping) else {}


def _count(value: Any) -> int:
    if value is None:
        return 0
    if not isinstance(value, int) or isinstance(value, bool):
        raise ObserveError(f"a replica count or generation is not a whole number: {value!r}")
    return value


def add_deployment(seen: dict[str, Observed], obj: Mapping[str, Any]) -> None:
    """Count one Deployment (as JSON) into its endpoint's primary or canary track.

    Desired replicas default to 1 when unset (as the API server defaults them); a Deployment is not
    updated until its controller has seen its latest generation and updated every desired replica.
    """
    meta = _field(obj, "metadata")
    labels = _field(meta, "labels")
    name = labels.get("app")
    if not name:
        return
    o = seen.setdefault(name, Observed())
    t = o.canary if track_of(name, meta.get("name"), labels) == "canary" else o.primary
    replicas = _field(obj, "spec").get("replicas")
    want = _count(replicas) if replicas is not None else 1
    status = obj.get("status")
    st = status if isinstance(status, Mapping) else {}
    t.seen = True
    revision = _field(meta, "annotations").get(REVISION_ANNOTATION)
    if isinstance(revision, str) and revision:
        t.revision = revision[:64]
    t.desired += want
    t.ready += _count(st.get("readyReplicas"))
    # Pods of an older template still counted (a rollout in progress): their readiness is not this one's.
    # (A scale-down leaves no older pod: replicas shrink to the updated ones.)
    if (status is None or _count(st.get("observedGeneration")) < _count(meta.get("generation"))
            or _count(st.get("updatedReplicas")) < want or _count(st.get("replicas")) > _count(st.get("updatedReplicas"))):
        t.updated = False


def add_ingress(seen: dict[str, Observed], namespace: str, obj: Mapping[str, Any]) -> None:
    """Note one Ingress (as JSON) of its endpoint."""
    meta = _field(obj, "metadata")
    name = _field(meta, "labels").get("app")
    if name:
        seen.setdefault(name, Observed()).ingresses.append((namespace, meta.get("name")))


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
    statuses: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Endpoint -> the region status this tick wrote (the rollout gate judges with it at once)."""
    rollouts: dict[str, str] = field(default_factory=dict)
    """Endpoint -> what its rollout did this tick (started, healthy, advanced, completed, failed, ...)."""
    invalid: list[str] = field(default_factory=list)
    """Invalid records still watched (leniently read: never promoted or purged)."""
    problems: dict[str, str] = field(default_factory=dict)
    """Records this tick could not handle, with the reason; every other record went on."""
    api_calls: int = 0
    """Kubernetes requests of the observation (0 when served from the watch cache)."""
    observed: str = ""
    """Where the observation came from: 'watch cache', 'lists' or 'lists (watch cache <why not>)'."""
    table_read: str = ""
    """How the table was read: 'scan', 'scan (<why>)', 'stream, no writes' or 'stream, N re-read'."""
    error: str | None = None


RECORD_ERRORS = (StoreError, *KUBE_ERRORS, TypeError, ValueError, KeyError, AttributeError, ArithmeticError)
"""What handling one record may raise on data of the wrong shape or a failed call: that record's problem."""


class HealthJob:
    def __init__(self, store: EndpointStore, api: client.ApiClient, region: str, namespaces: Iterable[str], *,
                 threshold: float = 300.0, known_regions: Iterable[str] | None = None,
                 elector: LeaseElector | None = None, request_timeout: float = REQUEST_TIMEOUT,
                 table_stream: bool = True, rescan_every: float = 300.0, watch_cache: bool = False,
                 rollout_policy: RolloutPolicy | None = None, clock: Callable[[], float] = time.time) -> None:
        self.store, self.region, self.namespaces = store, region, tuple(namespaces)
        self.api = api
        bounded = without_retries(api)
        self.apps, self.net = client.AppsV1Api(bounded), client.NetworkingV1Api(bounded)
        self.threshold, self.clock, self.elector, self.request_timeout = threshold, clock, elector, request_timeout
        self.known_regions = {region, *known_regions} if known_regions is not None else None
        """The platform's regions; unset, promotion waits for every target region and a record is purged
        only when this region is its only target (nothing else is known)."""
        self.table_stream, self.rescan_every = table_stream, rescan_every
        """Follow the table's stream between complete scans (every ``rescan_every`` s), as the runner does;
        off: scan the whole table every tick."""
        self._cache: TableCache | None = None
        self._memo: tuple[int, list[Record], dict[str, str]] | None = None
        """The records of the cache's current generation, and the items that could not be read as records."""
        self.watch_cache = watch_cache
        """Observe from a watch-backed cache (started at the first observation) while it is current."""
        self._objects: ObjectCache | None = None
        self.last_success: float | None = None
        self.rollout_policy = rollout_policy
        """The stack's default rollout policy (gco:rolloutPolicy), for records that carry none."""
        self.due: float | None = None
        """When a rollout gate next comes due by time alone (epoch seconds; see rollout.due)."""
        self.rollouts_active = False
        """Some endpoint is under a rollout policy (its gate judges readiness): ticks come sooner on changes."""

    def observe(self, report: HealthReport) -> dict[str, Observed]:
        """From the watch cache when it is ready and every stream is current (no request); otherwise
        one list per kind per namespace, as without the cache. Either way constant in the endpoints."""
        cache = self.object_cache()
        why = cache.why_not() if cache is not None else None
        if cache is not None and why is None:
            report.observed = "watch cache"
            return self.observe_cache(cache)
        report.observed = "lists" if cache is None else f"lists (watch cache {why})"
        return self.observe_lists(report)

    def object_cache(self) -> ObjectCache | None:
        """The job's watch cache, started on first use (None when the job does not use one)."""
        if not self.watch_cache:
            return None
        if self._objects is None:
            self._objects = ObjectCache(self.api, self.namespaces, (DEPLOYMENTS, INGRESSES), LABEL)
            self._objects.start()
        return self._objects

    def observe_cache(self, cache: ObjectCache) -> dict[str, Observed]:
        seen: dict[str, Observed] = {}
        for ns in self.namespaces:
            for d in cache.objects(DEPLOYMENTS, ns):
                add_deployment(seen, d)
            for i in cache.objects(INGRESSES, ns):
                add_ingress(seen, ns, i)
        return seen

    def observe_lists(self, report: HealthReport) -> dict[str, Observed]:
        seen: dict[str, Observed] = {}
        for ns in self.namespaces:
            report.api_calls += 1
            for d in self._list(self.apps.list_namespaced_deployment, ns, "Deployments"):
                add_deployment(seen, d)
            report.api_calls += 1
            for i in self._list(self.net.list_namespaced_ingress, ns, "Ingresses"):
                add_ingress(seen, ns, i)
        return seen

    def _list(self, call: Callable[..., Any], namespace: str, kind: str) -> list[Mapping[str, Any]]:
        """The objects of one list, as the API server's JSON (not the client's models)."""
        resp = call(namespace, label_selector=LABEL, _request_timeout=self.request_timeout, _preload_content=False)
        try:
            body = resp.data  # read timeouts apply to the body too; a failure closes the connection
        finally:
            resp.release_conn()
        return list_items(body, f"{kind} in {namespace}")

    def read_table(self) -> tuple[list[Record], dict[str, str]]:
        """Every record and the records that cannot be watched (complete, or StoreError).

        Validated once per table generation: while nothing is written, a tick validates nothing.
        """
        if not self.table_stream:
            items = self.store.list_endpoints()
            return read_records(items, validate_all(items, allowed_namespaces=self.namespaces))
        if self._cache is None or self._cache.store is not self.store:
            self._cache, self._memo = TableCache(self.store, rescan_every=self.rescan_every), None
        items = self._cache.read()
        if self._memo is None or self._memo[0] != self._cache.generation:
            self._memo = (self._cache.generation,
                          *read_records(items, validate_all(items, allowed_namespaces=self.namespaces)))
        _, records, problems = self._memo
        return records, dict(problems)  # the tick adds its own problems to its copy

    @property
    def last_read(self) -> str:
        """How the last table read was served (see TableCache.last_read)."""
        return self._cache.last_read if self.table_stream and self._cache is not None else "scan"

    def tick(self) -> HealthReport:
        report = HealthReport()
        if self.elector is not None and not self.elector.try_acquire_or_renew():
            return report
        report.leader = True
        try:
            records, report.problems = self.read_table()
            report.table_read = self.last_read
            observed = self.observe(report)
        except (StoreError, ObserveError, *KUBE_ERRORS) as exc:
            report.error = str(exc)
            return report
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
        self._rollouts(records, now, report)
        self.last_success = now
        return report

    def _forget_rollout(self, record: Record, report: HealthReport) -> None:
        """A record under no policy (any more) loses its rollout state: a policy added again later
        starts from what regions run then, never from this state's stale revisions."""
        state, problem = rollout.read_state(record.item)
        if problem is not None:
            return  # somebody's value we cannot name in a condition: `gco-infra rollout abort --reset`
        try:
            if self.store.clear_rollout(record.name, expected_seq=state.seq if state is not None else None):
                report.writes += 1
                report.rollouts[record.name] = "forgotten (no rollout policy)"
        except StoreError as exc:
            report.problems[record.name] = f'endpoint "{record.name}": {exc}'[:500]

    def wait(self, seconds: float, *, min_gap: float = 2.0) -> None:
        """Sleep until the next tick: ``seconds``, or sooner when a rollout gate comes due or the watch
        cache saw a Deployment or Ingress change (then at least ``min_gap`` after this call, so a burst
        of changes costs one tick per ``min_gap``). Readiness is then judged within seconds, not at the
        next ``--interval``."""
        start = time.monotonic()
        end = start + seconds
        if self.due is not None:
            end = min(end, start + max(min_gap, self.due - self.clock() + 0.05))
        cache = self._objects if self.rollouts_active else None  # no policy anywhere: --interval, as always
        while (left := end - time.monotonic()) > 0:
            if cache is None:
                time.sleep(left)
                return
            if cache.changed.wait(left):
                cache.changed.clear()
                time.sleep(max(0.0, min(end, start + min_gap) - time.monotonic()))
                return

    def close(self) -> None:
        """Stop the watch cache's streams (if any)."""
        if self._objects is not None:
            self._objects.stop()
            self._objects = None

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
            report.statuses[record.name] = decision.status
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
                    if regions and all(ep.status_in(r).state == "running" for r in regions) \
                            and self._rolled_out(record, regions):
                        if self.store.set_desired_state(ep.name, "running", expected="deploying"):
                            report.promoted.append(ep.name)
                elif purge_blocker(record, region=self.region, known_regions=self.known_regions or {self.region},
                                   objects_here=observed.get(ep.name, Observed()).seen) is None:
                    if self.store.purge(ep.name, expected_updated_at=ep.updated_at):
                        report.purged.append(ep.name)
            except StoreError as exc:
                report.problems[ep.name] = f'endpoint "{ep.name}": {exc}'[:500]

    def _rolled_out(self, record: Record, regions: list[str]) -> bool:
        """Under a rollout policy, every region runs the record's current revision (a region still held
        on an older one reports running too)."""
        ep = record.endpoint
        if ep is None or rollout.policy_for(ep, self.rollout_policy) is None:
            return True
        current = rollout.spec_revision(ep)
        return all(ep.status_in(r).revision == current for r in regions)

    def _rollouts(self, records: Iterable[Record], now: float, report: HealthReport) -> None:
        """Move every rollout on by its gate (rollout.step), from the table's statuses of all regions.

        Any region's job may take a step; the write is conditional on the state it read, so of two
        jobs that judged the same gate one writes and the other finds the state changed.
        """
        self.due, self.rollouts_active = None, False
        for record in records:
            ep = record.endpoint
            if ep is None:
                continue
            policy = rollout.policy_for(ep, self.rollout_policy)
            if policy is None:
                if record.item.get(rollout.ATTRIBUTE) is not None and self._acting():
                    self._forget_rollout(record, report)
                continue
            if not self._acting():
                return
            state, problem = rollout.read_state(record.item)
            if problem is not None:
                report.problems[ep.name] = (f'endpoint "{ep.name}": {problem}; its regions keep what they run '
                                            f"(`gco-infra rollout abort {ep.name}` starts over)")
                continue
            if ep.name in report.statuses:  # what this tick just wrote for this region, not what it read
                ep = replace(ep, region_status={**ep.region_status,
                                                **region_statuses({self.region: report.statuses[ep.name]})})
            try:
                step = rollout.step(ep, policy, state, endpoint_to_item(ep)["spec"], now)
                after = state
                if step.state is not None and self.store.write_rollout(
                        ep.name, rollout.state_to_item(step.state), expected_seq=state.seq if state is not None else None):
                    report.writes += 1
                    report.rollouts[ep.name] = step.event or "written"
                    after = step.state
                when = rollout.due(ep, policy, after)
                if when is not None and (self.due is None or when < self.due):
                    self.due = when
                self.rollouts_active = True  # a change may start a rollout: its first wave is judged at once
            except RECORD_ERRORS as exc:
                report.problems[ep.name] = f'endpoint "{ep.name}": rollout: {type(exc).__name__}: {exc}'[:500]


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


__all__ = ["HealthJob", "HealthReport", "LeaseElector", "ObserveError", "add_deployment", "add_ingress", "list_items",
           "serve_liveness", "job_is_healthy", "without_retries"]
