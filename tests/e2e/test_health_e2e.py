"""The health job against the real control plane (apiserver, controllers) and moto server.

There is no node, so no pod becomes ready on its own: a test marks a Deployment's pods Ready (the
replica-set and deployment controllers then count them into its status and keep them there), as
envtest users write status; without a controller manager it writes the Deployment's status itself.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from kubernetes import client, config

from gco_infra.health import HealthJob, LeaseElector
from gco_infra.store import EndpointStore, StoreConfig

from .conftest import until
from .test_endpoints_e2e import put, status

NS = ("gco-inference",)
LONG_AGO = "2000-01-01T00:00:00Z"
AGES = 3e8
"""A watchdog threshold (~9.5 years) that only the timers a test set to LONG_AGO have passed, so a
test withdraws its own endpoint and leaves the other tests' dead endpoints alone."""


def _controllers_run(env, region="local-1") -> bool:
    pid = getattr(env.apiservers.get(region), "controller_manager_pid", None)
    try:
        return bool(pid) and b"kube-controller-manager" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def set_ready(kube, name, ready, ns="gco-inference"):
    """``ready`` of Deployment ``name``'s replicas ready, as its status reports it from now on."""
    d = kube.apps.read_namespaced_deployment(name, ns)
    want = d.spec.replicas if d.spec.replicas is not None else 1
    if not kube.controllers:
        kube.apps.patch_namespaced_deployment_status(name, ns, {"status": {
            "replicas": want, "readyReplicas": ready, "availableReplicas": ready, "updatedReplicas": want,
            "observedGeneration": d.metadata.generation}})
        return
    selector = ",".join(f"{k}={v}" for k, v in sorted(d.spec.selector.match_labels.items()))

    def pods():
        items = [p for p in kube.core.list_namespaced_pod(ns, label_selector=selector).items if not p.metadata.deletion_timestamp]
        return sorted(items, key=lambda p: p.metadata.name) if len(items) >= want else None

    for i, pod in enumerate(until(pods, f"{want} pods of {name}")):
        flag = "True" if i < ready else "False"
        kube.core.patch_namespaced_pod_status(pod.metadata.name, ns, {"status": {"phase": "Running", "conditions": [
            {"type": "Ready", "status": flag}, {"type": "ContainersReady", "status": flag}]}})

    def counted():
        st = kube.apps.read_namespaced_deployment_status(name, ns)
        return ((st.status.ready_replicas or 0) == ready and (st.status.updated_replicas or 0) >= want
                and (st.status.observed_generation or 0) >= st.metadata.generation)

    until(counted, f"{name}'s status to count {ready} ready")


@pytest.fixture(scope="module", autouse=True)
def _controllers(env, kube1):
    kube1.controllers = _controllers_run(env)


def age(env, name, region="local-1"):
    """The endpoint's unready timer, as if it had been dead since LONG_AGO (the table holds the timer)."""
    st = status(env, name, region)
    assert env.store().write_region_status(name, region, {**st, "unready_since": LONG_AGO}, expected=st)


def job(env, **kw):
    kw.setdefault("known_regions", ["local-1", "local-2"])
    return HealthJob(env.store(), env.kube("local-1"), "local-1", NS, **kw)


@pytest.fixture(scope="module")
def system(env):
    """gco-system on local-1 as the platform stack declares it (system.identities): namespace,
    service accounts, least-privilege Roles (`local up` applied them already; applying is idempotent)."""
    from gco_infra import localenv, system

    api = env.kube("local-1")
    for obj in system.identities(localenv.NAMESPACES):
        localenv.apply_object(api, obj)
    return api


def test_readiness_states_follow_deployment_status(env, tick, kube1):
    put(env, "ready-a", replicas=2)
    tick()
    j = job(env)
    set_ready(kube1, "ready-a", 1)
    j.tick()
    st = status(env, "ready-a")
    assert (st["state"], st["replicas_ready"], st["replicas_desired"]) == ("creating", 1, 2)
    set_ready(kube1, "ready-a", 2)
    r = j.tick()
    assert status(env, "ready-a")["state"] == "running" and r.writes >= 1
    again = j.tick()
    assert again.writes == 0  # written only when it changes


def test_watchdog_withdraws_survives_restart_and_readmits(env, tick, kube1):
    put(env, "sick")
    tick()
    set_ready(kube1, "sick", 0)
    first = job(env, threshold=2.0)
    first.tick()
    since = status(env, "sick")["unready_since"]
    assert since and kube1.ingress("inference-sick") is not None
    time.sleep(2.5)
    restarted = job(env, threshold=2.0)  # a new process: the countdown comes from the table
    r = restarted.tick()
    assert "sick" in r.withdrawn
    assert kube1.ingress("inference-sick") is None
    st = status(env, "sick")
    assert st["ingress"] == "withdrawn" and st["unready_since"] == since
    tick()  # the runner agrees with the watchdog: it does not re-create the Ingress
    assert kube1.ingress("inference-sick") is None
    assert kube1.deployment("sick") is not None
    set_ready(kube1, "sick", 1)
    r = restarted.tick()
    assert r.readmitted == ["sick"] and status(env, "sick")["ingress"] == "active"
    tick()
    assert kube1.ingress("inference-sick") is not None


def test_stopped_endpoint_never_keeps_an_ingress(env, tick, kube1):
    put(env, "halted")
    tick()
    put(env, "halted", state="stopped")  # the runner has not ticked yet: its Ingress still routes
    assert kube1.ingress("inference-halted") is not None
    job(env).tick()
    assert kube1.ingress("inference-halted") is None
    assert status(env, "halted")["state"] == "stopped"


def test_promotion_only_when_all_regions_run_and_a_concurrent_stop_wins(env, tick, kube1):
    put(env, "promo", state="deploying")
    put(env, "racer", state="deploying")
    tick()
    for n in ("promo", "racer"):
        set_ready(kube1, n, 1)
    j = job(env)
    j.tick()  # local-1 now reports running; promotion happens on the next read
    other = env.store()

    def stop_racer(**_):  # between the job's read and its write, someone stops "racer"
        other.set_desired_state("racer", "stopped", expected="deploying")

    for read in ("Scan", "BatchGetItem"):  # a complete scan, or the re-read of what the table's stream names
        j.store._table.meta.client.meta.events.register(f"after-call.dynamodb.{read}", stop_racer)
    r = j.tick()
    assert "promo" in r.promoted and "racer" not in r.promoted
    assert env.store().get("promo")["desired_state"] == "running"
    assert env.store().get("racer")["desired_state"] == "stopped"


def test_no_promotion_while_a_region_is_not_running(env, tick, kube1):
    put(env, "halfway", state="deploying", regions=("local-1", "local-2"))
    tick()
    set_ready(kube1, "halfway", 1)
    r = job(env).tick()
    assert "halfway" not in r.promoted
    assert env.store().get("halfway")["desired_state"] == "deploying"


def test_purge_waits_until_every_target_region_is_known_and_deleted(env, tick, kube1):
    put(env, "ghost", regions=("local-1", "ap-gone-1"))  # ap-gone-1 is no longer a platform region
    tick()
    put(env, "ghost", state="deleted", regions=("local-1", "ap-gone-1"))
    tick()
    assert status(env, "ghost")["state"] == "deleted"
    r = job(env).tick()
    assert "ghost" not in r.purged and env.store().get("ghost") is not None  # no one can say what ap-gone-1 still runs
    put(env, "ghost", state="deleted", regions=("local-1",))  # the operator drops the gone region
    r = job(env).tick()
    assert "ghost" in r.purged and env.store().get("ghost") is None


def test_deleted_before_any_region_applied_it_is_purged(env):
    put(env, "never-applied", state="deleted", regions=("local-1", "local-2"))
    put(env, "failed-first", state="deleted", regions=("local-1", "local-2"))
    store = env.store()  # its first apply failed in local-1 and local-2 never got to it
    assert store.write_region_status("failed-first", "local-1", {
        "state": "error", "error": "the update failed", "replicas_ready": 0, "last_sync": "2024-01-01T00:00:00Z"}, expected=None)
    assert store.write_region_status("failed-first", "local-2", {"state": "pending"}, expected=None)
    r = job(env).tick()
    assert {"failed-first", "never-applied"} <= set(r.purged)
    assert store.get("never-applied") is None and store.get("failed-first") is None


def test_deleted_endpoint_without_a_known_target_region_is_kept(env):
    put(env, "typo-region", state="deleted", regions=("ap-typo-1",))  # a typo, or a region not set up yet
    j = job(env)
    for _ in range(2):
        assert "typo-region" not in j.tick().purged
    assert env.store().get("typo-region") is not None


def test_never_purged_while_its_objects_remain_here(env, tick, kube1):
    put(env, "lingering")
    tick()
    put(env, "lingering", state="deleted")  # the runner has not removed anything yet ...
    st = status(env, "lingering")
    assert env.store().write_region_status("lingering", "local-1", {**st, "state": "deleted"}, expected=st)  # ... the table says otherwise
    r = job(env).tick()
    assert "lingering" not in r.purged and env.store().get("lingering") is not None
    assert kube1.deployment("lingering") is not None
    tick()  # the runner removes the objects
    assert kube1.of("lingering") == set()
    assert "lingering" in job(env).tick().purged


def test_two_replicas_only_the_leader_writes(env, tick, kube1, system):
    put(env, "leader-test", replicas=1)
    tick()
    set_ready(kube1, "leader-test", 1)
    api = env.kube("local-1")
    a = job(env, elector=LeaseElector(api, "gco-system", "gco-health-test", identity="a", lease_seconds=3, renew_deadline=2))
    b = job(env, elector=LeaseElector(api, "gco-system", "gco-health-test", identity="b", lease_seconds=3, renew_deadline=2))
    ra, rb = a.tick(), b.tick()
    assert (ra.leader, rb.leader) == (True, False)
    assert rb.writes == 0 and rb.api_calls == 0
    time.sleep(3.5)  # a stops renewing: it stops acting after its renew deadline, b takes over after the lease
    assert not a.elector.is_leader()
    rb = b.tick()
    assert rb.leader
    assert a.tick().leader is False


def test_api_calls_per_tick_do_not_grow_with_endpoints(env, tick, kube1):
    j = job(env)
    small = j.tick().api_calls
    for i in range(15):
        put(env, f"grow-{i}")
    tick()
    big = j.tick()
    assert big.endpoints >= 15
    assert big.api_calls == small == 2 * len(NS)


def test_least_privilege_service_account_is_enough_and_no_more(env, tick, kube1, system):
    core = client.CoreV1Api(system)
    token = core.create_namespaced_service_account_token(
        "gco-health", "gco-system", client.AuthenticationV1TokenRequest(spec=client.V1TokenRequestSpec(audiences=[]))).status.token
    cfg = client.Configuration()
    admin = env.kube("local-1").configuration
    cfg.host, cfg.ssl_ca_cert = admin.host, admin.ssl_ca_cert
    cfg.api_key = {"authorization": f"Bearer {token}"}
    sa = client.ApiClient(cfg)

    def can(verb, resource, ns="gco-inference", group=""):
        review = client.V1SelfSubjectAccessReview(spec=client.V1SelfSubjectAccessReviewSpec(
            resource_attributes=client.V1ResourceAttributes(verb=verb, resource=resource, namespace=ns, group=group)))
        return client.AuthorizationV1Api(sa).create_self_subject_access_review(review).status.allowed

    assert can("list", "deployments", group="apps") and can("delete", "ingresses", group="networking.k8s.io")
    assert not can("create", "deployments", group="apps")
    assert not can("get", "secrets")
    assert not can("list", "deployments", ns="kube-system", group="apps")
    assert not can("delete", "services")

    put(env, "rbac-sick")
    tick()
    set_ready(kube1, "rbac-sick", 0)
    restricted = HealthJob(env.store(), sa, "local-1", NS, threshold=0.0, known_regions=["local-1", "local-2"],
                           elector=LeaseElector(sa, "gco-system", "gco-health", identity="sa"))
    r = restricted.tick()
    assert r.error is None and r.leader and "rbac-sick" in r.withdrawn
    assert kube1.ingress("inference-rbac-sick") is None
    set_ready(kube1, "rbac-sick", 1)
    restricted.tick()
    tick()
    assert kube1.ingress("inference-rbac-sick") is not None
    config  # noqa: B018 - imported for kubeconfig helpers in other tests


# ---- the runner's error, primary and canary, invalid and malformed records --------------------------------------


def watchdog(env, **kw):
    return job(env, threshold=AGES, **kw)


def test_runner_error_state_is_never_overwritten(env, tick, kube1):
    put(env, "err-kept")
    tick()
    st = status(env, "err-kept")
    failed = {**st, "state": "error", "error": "the update failed: admission webhook denied the request"}
    assert env.store().write_region_status("err-kept", "local-1", failed, expected=st)  # as the runner writes it
    set_ready(kube1, "err-kept", 1)
    job(env).tick()
    st = status(env, "err-kept")
    assert (st["state"], st["error"]) == ("error", "the update failed: admission webhook denied the request")
    assert (st["replicas_ready"], st["replicas_desired"]) == (1, 1)  # the counts still follow the cluster


def test_dead_primary_is_withdrawn_even_with_a_live_canary(env, tick, kube1):
    put(env, "canary-alive", canary={"image": "example.com/org/server:2", "weight": 20})
    tick()
    assert kube1.ingress("inference-canary-alive") is not None and kube1.ingress("inference-canary-alive-canary") is not None
    set_ready(kube1, "canary-alive-canary", 1)
    set_ready(kube1, "canary-alive", 0)
    age(env, "canary-alive")
    r = watchdog(env).tick()
    st = status(env, "canary-alive")
    assert "canary-alive" in r.withdrawn and st.get("ingress") == "withdrawn"  # the live canary carries nothing ...
    assert (st["canary_ready"], st["canary_desired"]) == (1, 1)  # ... though it was seen live
    assert (st["replicas_ready"], st["replicas_desired"]) == (0, 1)  # the primary's counts
    assert kube1.ingress("inference-canary-alive") is None and kube1.ingress("inference-canary-alive-canary") is None
    tick()  # the runner agrees: neither Ingress comes back while withdrawn
    assert kube1.ingress("inference-canary-alive") is None and kube1.ingress("inference-canary-alive-canary") is None


def _recreate(kube, ingress):
    body = client.V1Ingress(metadata=client.V1ObjectMeta(name=ingress.metadata.name, namespace=ingress.metadata.namespace,
                                                         labels=ingress.metadata.labels, annotations=ingress.metadata.annotations),
                            spec=ingress.spec)
    kube.net.create_namespaced_ingress(ingress.metadata.namespace, body)


def test_invalid_record_is_still_watched_withdrawn_kept_withdrawn_and_readmitted(env, tick, kube1):
    put(env, "inv-watch")
    tick()
    ingress = kube1.ingress("inference-inv-watch")
    assert ingress is not None
    set_ready(kube1, "inv-watch", 0)
    put(env, "inv-watch", replicas=-2)  # invalid from now on: its last applied declaration keeps running
    age(env, "inv-watch")
    j = watchdog(env)
    try:
        r = j.tick()
        assert "inv-watch" in r.withdrawn and "inv-watch" in r.invalid
        assert kube1.ingress("inference-inv-watch") is None and status(env, "inv-watch")["ingress"] == "withdrawn"
        _recreate(kube1, ingress)  # re-created while the endpoint is still dead (the kept declaration, a person)
        r = j.tick()
        assert kube1.ingress("inference-inv-watch") is None
        assert status(env, "inv-watch")["ingress"] == "withdrawn"  # the flag the runner relies on stays
        set_ready(kube1, "inv-watch", 1)
        r = j.tick()
        assert "inv-watch" in r.readmitted and status(env, "inv-watch")["ingress"] == "active"
        assert env.store().get("inv-watch")["desired_state"] == "running"
    finally:
        put(env, "inv-watch")  # valid again for the tests that follow


def test_invalid_records_are_never_promoted_or_purged(env, tick, kube1):
    put(env, "inv-promo", state="deploying")
    tick()
    set_ready(kube1, "inv-promo", 1)
    put(env, "inv-promo", state="deploying", replicas=-1)  # invalid
    put(env, "inv-purge", state="deleted", replicas=-1)  # invalid, never applied anywhere
    try:
        r = job(env).tick()
        assert status(env, "inv-promo")["state"] == "running"  # watched ...
        assert "inv-promo" not in r.promoted and "inv-purge" not in r.purged  # ... but never promoted or purged
        assert env.store().get("inv-promo")["desired_state"] == "deploying"
        assert env.store().get("inv-purge") is not None
    finally:
        put(env, "inv-promo", state="deploying")
        put(env, "inv-purge", state="deleted")


MALFORMED = {
    "rs-not-a-map": "garbage",
    "rs-entry-not-a-map": {"local-1": "nope"},
    "rs-wrong-types": {"local-1": {"state": "exploded", "replicas_ready": "many", "unready_since": ["x"]}},
    "rs-huge": {"local-1": {"state": "running", "message": "x" * 100_000}},
}


def test_malformed_region_status_never_stops_a_tick(env, tick, kube1):
    for name in (*MALFORMED, "rs-control"):
        put(env, name)
    tick()
    set_ready(kube1, "rs-control", 0)
    age(env, "rs-control")
    table = env.store()._table
    saved = {name: env.store().get(name).get("region_status") for name in MALFORMED}
    try:
        for name, garbage in MALFORMED.items():  # another writer (an old version, a hand edit) wrote these
            table.update_item(Key={"endpoint_name": name}, UpdateExpression="SET region_status = :g",
                              ExpressionAttributeValues={":g": garbage})
        r = watchdog(env).tick()
        assert r.error is None and "rs-control" in r.withdrawn  # everything else went on
        assert kube1.ingress("inference-rs-control") is None
        assert set(MALFORMED) <= set(r.problems), r.problems
        assert "region_status must be a map" in r.problems["rs-not-a-map"]
        assert "region_status.local-1.state" in r.problems["rs-wrong-types"]
        for name, garbage in MALFORMED.items():  # reported, never written over, nothing acted on
            assert env.store().get(name)["region_status"] == garbage
            assert kube1.ingress(f"inference-{name}") is not None
    finally:
        for name, value in saved.items():  # readable again for the runner in the tests that follow
            table.update_item(Key={"endpoint_name": name}, UpdateExpression="SET region_status = :v",
                              ExpressionAttributeValues={":v": value})
