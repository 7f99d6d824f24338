"""The watch cache on scripted API server answers: what it keeps after each kind of event, a 410
re-list, and when it says it may (not) be used. The real API server is in tests/e2e."""

from __future__ import annotations

import json
import threading
import time

import pytest
import urllib3

from gco_infra.kubecache import DEPLOYMENTS, INGRESSES, ObjectCache, _Gone

SELECTOR = "gco.io/type=inference"


def obj(name, rv, **spec):
    return {"metadata": {"name": name, "namespace": "ns", "resourceVersion": rv, "labels": {"app": name}},
            "spec": spec}


def listing(rv, *items):
    return {"kind": "DeploymentList", "metadata": {"resourceVersion": rv}, "items": list(items)}


def event(kind, o):
    return {"type": kind, "object": o}


class Response:
    """A list's body, or a watch's lines; a watch with ``idle`` stays open until shut down, and then
    fails as a connection closed under a read does."""

    def __init__(self, body=None, events=(), idle=False, split=7):
        self.data = json.dumps(body).encode() if body is not None else b""
        raw = b"".join(json.dumps(e).encode() + b"\n" for e in events)
        self.chunks = [raw[i:i + split] for i in range(0, len(raw), split)]  # lines split across chunks
        self.idle = idle
        self.closed = threading.Event()

    def stream(self, amt=None, decode_content=False):
        yield from self.chunks
        if self.idle:
            self.closed.wait(30)
            raise urllib3.exceptions.ProtocolError("connection closed")

    def release_conn(self):
        pass

    def shutdown(self):
        self.closed.set()


class Api:
    """Answers each request with the next scripted answer; once the script runs out, an empty list or
    an idle watch."""

    def __init__(self, *script):
        self.script = list(script)
        self.queries: list[dict] = []
        self.fail: Exception | None = None
        self.open: list[Response] = []
        self.lock = threading.Lock()

    def call_api(self, path, method, query_params=(), **_):
        with self.lock:
            self.queries.append({"path": path, **dict(query_params)})
            if self.fail is not None:
                raise self.fail
            watch = dict(query_params).get("watch") == "true"
            answer = self.script.pop(0) if self.script else Response(idle=True) if watch else Response(listing("1"))
        if isinstance(answer, Exception):
            raise answer
        self.open.append(answer)
        return answer

    def watches(self):
        return [q for q in self.queries if q.get("watch") == "true"]


def started(api, **kw):
    cache = ObjectCache(None, ["ns"], [DEPLOYMENTS], SELECTOR, backoff=(0.01, 0.05), **kw)
    cache.api = api
    cache.start()
    return cache


def until(check, what, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def names(cache, kind=DEPLOYMENTS):
    return {o["metadata"]["name"]: o["metadata"]["resourceVersion"] for o in cache.objects(kind, "ns")}


def test_events_keep_the_newest_object_by_name_and_a_relist_replaces_them():
    cache = ObjectCache(None, ["ns"], [DEPLOYMENTS, INGRESSES], SELECTOR)
    s = cache._streams[0]
    cache._listed(s, listing("10", obj("b", "9"), obj("a", "8")))
    assert s.listed and s.rv == "10" and names(cache) == {"a": "8", "b": "9"}
    assert [o["metadata"]["name"] for o in cache.objects(DEPLOYMENTS, "ns")] == ["a", "b"]  # a list's order
    assert not cache.ready  # the Ingresses are not listed yet
    cache._event(s, event("ADDED", obj("c", "11")))
    cache._event(s, event("MODIFIED", obj("a", "12", replicas=3)))
    cache._event(s, event("DELETED", obj("b", "13")))
    cache._event(s, event("DELETED", obj("never-seen", "14")))
    assert names(cache) == {"a": "12", "c": "11"} and cache.objects(DEPLOYMENTS, "ns")[0]["spec"] == {"replicas": 3}
    cache._event(s, event("BOOKMARK", {"kind": "Deployment", "metadata": {"resourceVersion": "20"}}))
    assert s.rv == "20" and cache.events == 4 and names(cache) == {"a": "12", "c": "11"}
    with pytest.raises(_Gone):
        cache._event(s, event("ERROR", {"kind": "Status", "code": 410, "reason": "Expired"}))
    cache._listed(s, listing("30", obj("c", "25"), obj("d", "26")))  # a and b went meanwhile
    assert names(cache) == {"c": "25", "d": "26"} and s.rv == "30"
    assert cache.objects(INGRESSES, "ns") == []
    with pytest.raises(KeyError):
        cache.objects(INGRESSES, "other")


@pytest.mark.parametrize("bad", [
    event("ERROR", {"kind": "Status", "code": 500, "message": "etcd is down"}),
    event("SOMETHING", obj("a", "1")),
    {"type": "ADDED", "object": "not an object"},
    ["not", "an", "event"],
])
def test_an_event_it_cannot_apply_fails_the_stream(bad):
    cache = ObjectCache(None, ["ns"], [DEPLOYMENTS], SELECTOR)
    s = cache._streams[0]
    cache._listed(s, listing("1", obj("a", "1")))
    with pytest.raises((RuntimeError, ValueError)):
        cache._event(s, bad)
    assert names(cache) == {"a": "1"}


@pytest.mark.parametrize("body", [{"items": "x"}, {"items": [1]}, ["x"]])
def test_a_list_that_is_not_a_list_of_objects_fails_the_stream(body):
    cache = ObjectCache(None, ["ns"], [DEPLOYMENTS], SELECTOR)
    with pytest.raises(ValueError):
        cache._listed(cache._streams[0], body)
    assert not cache.ready


def test_lists_once_then_watches_from_its_version_and_relists_after_410():
    api = Api(Response(listing("5", obj("a", "4"))),
              Response(events=[event("ADDED", obj("b", "6")), event("MODIFIED", obj("a", "7")),
                               event("BOOKMARK", {"metadata": {"resourceVersion": "9"}}),
                               event("ERROR", {"kind": "Status", "code": 410, "reason": "Expired"})]),
              Response(listing("12", obj("b", "11"))))
    cache = started(api)
    try:
        until(lambda: cache.lists == 2 and len(api.watches()) == 2 and cache.healthy, "the re-list and a second watch")
        assert names(cache) == {"b": "11"} and cache.events == 2
        first, second = api.watches()
        assert first == {"path": "/apis/apps/v1/namespaces/ns/deployments", "labelSelector": SELECTOR,
                         "watch": "true", "allowWatchBookmarks": "true", "timeoutSeconds": 45, "resourceVersion": "5"}
        assert second["resourceVersion"] == "12"
        assert [q for q in api.queries if "watch" not in q] == [
            {"path": "/apis/apps/v1/namespaces/ns/deployments", "labelSelector": SELECTOR}] * 2
        assert cache.why_not() is None
    finally:
        t0 = time.monotonic()
        cache.stop()
    assert time.monotonic() - t0 < 2 and not cache.healthy and cache.why_not() == "not running"


def test_a_failing_stream_is_not_healthy_until_it_works_again():
    api = Api(Response(listing("5", obj("a", "4"))))
    cache = started(api)
    try:
        until(lambda: cache.healthy, "the first list and watch")
        lists = cache.lists
        api.fail = urllib3.exceptions.MaxRetryError(None, "/", "connection refused")
        api.open[-1].shutdown()  # the open watch's connection drops
        until(lambda: not cache.healthy and cache.errors, "the stream to fail")
        assert cache.ready and cache.why_not().startswith("stream failing: Deployment/ns: ")
        assert names(cache) == {"a": "4"}  # kept, but not to be used
        until(lambda: len(api.queries) > 6, "retries")
        api.fail = None
        until(lambda: cache.healthy, "the stream to work again")
        assert cache.lists > lists  # a failed stream starts over from a list
        assert cache.errors == {}
    finally:
        cache.stop()


def test_a_stream_silent_for_too_long_is_not_healthy():
    now = [1000.0]
    api = Api(Response(listing("5", obj("a", "4"))))
    cache = started(api, monotonic=lambda: now[0], stale_after=60)
    try:
        until(lambda: cache.healthy, "the first list and watch")
        now[0] += 59
        assert cache.healthy
        now[0] += 2  # a watch that hangs without an error: neither an event nor its end for a minute
        assert not cache.healthy and cache.why_not() == "stream not current"
    finally:
        cache.stop()


def test_not_ready_until_every_initial_list_is_done():
    api = Api(urllib3.exceptions.ReadTimeoutError(None, "/", "timed out"))
    cache = ObjectCache(None, ["ns", "ns2"], [DEPLOYMENTS], SELECTOR, backoff=(0.01, 0.05))
    cache.api = api
    assert cache.why_not() == "not running"
    cache.start()
    try:
        assert not cache.healthy
        until(lambda: cache.ready and cache.healthy, "both lists")
        assert cache.lists == 3  # one list failed and was retried
    finally:
        cache.stop()
