"""The health job against the real apiserver and moto server; Deployment status is written by the test
(there is no controller-manager), as envtest users do."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import yaml
from kubernetes import client, config, utils

from gco_infra.health import HealthJob, LeaseElector
from gco_infra.store import EndpointStore, StoreConfig

from .test_endpoints_e2e import put, status

ROOT = Path(__file__).resolve().parents[2]
NS = ("gco-inference",)


def set_ready(kube, name, ready, ns="gco-inference"):
    d = kube.apps.read_namespaced_deployment(name, ns)
    want = d.spec.replicas if d.spec.replicas is not None else 1
    kube.apps.patch_namespaced_deployment_status(name, ns, {"status": {
        "replicas": want, "readyReplicas": ready, "availableReplicas": ready, "updatedReplicas": want,
        "observedGeneration": d.metadata.generation}})


def job(env, **kw):
    kw.setdefault("known_regions", ["local-1", "local-2"])
    return HealthJob(env.store(), env.kube("local-1"), "local-1", NS, **kw)


@pytest.fixture(scope="module")
def system(env):
    """deploy/gco-system.yaml applied to local-1: namespace, service accounts, least-privilege Roles."""
    api = env.kube("local-1")
    docs = [d for d in yaml.safe_load_all((ROOT / "deploy" / "gco-system.yaml").read_text()) if d]
    for doc in docs:
        try:
            utils.create_from_dict(api, doc)
        except utils.FailToCreateError as exc:
            if not all(e.status == 409 for e in exc.api_exceptions):
                raise
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
    assert r.withdrawn == ["sick"]
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

    j.store._table.meta.client.meta.events.register("after-call.dynamodb.Scan", stop_racer)
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


def test_purge_when_all_live_regions_are_deleted(env, tick, kube1):
    put(env, "ghost", regions=("local-1", "ap-gone-1"))  # ap-gone-1 is no longer a platform region
    tick()
    put(env, "ghost", state="deleted", regions=("local-1", "ap-gone-1"))
    tick()
    assert status(env, "ghost")["state"] == "deleted"
    r = job(env).tick()
    assert r.purged == ["ghost"] and env.store().get("ghost") is None


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
