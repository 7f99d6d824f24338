"""The health job's watch cache against the real control plane: what it observes from the cache is
what the lists show after creates, a scale and deletes; a tick served from it makes no Kubernetes
request; with its streams broken or stopped the job lists again and still acts correctly."""

from __future__ import annotations

import pytest
import urllib3
from kubernetes import client

from gco_infra.health import HealthReport
from gco_infra.kubecache import _shutdown

from .conftest import until
from .test_endpoints_e2e import put
from .test_health_e2e import AGES, NS, _controllers_run, age, job, set_ready


@pytest.fixture(scope="module", autouse=True)
def _controllers(env, kube1):
    kube1.controllers = _controllers_run(env)


@pytest.fixture
def cached(env):
    j = job(env, watch_cache=True)
    yield j
    j.close()


def current(j):
    cache = j.object_cache()
    until(lambda: cache.healthy, "the watch cache to be current")
    return cache


def agree(j, what):
    """The cached and the listed observation, once they agree (events may be a moment behind)."""
    def same():
        from_cache = j.observe_cache(j.object_cache())
        listed = j.observe_lists(HealthReport())
        return from_cache if from_cache == listed else None
    return until(same, f"the cached observation to equal the listed one after {what}")


def list_requests(env):
    """LISTs of deployments and ingresses as the API server counts them (every client)."""
    resp = env.kube("local-1").call_api("/metrics", "GET", _preload_content=False, auth_settings=["BearerToken"])
    total = 0
    for line in resp.data.decode().splitlines():
        if line.startswith("apiserver_request_total{") and 'verb="LIST"' in line and (
                'resource="deployments"' in line or 'resource="ingresses"' in line):
            total += int(float(line.rsplit(" ", 1)[1]))
    return total


def test_the_cached_observation_is_the_listed_one_after_creates_scale_and_deletes(env, tick, kube1, cached):
    cache = current(cached)
    put(env, "wc-canary", replicas=2, canary={"image": "example.com/org/server:2", "weight": 10})
    put(env, "wc-plain")
    tick()
    got = agree(cached, "creates")
    c = got["wc-canary"]
    assert (c.primary.desired, c.canary.desired, c.primary.seen, c.canary.seen) == (2, 1, True, True)
    assert sorted(c.ingresses) == [(NS[0], "inference-wc-canary"), (NS[0], "inference-wc-canary-canary")]

    kube1.apps.patch_namespaced_deployment_scale("wc-plain", NS[0], {"spec": {"replicas": 3}})
    set_ready(kube1, "wc-canary", 1)
    got = agree(cached, "a scale")
    assert got["wc-plain"].primary.desired == 3 and got["wc-canary"].primary.ready == 1

    kube1.net.delete_namespaced_ingress("inference-wc-plain", NS[0])
    kube1.apps.delete_namespaced_deployment("wc-canary-canary", NS[0])
    got = agree(cached, "deletes")
    assert got["wc-plain"].ingresses == [] and not got["wc-canary"].canary.seen
    assert got["wc-canary"].ingresses  # the canary's Ingress is still there
    assert cache.lists == 2 and cache.events > 0  # one list per kind, then only the watches


def test_a_tick_served_from_the_cache_makes_no_kubernetes_request(env, cached, monkeypatch):
    current(cached)
    calls = []
    bounded = cached.apps.api_client
    assert cached.net.api_client is bounded
    real = bounded.call_api
    monkeypatch.setattr(bounded, "call_api", lambda *a, **kw: calls.append(a[0]) or real(*a, **kw))
    until(lambda: (r := cached.tick()).error is None and r.writes == 0 and r.observed == "watch cache",
          "a cached tick without writes")
    cache = cached.object_cache()
    lists, watches, listed, calls[:] = cache.lists, cache.watches, list_requests(env), []
    r = cached.tick()
    assert r.error is None and r.observed == "watch cache" and r.endpoints > 0
    assert r.api_calls == 0 and calls == []
    assert list_requests(env) == listed and (cache.lists, cache.watches) == (lists, watches)
    plain = job(env).tick()  # without the cache (as --once runs): two lists
    assert plain.observed == "lists" and plain.api_calls == 2 * len(NS) and list_requests(env) == listed + 2


def test_with_its_streams_broken_or_stopped_the_job_lists_and_acts_on_what_it_lists(env, tick, kube1, monkeypatch):
    j = job(env, watch_cache=True, threshold=AGES)
    try:
        cache = current(j)
        put(env, "wc-sick")
        tick()
        set_ready(kube1, "wc-sick", 0)
        age(env, "wc-sick")
        monkeypatch.setattr(cache.api, "call_api", lambda *a, **kw: (_ for _ in ()).throw(
            urllib3.exceptions.MaxRetryError(None, a[0], "connection refused")))
        for s in cache._streams:
            _shutdown(s)  # every open watch drops; reconnecting fails
        until(lambda: not cache.healthy and cache.errors, "the streams to fail")
        r = j.tick()
        assert r.error is None and r.observed.startswith("lists (watch cache stream failing: ")
        assert r.api_calls == 2 * len(NS)
        assert "wc-sick" in r.withdrawn and kube1.ingress("inference-wc-sick") is None
        monkeypatch.undo()
        until(lambda: cache.healthy, "the streams to work again")
        r = j.tick()
        assert (r.error, r.observed, r.api_calls) == (None, "watch cache", 0)
        assert j.observe_cache(cache)["wc-sick"].ingresses == []  # current again only after a fresh list
        cache.stop()
        r = j.tick()
        assert r.error is None and r.observed == "lists (watch cache not running)" and r.api_calls == 2 * len(NS)
    finally:
        j.close()


def test_rbac_lets_the_health_job_watch_what_it_lists(env):
    """The gco-health Role grants watch on both kinds (a cache without it would never be ready)."""
    from gco_infra import localenv, system

    api = env.kube("local-1")
    for obj in system.identities(localenv.NAMESPACES):
        localenv.apply_object(api, obj)
    authz = client.AuthorizationV1Api(api)
    for group, resource in (("apps", "deployments"), ("networking.k8s.io", "ingresses")):
        review = client.V1SubjectAccessReview(spec=client.V1SubjectAccessReviewSpec(
            user="system:serviceaccount:gco-system:gco-health",
            groups=["system:serviceaccounts", "system:serviceaccounts:gco-system", "system:authenticated"],
            resource_attributes=client.V1ResourceAttributes(namespace=NS[0], group=group, resource=resource,
                                                            verb="watch")))
        assert authz.create_subject_access_review(review).status.allowed, resource
