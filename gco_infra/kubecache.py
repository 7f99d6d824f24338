"""A watch-backed cache of some kinds of Kubernetes objects, as the API server's raw JSON.

One LIST per kind and namespace at start, then a WATCH from its resourceVersion (with bookmarks,
``timeoutSeconds`` so each watch ends and resumes); a new LIST only after 410 Gone or a failure of
the stream, so a stream that failed is current again only once a fresh list is in (not while a
resumed watch replays what it missed). Steady state makes no request at all: readers take the
objects from memory.

Readers must know when the view can be trusted, so the cache says so: ``ready`` once every initial
list is done, ``healthy`` while, in addition, no stream is failing or re-listing and each has heard
from the API server (an event, a bookmark, a watch opened or ended) within ``stale_after`` seconds.
A connection that hangs without an error therefore stops counting as current too. A reader that
finds the cache not healthy reads the API server itself.
"""

from __future__ import annotations

import copy
import json
import logging
import random
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping

from .drift import Kind, _Gone, _lines, request

log = logging.getLogger(__name__)

DEPLOYMENTS = Kind("Deployment", "/apis/apps/v1/namespaces/{ns}/deployments")
INGRESSES = Kind("Ingress", "/apis/networking.k8s.io/v1/namespaces/{ns}/ingresses")


@dataclass
class _Stream:
    kind: Kind
    namespace: str
    rv: str | None = None
    objects: dict[str, Mapping[str, Any]] = field(default_factory=dict)
    """Object name -> the object as last seen."""
    listed: bool = False
    current: bool = False
    """The last list or watch request succeeded and nothing failed since."""
    heard: float = 0.0
    """monotonic() when the API server last answered on this stream."""
    response: Any = None

    @property
    def key(self) -> str:
        return f"{self.kind.kind}/{self.namespace}"


class ObjectCache:
    """The objects of ``kinds`` in ``namespaces`` matching ``label_selector``, kept by (namespace, name).

    Threads are daemons, one per kind and namespace, started by ``start()``; ``stop()`` shuts the open
    streams down and returns promptly. It copies ``api``'s configuration into a client of its own with
    a pooled connection per stream and no urllib3 retries.
    """

    def __init__(self, api, namespaces: Iterable[str], kinds: Iterable[Kind], label_selector: str, *,
                 timeout_seconds: int = 45, stale_after: float | None = None,
                 backoff: tuple[float, float] = (0.5, 30.0), monotonic: Callable[[], float] = time.monotonic) -> None:
        self.label_selector = label_selector
        self.timeout_seconds = timeout_seconds
        self.stale_after = stale_after if stale_after is not None else timeout_seconds + 15.0
        """A stream silent for longer than this is not current (a watch ends every ``timeout_seconds``)."""
        self.backoff = backoff
        self.monotonic = monotonic
        self._streams = [_Stream(k, ns) for ns in dict.fromkeys(namespaces) for k in dict.fromkeys(kinds)]
        self.api = _own_client(api, len(self._streams)) if api is not None else None
        self.lists = 0
        self.watches = 0
        self.events = 0
        self._errors: dict[str, str] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.changed = threading.Event()
        """Set on every added, changed or deleted object: a reader may wait on it instead of polling."""

    # -- public --
    @property
    def ready(self) -> bool:
        """True once every initial list is done."""
        return bool(self._streams) and all(s.listed for s in self._streams)

    @property
    def healthy(self) -> bool:
        """Ready, running, and every stream current and heard from within ``stale_after`` seconds."""
        now = self.monotonic()
        with self._lock:
            return (bool(self._threads) and not self._stop.is_set() and self.ready
                    and all(s.current and now - s.heard < self.stale_after for s in self._streams))

    @property
    def errors(self) -> dict[str, str]:
        """Last error per stream (``Kind/namespace``); dropped once that stream works again."""
        with self._lock:
            return dict(self._errors)

    def why_not(self) -> str | None:
        """Why the cache may not be used now (None: it may)."""
        if not self._threads or self._stop.is_set():
            return "not running"
        if not self.ready:
            return "initial lists not done"
        if self.healthy:
            return None
        errors = self.errors
        if not errors:
            return "stream not current"
        return "stream failing: " + "; ".join(f"{k}: {v}" for k, v in sorted(errors.items()))

    def objects(self, kind: Kind, namespace: str) -> list[Mapping[str, Any]]:
        """The objects of one kind in one namespace, by name (the order a list returns them in)."""
        for s in self._streams:
            if s.kind == kind and s.namespace == namespace:
                with self._lock:
                    return [s.objects[name] for name in sorted(s.objects)]
        raise KeyError(f"{kind.kind} in {namespace} is not cached")

    def start(self) -> None:
        if self._threads:
            return
        self._stop.clear()
        for s in self._streams:
            t = threading.Thread(target=self._run, args=(s,), name=f"object-cache {s.key}", daemon=True)
            self._threads.append(t)
            t.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        for s in self._streams:
            _shutdown(s)
        deadline = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
        with self._lock:
            self._threads = []

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
                self._failed(s, None)
                s.rv = None
                failures += 1
                if failures > 1:  # a fresh list should not be gone at once: do not spin
                    self._stop.wait(self._jitter(delay))
                    delay = min(delay * 2, self.backoff[1])
            except Exception as exc:  # noqa: BLE001 -- a stream never dies; it is reported and not current
                if self._stop.is_set():
                    break
                failures += 1
                self._failed(s, f"{type(exc).__name__}: {exc}")
                log.debug("object cache %s failed: %s", s.key, exc)
                s.rv = None  # start over from a list
                self._stop.wait(self._jitter(delay))
                delay = min(delay * 2, self.backoff[1])
            finally:
                s.response = None

    def _jitter(self, delay: float) -> float:
        return delay * random.uniform(0.8, 1.2)

    def _failed(self, s: _Stream, error: str | None) -> None:
        with self._lock:
            s.current = False
            if error is not None:
                self._errors[s.key] = error[:300]

    def _ok(self, s: _Stream) -> None:
        with self._lock:
            s.current, s.heard = True, self.monotonic()
            self._errors.pop(s.key, None)

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

    def _listed(self, s: _Stream, body: Any) -> None:
        """A list replaces everything known of the stream (what vanished meanwhile is gone)."""
        items = body.get("items", []) if isinstance(body, Mapping) else None
        items = [] if items is None and isinstance(body, Mapping) else items  # an empty list's items: null
        if not isinstance(items, list) or not all(isinstance(i, Mapping) for i in items):
            raise ValueError(f"listing {s.key}: the answer is not a list of objects")
        objects = {}
        for obj in items:
            name = _name(obj)
            if name:
                objects[name] = obj
        rv = _field(body, "metadata").get("resourceVersion")
        with self._lock:
            s.objects, s.rv, s.listed = objects, rv, True
        self._ok(s)

    def _watch(self, s: _Stream) -> None:
        with self._lock:
            self.watches += 1
        query = [("labelSelector", self.label_selector), ("watch", "true"), ("allowWatchBookmarks", "true"),
                 ("timeoutSeconds", self.timeout_seconds)] + ([("resourceVersion", s.rv)] if s.rv else [])
        resp = self._request(s, query, self.timeout_seconds + 15)
        s.response = resp
        if self._stop.is_set():
            _shutdown(s)
            return
        self._ok(s)
        try:
            for line in _lines(resp):
                self._event(s, json.loads(line))
                if self._stop.is_set():
                    return
        finally:
            resp.release_conn()
        self._ok(s)  # the watch ended as asked (timeoutSeconds); it resumes from s.rv

    def _event(self, s: _Stream, event: Any) -> None:
        if not isinstance(event, Mapping):
            raise ValueError(f"watch {s.key}: an event is not an object")
        kind, obj = event.get("type"), event.get("object")
        if not isinstance(obj, Mapping):
            raise ValueError(f"watch {s.key}: a {kind} event without an object")
        if kind == "ERROR":
            if obj.get("code") == 410:
                raise _Gone()
            raise RuntimeError(f"watch error: {obj.get('code')} {obj.get('message')}")
        if kind not in ("ADDED", "MODIFIED", "DELETED", "BOOKMARK"):
            raise ValueError(f"watch {s.key}: unknown event type {kind!r}")
        rv = _field(obj, "metadata").get("resourceVersion")
        name = _name(obj)
        with self._lock:
            if rv:
                s.rv = rv
            s.heard = self.monotonic()
            if kind == "BOOKMARK":
                return
            self.events += 1
            if not name:
                return
            if kind == "DELETED":
                s.objects.pop(name, None)
            else:
                s.objects[name] = obj
        self.changed.set()


def _field(obj: Any, key: str) -> Mapping[str, Any]:
    value = obj.get(key) if isinstance(obj, Mapping) else None
    return value if isinstance(value, Mapping) else {}


def _name(obj: Mapping[str, Any]) -> str | None:
    name = _field(obj, "metadata").get("name")
    return name if isinstance(name, str) and name else None


def _shutdown(s: _Stream) -> None:
    resp = s.response
    if resp is None:
        return
    try:
        resp.shutdown()  # unblocks a read in progress on another thread
    except Exception:  # noqa: BLE001
        pass


def _own_client(api, streams: int):
    """The same cluster and credentials in a client of its own: a pooled connection per stream, no retries."""
    from kubernetes import client

    cfg = copy.copy(api.configuration)
    cfg.retries = False
    cfg.connection_pool_maxsize = max(cfg.connection_pool_maxsize or 0, streams + 2)
    own = client.ApiClient(cfg)
    own.default_headers.update(api.default_headers)
    return own


__all__ = ["DEPLOYMENTS", "INGRESSES", "ObjectCache"]
