"""The health job follows the table's stream and reads the lists as JSON, against the real control
plane and moto server: what is written between ticks is acted on, a failed read acts on nothing,
and the JSON observation is the one the client's models gave."""

from __future__ import annotations

import pytest
from botocore.exceptions import EndpointConnectionError

from gco_infra import health
from gco_infra.health import HealthReport

from ..unit.test_health_observe import observe_models
from .conftest import until
from .test_endpoints_e2e import put, status
from .test_health_e2e import AGES, NS, _controllers_run, age, job, set_ready

READ_CALLS = ("Scan", "BatchGetItem", "DescribeTable", "GetRecords", "DescribeStream", "GetShardIterator")


@pytest.fixture(scope="module", autouse=True)
def _controllers(env, kube1):
    kube1.controllers = _controllers_run(env)


def settled(j):
    """A tick that wrote nothing (the job's own earlier writes come back through the stream once)."""
    return until(lambda: (r := j.tick()).error is None and r.writes == 0 and r, "a tick without writes")


class Unreachable:
    """Makes chosen DynamoDB calls of one store fail as a table that does not answer does."""

    def __init__(self, store, *calls):
        self.clients = [store._client, store._table.meta.client, store._streams]
        self.calls = set(calls)

    def __call__(self, model, **_):
        if model.name in self.calls:
            raise EndpointConnectionError(endpoint_url="http://127.0.0.1:9")

    def __enter__(self):
        for c in self.clients:
            c.meta.events.register("before-call", self)
        return self

    def __exit__(self, *exc):
        for c in self.clients:
            c.meta.events.unregister("before-call", self)


def test_a_record_written_after_the_first_tick_is_acted_on_through_the_stream(env, tick, kube1):
    j = job(env, threshold=AGES)
    assert j.tick().table_read == "scan (first read)"
    settled(j)
    put(env, "late-ready")
    put(env, "late-sick")
    tick()
    set_ready(kube1, "late-ready", 1)
    set_ready(kube1, "late-sick", 0)
    age(env, "late-sick")  # dead since long ago, as the table now says
    r = j.tick()
    assert r.error is None and r.table_read.startswith("stream, ") and j._cache.scans == 1, r.table_read
    assert status(env, "late-ready")["state"] == "running"
    assert "late-sick" in r.withdrawn and kube1.ingress("inference-late-sick") is None
    assert status(env, "late-sick")["ingress"] == "withdrawn"


def test_an_unchanged_table_is_neither_read_nor_validated_again(env, monkeypatch):
    j = job(env)
    settled(j)
    validations = []
    real = health.validate_all
    monkeypatch.setattr(health, "validate_all", lambda *a, **kw: validations.append(1) or real(*a, **kw))
    calls = j.store.calls
    r = j.tick()
    assert r.error is None and r.table_read == "stream, no writes" and r.endpoints > 0
    assert j.store.calls - calls == 2  # DescribeTable and one GetRecords: no item read
    assert validations == []
    put(env, "late-validated")
    assert j.tick().table_read == "stream, 1 re-read" and validations == [1]


def test_a_failed_re_read_acts_on_nothing_and_the_next_tick_scans(env, tick, kube1):
    j = job(env, threshold=AGES)
    settled(j)
    put(env, "reread-sick")
    tick()
    set_ready(kube1, "reread-sick", 0)
    age(env, "reread-sick")
    calls = j.store.calls
    with Unreachable(j.store, "BatchGetItem"):
        r = j.tick()
    assert r.error and "did not answer" in r.error and j.store.calls > calls  # the stream was read, the items not
    assert (r.writes, r.withdrawn, r.endpoints) == (0, [], 0)
    assert kube1.ingress("inference-reread-sick") is not None and status(env, "reread-sick").get("ingress") != "withdrawn"
    r = j.tick()
    assert r.table_read == "scan (the previous read failed)"
    assert "reread-sick" in r.withdrawn and kube1.ingress("inference-reread-sick") is None


def test_an_unreadable_stream_falls_back_to_a_scan_and_an_unreadable_table_acts_on_nothing(env, tick, kube1):
    j = job(env, threshold=AGES)
    settled(j)
    put(env, "noread-sick")
    tick()
    set_ready(kube1, "noread-sick", 0)
    age(env, "noread-sick")
    with Unreachable(j.store, *READ_CALLS):  # neither the stream nor the table answers
        r = j.tick()
    assert r.error and (r.writes, r.withdrawn, r.endpoints, r.api_calls) == (0, [], 0, 0)
    assert kube1.ingress("inference-noread-sick") is not None and status(env, "noread-sick").get("ingress") != "withdrawn"
    with Unreachable(j.store, "GetRecords", "DescribeStream", "GetShardIterator"):  # only the stream is down
        r = j.tick()
        assert r.error is None and r.table_read.startswith("scan (")
        assert "noread-sick" in r.withdrawn and kube1.ingress("inference-noread-sick") is None


def test_the_json_observation_is_the_model_based_one_on_the_same_objects(env, tick, kube1):
    put(env, "json-canary", replicas=2, canary={"image": "example.com/org/server:2", "weight": 10})
    put(env, "json-unready", replicas=3)
    tick()
    set_ready(kube1, "json-canary-canary", 1)
    set_ready(kube1, "json-canary", 1)
    set_ready(kube1, "json-unready", 0)
    j = job(env)

    def same():  # both reads see the same objects once their controllers stop writing their status
        report = HealthReport()
        got = j.observe(report)
        deployments = kube1.apps.list_namespaced_deployment(NS[0], label_selector=health.LABEL).items
        ingresses = kube1.net.list_namespaced_ingress(NS[0], label_selector=health.LABEL).items
        assert report.api_calls == 2 * len(NS)
        return got if got == observe_models(deployments, ingresses) else None

    got = until(same, "the JSON and the model observation to agree")
    c = got["json-canary"]
    assert (c.primary.ready, c.primary.desired, c.canary.ready, c.canary.desired) == (1, 2, 1, 1)
    assert c.primary.seen and c.canary.seen
    assert sorted(c.ingresses) == [(NS[0], "inference-json-canary"), (NS[0], "inference-json-canary-canary")]
    u = got["json-unready"].primary
    assert (u.ready, u.desired) == (0, 3)
