"""Drift watch: which endpoints' Kubernetes objects were changed or deleted by anyone but our own
(Pulumi) updates, so the runner can refresh and update just those endpoints within seconds instead
of waiting for the next full reconcile (which stays the backstop).

One LIST per kind and namespace at start, then a WATCH from its resourceVersion (with bookmarks);
a new LIST only after the watch expires (410 Gone) or keeps failing. Steady state makes no list
calls.

Attribution rests on server-side apply's managedFields. pulumi-kubernetes applies each object as
field manager ``pulumi-kubernetes-<suffix>``; a foreign write that changes a field we own takes that
field's ownership away from us. So a MODIFIED object is drift when the set of fields our managers
own shrank since we last saw it and the newest write was not ours. Adding fields we never owned
(finalizers, other controllers' annotations, status) is not drift, nor is the HPA taking
``spec.replicas`` through the scale subresource, nor our own apply that stops declaring a field.

A deletion carries no author: our own deletes (an endpoint stopped or removed, a replaced object)
and the health job withdrawing an Ingress are reported as ``deleted`` too. A targeted refresh and
update of such an endpoint changes nothing, so the runner may run it or skip endpoints whose
deleted object it no longer declares.
"""

from __future__ import annotations

import json
import logging
import random
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

log = logging.getLogger(__name__)

OUR_MANAGER_PREFIX = "pulumi-kubernetes"
HPA_MANAGER = "kube-controller-manager"
REPLICAS: tuple[str, ...] = ("f:spec", "f:replicas")
ENDPOINT_LABEL = "app"
DEFAULT_SELECTOR = "gco.io/type=inference"

Path = tuple[str, ...]


@dataclass(frozen=True)
class Kind:
    kind: str
    path: str
    """Collection path with ``{ns}`` for the namespace."""


KINDS = (
    Kind("Deployment", "/apis/apps/v1/namespaces/{ns}/deployments"),
    Kind("Service", "/api/v1/namespaces/{ns}/services"),
    Kind("Ingress", "/apis/networking.k8s.io/v1/namespaces/{ns}/ingresses"),
    Kind("HorizontalPodAutoscaler", "/apis/autoscaling/v2/namespaces/{ns}/horizontalpodautoscalers"),
)


@dataclass(frozen=True)
class Drift:
    kind: str
    namespace: str
    name: str
    reason: str
    """``deleted`` or ``changed by <manager>``."""
    seen: float
    """time.monotonic() when the watch saw it."""


# ---- attribution (pure) -----------------------------------------------------------------------------------

def field_paths(fields: Mapping[str, Any] | None, prefix: Path = ()) -> frozenset[Path]:
    """The leaf paths of a managedFields ``fieldsV1`` tree (``.`` marks the node itself)."""
    out: set[Path] = set()
    for key, sub in (fields or {}).items():
        path = prefix + (key,)
        if isinstance(sub, Mapping) and sub:
            out |= field_paths(sub, path)
        else:
            out.add(path)
    return frozenset(out)


def is_ours(entry: Mapping[str, Any]) -> bool:
    return str(entry.get("manager") or "").startswith(OUR_MANAGER_PREFIX)


def has_our_manager(managed_fields: Sequence[Mapping[str, Any]]) -> bool:
    return any(is_ours(e) for e in managed_fields)


def owned_by_us(managed_fields: Sequence[Mapping[str, Any]]) -> frozenset[Path]:
    """Fields our managers own by apply on the object itself (not on a subresource)."""
    out: set[Path] = set()
    for e in managed_fields:
        if is_ours(e) and e.get("operation") == "Apply" and not e.get("subresource"):
            out |= field_paths(e.get("fieldsV1"))
    return frozenset(out)


def newest_writer(managed_fields: Sequence[Mapping[str, Any]]) -> Mapping[str, Any] | None:
    """The entry of the newest write that could have touched our fields; among entries of the same
    (one-second) time a foreign one wins. Status subresource writes never touch the fields we
    declare, so they do not count."""
    candidates = [e for e in managed_fields if e.get("subresource") != "status"]
    if not candidates:
        return None
    newest = max(str(e.get("time") or "") for e in candidates)
    at = [e for e in candidates if str(e.get("time") or "") == newest]
    return next((e for e in at if not is_ours(e)), at[0])


def describe(entry: Mapping[str, Any] | None) -> str:
    if entry is None:
        return "an unknown manager"
    sub = entry.get("subresource")
    return f"{entry.get('manager') or '?'}" + (f" ({sub})" if sub else "")


def judge(before: frozenset[Path] | None, managed_fields: Sequence[Mapping[str, Any]]
          ) -> tuple[frozenset[Path] | None, str | None]:
    """One observation of an object against the last one of the same object.

    ``before``: the fields our managers owned last time (None: never seen with our managers).
    Returns the new baseline (None: not ours, ignore) and the drift reason, if any."""
    now = owned_by_us(managed_fields)
    if before is None:
        return (now if has_our_manager(managed_fields) else None), None
    lost = before - now
    if not lost:
        return now, None
    newest = newest_writer(managed_fields)
    # Writes through the scale subresource leave an entry without a time (seen on kube-apiserver 1.37): a
    # foreign untimed entry that now owns a field we lost took it, at an unknown (so: newest) time.
    taker = next((e for e in managed_fields if not e.get("time") and not is_ours(e)
                  and e.get("subresource") != "status" and field_paths(e.get("fieldsV1")) & lost), None)
    writer = newest if newest is not None and not is_ours(newest) else taker
    if writer is None and newest is not None:
        return now, None  # our own apply stopped declaring something
    if (writer is not None and lost <= {REPLICAS} and writer.get("manager") == HPA_MANAGER
            and writer.get("subresource") == "scale"):
        return now, None  # the HPA scaling the Deployment
    return now, f"changed by {describe(writer)}"


ObjectKey = tuple[str, str, str]
"""(kind, namespace, name) of an object."""

RECORDED_TYPES = {"kubernetes:apps/v1:Deployment": "Deployment", "kubernetes:core/v1:Service": "Service",
                  "kubernetes:networking.k8s.io/v1:Ingress": "Ingress",
                  "kubernetes:autoscaling/v2:HorizontalPodAutoscaler": "HorizontalPodAutoscaler"}


def recorded_objects(resources: Iterable[Mapping[str, Any]]) -> dict[ObjectKey, tuple[str, frozenset[Path] | None]]:
    """The objects a checkpoint holds (``export_stack().deployment["resources"]``), as its last
    operation saw them: (kind, namespace, name) -> (endpoint, the fields our managers owned then).

    The baseline against which a runner's start judges what happened while no runner watched. An
    object without one (None) counts as changed: its metadata is kept secret, no field of it is
    ours by apply (imported, say), or the watch does not list its kind."""
    out: dict[ObjectKey, tuple[str, frozenset[Path] | None]] = {}
    for res in resources:
        token = str(res.get("type"))
        parent = str(res.get("parent", ""))
        if not token.startswith("kubernetes:") or "::gco:inference:Endpoint::" not in parent:
            continue  # the stack, the provider, the endpoints' components
        kind = RECORDED_TYPES.get(token, token)  # a kind the watch does not list: no baseline, below
        endpoint = parent.rpartition("::")[2]
        outputs = res.get("outputs") if isinstance(res.get("outputs"), Mapping) else {}
        meta = outputs.get("metadata")
        name = str(res.get("urn", "")).rpartition("::")[2]
        owned = owned_by_us(meta["managedFields"]) if (
            isinstance(meta, Mapping) and isinstance(meta.get("managedFields"), list)) else frozenset()
        if token not in RECORDED_TYPES or not owned or not isinstance(meta, Mapping):
            out[(kind, str(res.get("id", "")).partition("/")[0], name)] = (endpoint, None)
            continue
        out[(kind, str(meta.get("namespace") or ""), str(meta.get("name") or name))] = (endpoint, owned)
    return out


def judge_since(recorded: Mapping[ObjectKey, tuple[str, frozenset[Path] | None]],
                listed: Mapping[ObjectKey, Sequence[Mapping[str, Any]]], now: float) -> dict[str, Drift]:
    """Endpoint -> the first drift of its recorded objects, judged from a list (object -> its
    managedFields) against what the stack recorded: gone is deleted; a field our managers owned that
    another writer took is a change (the HPA scaling excepted, as for the watch); an object without a
    readable baseline counts as changed, so that its endpoint is refreshed."""
    out: dict[str, Drift] = {}
    for (kind, namespace, name), (endpoint, before) in sorted(recorded.items()):
        managed = listed.get((kind, namespace, name))
        if before is None:
            reason: str | None = "unknown to the checkpoint (no fields of ours recorded)"
        elif managed is None:
            reason = "deleted"
        else:
            reason = judge(before, managed)[1]
        if reason:
            out.setdefault(endpoint, Drift(kind, namespace, name, reason, now))
    return out


def parse_selector(selector: str) -> dict[str, str] | None:
    """``k=v,k2==v2`` as a dict; None for anything richer (then it cannot be checked here)."""
    out: dict[str, str] = {}
    for term in filter(None, (t.strip() for t in selector.split(","))):
        key, sep, value = term.partition("==") if "==" in term else term.partition("=")
        if not sep or "!" in key or not key.strip():
            return None
        out[key.strip()] = value.strip()
    return out


def deleted_reason(obj: Mapping[str, Any], before: frozenset[Path] | None, selector: str) -> str | None:
    """A DELETED event: the object was deleted, or someone changed its labels so that it left the
    selection. Objects that were never ours are ignored (None)."""
    meta = obj.get("metadata") or {}
    managed = meta.get("managedFields") or []
    if before is None and not has_our_manager(managed):
        return None
    wanted = parse_selector(selector)
    labels = meta.get("labels") or {}
    if wanted is not None and not meta.get("deletionTimestamp") and any(labels.get(k) != v for k, v in wanted.items()):
        return f"changed by {describe(newest_writer(managed))} (no longer selected by {selector})"
    return "deleted"


# ---- the watch (I/O) --------------------------------------------------------------------------------------

class _Gone(Exception):
    """The resourceVersion is too old (410): list again."""


def request(api, path: str, query: list[tuple[str, Any]], read_timeout: float):
    """A GET of a collection (a list, or a watch with ``watch=true``) as an unread JSON response;
    410 Gone raises _Gone. Shared by the drift watch and the health job's cache (kubecache)."""
    from kubernetes.client import ApiException

    try:
        return api.call_api(
            path, "GET", query_params=query, header_params={"Accept": "application/json"},
            auth_settings=["BearerToken"], _return_http_data_only=True, _preload_content=False,
            _request_timeout=(10, read_timeout))
    except ApiException as exc:
        if exc.status == 410:
            raise _Gone() from exc
        raise


@dataclass
class _Stream:
    kind: Kind
    namespace: str
    rv: str | None = None
    known: dict[str, tuple[str, str, frozenset[Path]]] = field(default_factory=dict)
    """uid -> (object name, endpoint, fields our managers own)."""
    listed: bool = False
    response: Any = None

    @property
    def key(self) -> str:
        return f"{self.kind.kind}/{self.namespace}"


class DriftWatch:
    """Watches the inference objects of some namespaces and collects drift per endpoint.

    Threads are daemons; ``stop()`` shuts the open streams down and returns promptly. Give it an
    ApiClient of its own (``watch_api_for``): each stream holds one pooled connection."""

    def __init__(self, api, namespaces: Iterable[str], *, on_change: Callable[[], None] | None = None,
                 label_selector: str = DEFAULT_SELECTOR, timeout_seconds: int = 45,
                 backoff: tuple[float, float] = (0.5, 30.0)) -> None:
        self.api = api
        self.label_selector = label_selector
        self.on_change = on_change
        self.timeout_seconds = timeout_seconds
        self.backoff = backoff
        self.lists = 0
        self.watches = 0
        self.events = 0
        self._errors: dict[str, str] = {}
        self._streams = [_Stream(k, ns) for ns in dict.fromkeys(namespaces) for k in KINDS]
        self._drift: dict[str, Drift] = {}
        self._first: dict[ObjectKey, list[Mapping[str, Any]]] | None = {}
        """The managedFields of every object in the first lists, kept until forget_first_lists()."""
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    # -- public --
    @property
    def errors(self) -> dict[str, str]:
        """Last error per stream (``Kind/namespace``), for logging; dropped once that stream works again."""
        with self._lock:
            return dict(self._errors)

    @property
    def ready(self) -> bool:
        """True once every initial list is done (drift before that is invisible)."""
        return bool(self._streams) and all(s.listed for s in self._streams)

    def start(self) -> None:
        if self._threads:
            return
        self._stop.clear()
        for s in self._streams:
            t = threading.Thread(target=self._run, args=(s,), name=f"drift-watch {s.key}", daemon=True)
            self._threads.append(t)
            t.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        for s in self._streams:
            self._shutdown(s)
        deadline = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
        self._threads = []

    def objects(self) -> dict[tuple[str, str, str], str]:
        """(kind, namespace, name) -> endpoint, for every object written by our managers that exists now."""
        out = {}
        for s in self._streams:
            for name, endpoint, _ in dict(s.known).values():
                out[(s.kind.kind, s.namespace, name)] = endpoint
        return out

    def first_lists(self) -> dict[ObjectKey, list[Mapping[str, Any]]] | None:
        """(kind, namespace, name) -> managedFields of every selected object as the first lists saw
        it; None before every first list is done, or once forgotten. What changed after a first list
        is the watch's to judge; what changed before it, a runner's start judges from this
        (judge_since)."""
        with self._lock:
            return dict(self._first) if self._first is not None and self.ready else None

    def forget_first_lists(self) -> None:
        with self._lock:
            self._first = None

    def take(self) -> dict[str, Drift]:
        """Endpoint name -> its first drift since the last take; clears them."""
        with self._lock:
            out, self._drift = self._drift, {}
        return out

    # -- per stream --
    def _run(self, s: _Stream) -> None:
        delay, failures = self.backoff[0], 0
        while not self._stop.is_set():
            try:
                if not s.listed or s.rv is None:
                    self._list(s)
                self._watch(s)
                delay, failures = self.backoff[0], 0
            except _Gone:
                s.rv = None
                failures += 1
                if failures > 1:  # a fresh list should not be gone at once: do not spin
                    self._stop.wait(self._jitter(delay))
                    delay = min(delay * 2, self.backoff[1])
            except Exception as exc:  # noqa: BLE001 -- a stream never dies; the error is reported
                if self._stop.is_set():
                    break
                failures += 1
                with self._lock:
                    self._errors[s.key] = f"{type(exc).__name__}: {exc}"
                log.debug("drift watch %s failed: %s", s.key, exc)
                if failures >= 3:
                    s.rv = None  # resuming keeps failing: start over from a list
                self._stop.wait(self._jitter(delay))
                delay = min(delay * 2, self.backoff[1])
            finally:
                s.response = None

    def _jitter(self, delay: float) -> float:
        return delay * random.uniform(0.8, 1.2)

    def _request(self, s: _Stream, query: list[tuple[str, Any]], read_timeout: float):
        return request(self.api, s.kind.path.format(ns=s.namespace), query, read_timeout)

    def _list(self, s: _Stream) -> None:
        with self._lock:
            self.lists += 1
        resp = self._request(s, [("labelSelector", self.label_selector)], 120)
        s.response = resp
        try:
            body = json.loads(resp.data)
        finally:
            resp.release_conn()
        self._listed(s, body)
        with self._lock:
            self._errors.pop(s.key, None)

    def _listed(self, s: _Stream, body: Mapping[str, Any]) -> None:
        """A list: the first one is the baseline; a later one (after 410) is judged against what was
        seen before it, and what vanished meanwhile was deleted."""
        seen: set[str] = set()
        first = not s.listed
        for obj in body.get("items") or []:
            meta = obj.get("metadata") or {}
            uid = meta.get("uid")
            if uid:
                seen.add(uid)
                self._observe(s, obj)
                if first:
                    with self._lock:
                        if self._first is not None:
                            self._first[(s.kind.kind, s.namespace, meta.get("name", ""))] = meta.get("managedFields") or []
        for uid in set(s.known) - seen:
            name, endpoint, _ = s.known.pop(uid)
            self._record(endpoint, Drift(s.kind.kind, s.namespace, name, "deleted", time.monotonic()))
        s.rv = (body.get("metadata") or {}).get("resourceVersion")
        s.listed = True

    def _watch(self, s: _Stream) -> None:
        with self._lock:
            self.watches += 1
        query = [("labelSelector", self.label_selector), ("watch", "true"), ("allowWatchBookmarks", "true"),
                 ("timeoutSeconds", self.timeout_seconds)] + ([("resourceVersion", s.rv)] if s.rv else [])
        resp = self._request(s, query, self.timeout_seconds + 30)
        s.response = resp
        if self._stop.is_set():
            self._shutdown(s)
            return
        with self._lock:
            self._errors.pop(s.key, None)
        try:
            for line in _lines(resp):
                self._event(s, json.loads(line))
                if self._stop.is_set():
                    return
        finally:
            resp.release_conn()

    def _event(self, s: _Stream, event: Mapping[str, Any]) -> None:
        kind, obj = event.get("type"), event.get("object") or {}
        meta = obj.get("metadata") or {}
        if kind == "ERROR":
            if obj.get("code") == 410:
                raise _Gone()
            raise RuntimeError(f"watch error: {obj.get('code')} {obj.get('message')}")
        if meta.get("resourceVersion"):
            s.rv = meta["resourceVersion"]
        if kind == "BOOKMARK":
            return
        with self._lock:
            self.events += 1
        if kind in ("ADDED", "MODIFIED"):
            self._observe(s, obj)
        elif kind == "DELETED":
            uid = meta.get("uid", "")
            before = s.known.pop(uid, None)
            endpoint = (meta.get("labels") or {}).get(ENDPOINT_LABEL) or (before[1] if before else None)
            reason = deleted_reason(obj, before[2] if before else None, self.label_selector)
            if endpoint and reason:
                self._record(endpoint, Drift(s.kind.kind, s.namespace, meta.get("name", ""), reason, time.monotonic()))

    def _observe(self, s: _Stream, obj: Mapping[str, Any]) -> None:
        """An object as it is now against the last time it was seen (never seen: a baseline)."""
        meta = obj.get("metadata") or {}
        uid, name = meta.get("uid", ""), meta.get("name", "")
        endpoint = (meta.get("labels") or {}).get(ENDPOINT_LABEL)
        if not endpoint:
            s.known.pop(uid, None)
            return
        prior = s.known.get(uid)
        before = prior[2] if prior else None
        baseline, reason = judge(before, meta.get("managedFields") or [])
        if baseline is None:
            s.known.pop(uid, None)
        else:
            s.known[uid] = (name, endpoint, baseline)
        if reason:
            self._record(endpoint, Drift(s.kind.kind, s.namespace, name, reason, time.monotonic()))

    def _record(self, endpoint: str, drift: Drift) -> None:
        with self._lock:
            self._drift.setdefault(endpoint, drift)
        log.info("drift: endpoint %s: %s %s/%s %s", endpoint, drift.kind, drift.namespace, drift.name, drift.reason)
        if self.on_change is not None:
            try:
                self.on_change()
            except Exception as exc:  # noqa: BLE001 -- the runner's callback must not kill the stream
                with self._lock:
                    self._errors["on_change"] = f"{type(exc).__name__}: {exc}"

    def _shutdown(self, s: _Stream) -> None:
        resp = s.response
        if resp is None:
            return
        try:
            resp.shutdown()  # unblocks a read in progress on another thread
        except Exception:  # noqa: BLE001
            pass


def _lines(resp) -> Iterator[bytes]:
    """Lines of a streamed (chunked) watch response as they arrive."""
    buf = b""
    for chunk in resp.stream(amt=None, decode_content=False):
        *lines, buf = (buf + chunk).split(b"\n")
        yield from (line for line in lines if line.strip())
    if buf.strip():
        yield buf


def watch_api_for(settings, *, pool_size: int = 32):
    """An ApiClient for the drift watch of a runner stack, or None where there is none.

    In a pod: its ServiceAccount. A kubeconfig stack: that kubeconfig and context. An EKS stack run
    outside its cluster: None -- building a client would need the AWS SDK and the cluster's endpoint;
    the watch is then not available and the periodic full reconcile still repairs drift."""
    from kubernetes import client, config

    from .program import in_cluster

    cfg = client.Configuration()
    if in_cluster():
        config.load_incluster_config(client_configuration=cfg)
    elif settings.kubeconfig and not settings.cluster_name:
        config.load_kube_config(config_file=settings.kubeconfig, context=settings.kube_context,
                                client_configuration=cfg)
    else:
        return None
    cfg.connection_pool_maxsize = max(cfg.connection_pool_maxsize or 0, pool_size)  # a connection per stream
    return client.ApiClient(configuration=cfg)
