"""What the health job sees in a list's JSON is what it saw in the client's models.

The reference below is the model-based observation the job used before it read the JSON itself.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
from kubernetes import client

from gco_infra.health import ObserveError, add_deployment, add_ingress, list_items
from gco_infra.watchdog import Observed, Track, track_of

NS = "gco-inference"


def deployment(name, app, *, track=None, replicas=1, status=..., generation=2, labels=None):
    meta = {"name": name, "namespace": NS, "generation": generation,
            "labels": labels if labels is not None else {"app": app, "gco.io/type": "inference",
                                                          **({"gco.io/track": track} if track else {})}}
    spec = {"selector": {"matchLabels": {"app": app}},
            "template": {"metadata": {"labels": {"app": app}},
                         "spec": {"containers": [{"name": "server", "image": "example.com/org/server:1"}]}}}
    if replicas is not None:
        spec["replicas"] = replicas
    obj = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": meta, "spec": spec}
    if status is ...:
        want = 1 if replicas is None else replicas
        status = {"observedGeneration": generation, "replicas": want, "updatedReplicas": want, "readyReplicas": want}
    if status is not None:
        obj["status"] = status
    return obj


def ingress(name, app):
    return {"apiVersion": "networking.k8s.io/v1", "kind": "Ingress",
            "metadata": {"name": name, "namespace": NS, "labels": {"app": app, "gco.io/type": "inference"}},
            "spec": {"rules": [{"http": {"paths": [{"path": "/", "pathType": "Prefix", "backend": {
                "service": {"name": app, "port": {"number": 80}}}}]}}]}}


def as_models(items, kind):
    body = json.dumps({"apiVersion": "v1", "kind": f"{kind}List", "metadata": {}, "items": items})
    return client.ApiClient().deserialize(SimpleNamespace(data=body), f"V1{kind}List").items


def observe_models(deployments, ingresses) -> dict[str, Observed]:
    """The job's observation on the client's models, as it was before the JSON reads, plus the two
    rollout rules since (pods of an older template still counted; the revision annotation)."""
    seen: dict[str, Observed] = {}
    for d in deployments:
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
        if st is None or (st.observed_generation or 0) < (d.metadata.generation or 0) or (st.updated_replicas or 0) < want \
                or (st.replicas or 0) > want:
            t.updated = False
        revision = (d.metadata.annotations or {}).get("gco.io/revision")
        if revision:
            t.revision = revision[:64]
    for i in ingresses:
        name = (i.metadata.labels or {}).get("app")
        if name:
            seen.setdefault(name, Observed()).ingresses.append((NS, i.metadata.name))
    return seen


def observe_json(deployments, ingresses) -> dict[str, Observed]:
    seen: dict[str, Observed] = {}
    body = json.dumps({"kind": "DeploymentList", "items": deployments}).encode()
    for d in list_items(body, "Deployments"):
        add_deployment(seen, d)
    for i in list_items(json.dumps({"kind": "IngressList", "items": ingresses}), "Ingresses"):
        add_ingress(seen, NS, i)
    return seen


DEPLOYMENTS = [
    deployment("ready", "ready", track="primary", replicas=2),
    deployment("no-replicas", "no-replicas", replicas=None),  # unset: one desired replica
    deployment("no-status", "no-status", status=None),  # never seen by its controller
    deployment("empty-status", "empty-status", status={}),
    deployment("unready", "unready", replicas=3,
               status={"observedGeneration": 2, "replicas": 3, "updatedReplicas": 3, "readyReplicas": 1}),
    deployment("zero", "zero", replicas=0, status={"observedGeneration": 2}),
    deployment("stale", "stale", status={"observedGeneration": 1, "updatedReplicas": 1, "readyReplicas": 1}),
    deployment("rolling", "rolling", replicas=2,
               status={"observedGeneration": 2, "updatedReplicas": 1, "readyReplicas": 2}),
    deployment("cn", "cn", track="primary",
               status={"observedGeneration": 2, "updatedReplicas": 1, "readyReplicas": 0}),
    deployment("cn-canary", "cn", track="canary"),  # a live canary beside a dead primary
    deployment("adopted", "adopted"),
    deployment("adopted-canary", "adopted", replicas=2,  # no track label: a canary by its name
               status={"observedGeneration": 2, "updatedReplicas": 2, "readyReplicas": 1}),
    deployment("labelled-primary-canary", "labelled-primary", track="primary"),  # the label wins over the name
    deployment("twice-a", "twice"), deployment("twice-b", "twice", replicas=2),  # counts add up
    deployment("no-app", "no-app", labels={"gco.io/type": "inference"}),  # not an endpoint's
    deployment("null-labels", "null-labels", labels={}),
]
INGRESSES = [ingress("inference-ready", "ready"), ingress("inference-cn", "cn"), ingress("inference-cn-canary", "cn"),
             ingress("inference-only", "ingress-only"), {"metadata": {"name": "unlabelled", "labels": None}}]


def test_json_observation_matches_the_model_based_one():
    models = observe_models(as_models(DEPLOYMENTS, "Deployment"), as_models(INGRESSES, "Ingress"))
    got = observe_json(DEPLOYMENTS, INGRESSES)
    assert got == models
    # and the cases it covers are the ones meant (so the equality above could have failed)
    assert got["no-replicas"].primary == Track(seen=True, ready=1, desired=1, updated=True)
    assert got["no-status"].primary == Track(seen=True, ready=0, desired=1, updated=False)
    assert got["empty-status"].primary == Track(seen=True, ready=0, desired=1, updated=False)
    assert got["unready"].primary == Track(seen=True, ready=1, desired=3, updated=True)
    assert got["zero"].primary == Track(seen=True, ready=0, desired=0, updated=True)
    assert not got["stale"].primary.updated and not got["rolling"].primary.updated
    assert got["cn"].primary == Track(seen=True, ready=0, desired=1, updated=True)
    assert got["cn"].canary == Track(seen=True, ready=1, desired=1, updated=True)
    assert got["cn"].ingresses == [(NS, "inference-cn"), (NS, "inference-cn-canary")]
    assert got["adopted"].canary == Track(seen=True, ready=1, desired=2, updated=True)
    assert got["labelled-primary"].primary.seen and not got["labelled-primary"].canary.seen
    assert got["twice"].primary == Track(seen=True, ready=3, desired=3, updated=True)
    assert "no-app" not in got and "null-labels" not in got
    assert got["ingress-only"].seen and not got["ingress-only"].primary.seen


def test_an_empty_list_is_nothing_seen():
    assert list_items(b'{"kind": "DeploymentList", "metadata": {}, "items": []}', "Deployments") == []
    assert list_items(b'{"kind": "DeploymentList", "metadata": {}, "items": null}', "Deployments") == []


@pytest.mark.parametrize("body", [b"", b"<html>proxy error</html>", b"[]", b'{"items": {}}', b'{"items": [1]}'])
def test_an_answer_that_is_not_a_list_of_objects_is_an_error(body):
    with pytest.raises(ObserveError):
        list_items(body, "Deployments in gco-inference")


def test_a_count_of_the_wrong_type_is_an_error_not_a_guess():
    with pytest.raises(ObserveError):
        add_deployment({}, deployment("odd", "odd", status={"observedGeneration": 2, "readyReplicas": "1"}))


def test_a_rollout_in_progress_is_not_counted_ready_by_the_old_pods():
    # the new template's pod is not ready; the old one still is: the Deployment has 2 pods for 1 wanted
    dep = deployment("roll", "roll", status={"observedGeneration": 2, "replicas": 2, "updatedReplicas": 1,
                                             "readyReplicas": 1})
    dep["metadata"].setdefault("annotations", {})["gco.io/revision"] = "abc"
    seen = observe_json([dep], [])
    assert seen["roll"].primary.ready == 1 and not seen["roll"].primary.updated
    assert seen["roll"].primary.revision == "abc"


def _job(clock=None):
    import threading
    import time

    from gco_infra.health import HealthJob

    job = HealthJob(None, client.ApiClient(), "r1", ("ns",), clock=clock or time.time)
    job._objects = SimpleNamespace(changed=threading.Event())
    return job


def test_wait_ends_when_the_watch_cache_sees_a_change():
    import threading
    import time

    job = _job()
    job.rollouts_active = True  # a rollout's gate is waiting on readiness
    threading.Timer(0.2, job._objects.changed.set).start()
    started = time.monotonic()
    job.wait(30.0, min_gap=0.0)
    assert time.monotonic() - started < 15, "the change did not end the wait"
    assert not job._objects.changed.is_set()


def test_wait_ends_when_a_rollout_gate_comes_due():
    import time

    job = _job()
    job.due = time.time() + 0.2
    started = time.monotonic()
    job.wait(30.0, min_gap=0.0)
    assert time.monotonic() - started < 15, "the gate's due time did not end the wait"
