"""Drift repaired through the watch, and ticks that run beside operations (issue 14).

The runner runs as `gco-infra run` does: overlapping ticks, two workers, the drift watch. Its own
table, namespace and sharded region stack, so it shares nothing with the session runner.
"""

from __future__ import annotations

import time
from dataclasses import replace

import boto3
import pytest
from kubernetes import client

from gco_infra.program import settings_from_stack_file, shard_of
from gco_infra.runner import Runner, RunnerOptions, with_local_overrides
from gco_infra.store import EndpointStore

from .conftest import Kube, until

TABLE = "gco-watch-test"
NAMESPACE = "gco-watch"
SHARDS = 3


@pytest.fixture(scope="module")
def watched(env):
    session = boto3.session.Session(aws_access_key_id="local", aws_secret_access_key="local", region_name="us-east-1")
    store = EndpointStore(replace(env.store().config, table=TABLE), session=session)
    store.create_table()
    core = client.CoreV1Api(env.kube("local-1"))
    if NAMESPACE not in {n.metadata.name for n in core.list_namespace().items}:
        core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=NAMESPACE)))
    base = settings_from_stack_file("local")
    settings = replace(with_local_overrides(base, str(env.kubeconfig(base.region)), env.dynamodb_endpoint, TABLE),
                       stack="watched", shards=SHARDS, allowed_namespaces=(NAMESPACE,))
    messages: list[str] = []
    runner = Runner([settings], store, env.pulumi_env(),
                    RunnerOptions(overlap=True, parallel=2, full_every=10**9), progress=messages.append)
    assert runner.watch_drift() == []
    watch = runner.drift["local-1"]
    until(lambda: watch.ready, "the drift watch's initial lists")
    yield runner, store, messages
    runner.close()


def put(store, name, **spec):
    store.put_desired({"endpoint_name": name, "desired_state": "running", "target_regions": ["local-1"],
                       "namespace": NAMESPACE, "spec": {"image": "example.com/org/server:1", "gpu_count": 0, **spec}})


def settle(runner, timeout=120.0):
    """Tick as `gco-infra run` does (woken by the watch and by operations that end) until no
    operation runs and a tick has nothing to do; every result of the way."""
    results = []
    deadline = time.monotonic() + timeout
    while True:
        got = runner.tick()
        results += got
        bad = [r.summary() + f" {r.endpoint_errors}" for r in got if r.action in ("failed", "refused", "skipped")]
        assert not bad, bad
        if not runner.busy and all(r.action == "none" for r in got):
            return results
        assert time.monotonic() < deadline, f"not settled after {timeout:.0f}s: {[r.summary() for r in results]}"
        runner.wakeup().wait(1.0)
        runner.wakeup().clear()


def versions(kube, names):
    return {n: kube.deployment(n, NAMESPACE).metadata.resource_version for n in names}


def test_drift_is_repaired_for_that_endpoint_only_and_our_own_updates_are_not_drift(env, watched):
    runner, store, messages = watched
    kube = Kube(env, "local-1")
    names = [f"w-{i}" for i in range(9)]
    assert len({shard_of(n, SHARDS) for n in names}) == SHARDS
    for n in names:
        put(store, n)
    first = settle(runner)
    assert sorted(r.stack for r in first if r.action == "full") == [f"watched.shard-{k}" for k in range(SHARDS)]
    watch = runner.drift["local-1"]
    lists = watch.lists
    ops = runner.operations

    # Our own change is applied once and is not seen as drift afterwards.
    put(store, "w-1", env={"ROUND": "2"})
    settle(runner)
    assert runner.operations == ops + 1
    assert not [m for m in messages if "drift repair" in m], messages
    ops = runner.operations

    # A Service deleted by hand comes back through a targeted repair of its endpoint alone.
    before = versions(kube, names)
    old_uid = kube.service("w-2", NAMESPACE).metadata.uid
    client.CoreV1Api(env.kube("local-1")).delete_namespaced_service("w-2", NAMESPACE)
    repaired = until(lambda: [r for r in settle(runner) if r.action == "targeted"],
                     lambda: f"the repair of w-2's Service (runner said: {messages[-5:]})")
    assert [r.stack for r in repaired] == [f"watched.shard-{shard_of('w-2', SHARDS)}"]
    assert runner.operations == ops + 1
    service = kube.service("w-2", NAMESPACE)
    assert service is not None and service.metadata.uid != old_uid
    assert versions(kube, names) == before  # no other endpoint's objects were written
    assert any("drift repair of w-2" in m for m in messages), messages
    ops = runner.operations

    # A hand edit of the image (another field manager) is undone.
    apps = client.AppsV1Api(env.kube("local-1"))
    patch = {"spec": {"template": {"spec": {"containers": [{"name": "inference", "image": "example.com/evil:6"}]}}}}
    apps.patch_namespaced_deployment("w-3", NAMESPACE, patch, field_manager="kubectl-edit")
    until(lambda: settle(runner) and kube.deployment("w-3", NAMESPACE).spec.template.spec.containers[0].image
          == "example.com/org/server:1", "the hand-edited image to be declared again")
    assert runner.operations == ops + 1
    ops = runner.operations

    # The watchdog's path: the table says withdrawn first, then the Ingress is deleted. The runner
    # declares the withdrawal (a changed fingerprint) and never re-creates the Ingress.
    stored = store.get("w-4")["region_status"]["local-1"]
    assert store.write_region_status("w-4", "local-1", {**stored, "ingress": "withdrawn",
                                                         "unready_since": "2026-01-01T00:00:00Z"}, expected=stored)
    client.NetworkingV1Api(env.kube("local-1")).delete_namespaced_ingress("inference-w-4", NAMESPACE)
    settle(runner)
    time.sleep(2.0)  # anything the watch still delivers
    settle(runner)
    assert kube.ingress("inference-w-4", NAMESPACE) is None
    assert "ingress" not in (runner.states[f"watched.shard-{shard_of('w-4', SHARDS)}"].outputs["endpoints"]["w-4"]
                             .get("objects") or {})

    assert watch.lists == lists, "the watch listed again: steady state must only watch"
    assert not watch.errors, watch.errors


def test_the_periodic_sweep_repairs_what_the_watch_missed_without_a_full_update(env, watched):
    runner, store, messages = watched
    kube = Kube(env, "local-1")
    settle(runner)
    watch = runner.drift.pop("local-1")
    watch.stop()  # what the watch does not see (it was down, a missed event)
    try:
        old_uid = kube.service("w-6", NAMESPACE).metadata.uid
        client.CoreV1Api(env.kube("local-1")).delete_namespaced_service("w-6", NAMESPACE)
        runner.opts = replace(runner.opts, full_every=20.0, sweep_batch=2)  # a few endpoints every few seconds
        for state in runner.states.values():
            state.next_sweep = 0.0
        put(store, "w-7", env={"ROUND": "4"})  # a change goes through while the sweeps run
        results = []

        def repaired():
            results.extend(settle_once(runner))
            svc = kube.service("w-6", NAMESPACE)
            return svc is not None and svc.metadata.uid != old_uid

        until(repaired, "the sweep to re-create w-6's Service", timeout=180, every=0.5)
        assert not [r for r in results if r.action == "full"], [r.summary() for r in results]
        assert any("sweep of" in m for m in messages), messages

        def changed():
            settle_once(runner)
            live = kube.deployment("w-7", NAMESPACE)
            return live is not None and {e.name: e.value for e in live.spec.template.spec.containers[0].env or []} \
                == {"ROUND": "4"}

        until(changed, "the change beside the sweeps", timeout=60, every=0.5)
    finally:
        runner.opts = replace(runner.opts, full_every=10**9)
        assert runner.watch_drift() == []
    settle(runner)


def settle_once(runner):
    got = runner.tick()
    bad = [r.summary() + f" {r.endpoint_errors}" for r in got if r.action in ("failed", "refused", "skipped")]
    assert not bad, bad
    return got


def test_objects_no_stack_holds_are_reported_after_a_full_reconcile(env, watched):
    """What an operation killed without checkpoints leaves when its record is deleted before the next
    runner starts: objects written by the provider that no stack holds. Reported, never deleted."""
    runner, store, messages = watched
    settle(runner)
    apps = client.AppsV1Api(env.kube("local-1"))
    body = {"apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": "w-orphan", "namespace": NAMESPACE,
                         "labels": {"app": "w-orphan", "project": "gco", "gco.io/type": "inference"}},
            "spec": {"replicas": 0, "selector": {"matchLabels": {"app": "w-orphan"}},
                     "template": {"metadata": {"labels": {"app": "w-orphan"}},
                                  "spec": {"containers": [{"name": "inference", "image": "example.com/org/server:1"}]}}}}
    apps.patch_namespaced_deployment("w-orphan", NAMESPACE, body, field_manager="pulumi-kubernetes-0f1e2d3c",
                                     force=True, _content_type="application/apply-patch+yaml")
    try:
        watch = runner.drift["local-1"]
        until(lambda: ("Deployment", NAMESPACE, "w-orphan") in watch.objects(), "the watch to see the object")
        before = len(messages)
        runner.tick(force_full=True)
        settle(runner)
        reports = [m for m in messages[before:] if "of endpoint w-orphan are in no stack" in m]
        assert len(reports) == 1 and f"Deployment {NAMESPACE}/w-orphan" in reports[0], messages[before:]
        assert client.AppsV1Api(env.kube("local-1")).read_namespaced_deployment("w-orphan", NAMESPACE)  # left alone
        assert not [m for m in messages[before:] if "are in no stack" in m and "w-orphan" not in m]
    finally:
        apps.delete_namespaced_deployment("w-orphan", NAMESPACE)
