"""What only a cluster with controllers shows: the HPA owning replicas, other field managers' drift,
garbage collection after deletes, and the watchdog's flag on records that turned invalid."""

from __future__ import annotations

import time

from kubernetes import client

from .test_endpoints_e2e import put, status

NS = "gco-inference"


def _until(check, what, timeout=90.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"{what} within {timeout:.0f}s")


def _replicas(kube, name):
    return kube.deployment(name).spec.replicas


def test_the_hpa_owns_replicas_and_no_switch_conflicts(env, tick, kube1):
    """Issue 11.1, with the real HPA controller (it enforces minReplicas without metrics)."""
    put(env, "hpa-a", replicas=3)
    tick()
    assert _replicas(kube1, "hpa-a") == 3
    # switching autoscaling on keeps the running count (within the new bounds) instead of dropping to 1
    put(env, "hpa-a", replicas=3, autoscaling={"enabled": True, "min_replicas": 2, "max_replicas": 6})
    tick()
    assert kube1.autoscaler("hpa-a") is not None
    assert _replicas(kube1, "hpa-a") == 3
    # a higher minimum: the HPA controller scales the Deployment itself and so owns spec.replicas
    put(env, "hpa-a", replicas=3, autoscaling={"enabled": True, "min_replicas": 4, "max_replicas": 6})
    tick()
    _until(lambda: _replicas(kube1, "hpa-a") == 4, "the HPA controller did not scale to minReplicas")
    owners = {f.manager for f in kube1.deployment("hpa-a").metadata.managed_fields
              if "f:replicas" in str(f.fields_v1)}
    assert owners and all("pulumi" not in o for o in owners), owners
    # autoscaling off again: the record's count wins over the HPA's, without a conflict
    put(env, "hpa-a", replicas=2)
    tick()
    assert _replicas(kube1, "hpa-a") == 2 and kube1.autoscaler("hpa-a") is None
    # stopped after the HPA scaled: replicas 0 applies, and the HPA is gone
    put(env, "hpa-a", replicas=2, autoscaling={"enabled": True, "min_replicas": 5, "max_replicas": 6})
    tick()
    _until(lambda: _replicas(kube1, "hpa-a") == 5, "the HPA controller did not scale to minReplicas")
    put(env, "hpa-a", state="stopped", replicas=2, autoscaling={"enabled": True, "min_replicas": 5, "max_replicas": 6})
    tick()
    assert _replicas(kube1, "hpa-a") == 0 and kube1.autoscaler("hpa-a") is None
    time.sleep(6)  # one HPA period: nothing scales a stopped endpoint back up
    assert _replicas(kube1, "hpa-a") == 0
    # running again with autoscaling: seeded at min_replicas (an HPA never scales up from 0)
    put(env, "hpa-a", replicas=2, autoscaling={"enabled": True, "min_replicas": 5, "max_replicas": 6})
    tick()
    assert _replicas(kube1, "hpa-a") == 5 and kube1.autoscaler("hpa-a") is not None
    put(env, "hpa-a", state="deleted")
    tick()


def test_drift_by_other_field_managers_is_repaired_and_blocks_nothing(env, tick, runner, kube1):
    """Issue 11.13: `kubectl scale` and a hand edit of a Service port, then a change of another
    endpoint in the same stack reaches the cluster, and the next full reconcile repairs both."""
    put(env, "drift-a")
    put(env, "drift-b")
    tick()
    apps = kube1.apps
    apps.patch_namespaced_deployment_scale("drift-a", NS, {"spec": {"replicas": 5}}, field_manager="kubectl")
    kube1.core.patch_namespaced_service("drift-a", NS, [{"op": "replace", "path": "/spec/ports/0/port", "value": 8080}],
                                        field_manager="kubectl-edit")
    assert _replicas(kube1, "drift-a") == 5 and kube1.service("drift-a").spec.ports[0].port == 8080

    put(env, "drift-b", env={"CHANGED": "1"})
    results = tick()
    assert any(r.action == "targeted" for r in results)
    envs = {e.name: e.value for e in kube1.deployment("drift-b").spec.template.spec.containers[0].env or []}
    assert envs == {"CHANGED": "1"}

    full = tick(force_full=True)
    assert all(not r.failed for r in full), [r.summary() for r in full]
    assert _replicas(kube1, "drift-a") == 1
    assert kube1.service("drift-a").spec.ports[0].port == 80
    again = tick(force_full=True)  # and it stays repaired: no conflict on the next full reconcile either
    assert all(not r.failed for r in again)
    for name in ("drift-a", "drift-b"):
        put(env, name, state="deleted")
    tick()


def test_deleted_endpoint_leaves_no_replica_set_or_pod(env, tick, kube1):
    """Background deletion: the apply does not wait for pods, the garbage collector removes them."""
    put(env, "gc-a", replicas=2)
    tick()
    _until(lambda: len(kube1.core.list_namespaced_pod(NS, label_selector="app=gc-a").items) == 2,
           "the replica set controller did not create the pods")
    put(env, "gc-a", state="deleted")
    tick()
    assert kube1.deployment("gc-a") is None

    def gone():
        rs = kube1.apps.list_namespaced_replica_set(NS, label_selector="app=gc-a").items
        pods = kube1.core.list_namespaced_pod(NS, label_selector="app=gc-a").items
        return not rs and not pods
    _until(gone, "the garbage collector did not remove the replica set and pods")


def test_a_record_turning_invalid_keeps_its_ingress_withdrawn(env, tick, kube1):
    """Issue 11.2: the kept declaration keeps the watchdog's flag, so a full reconcile of a record
    that became invalid while withdrawn brings back neither Ingress."""
    put(env, "wd-a", canary={"image": "example.com/org/server:2", "weight": 10})
    tick()
    assert kube1.ingress("inference-wd-a") is not None and kube1.ingress("inference-wd-a-canary") is not None
    # the watchdog: delete the Ingresses and record the withdrawal
    store = env.store()
    for name in ("inference-wd-a", "inference-wd-a-canary"):
        kube1.net.delete_namespaced_ingress(name, NS)
    stored = status(env, "wd-a")
    assert store.write_region_status("wd-a", "local-1", {**stored, "ingress": "withdrawn"}, expected=stored)
    tick()
    assert kube1.ingress("inference-wd-a") is None
    put(env, "wd-a", replicas=-1, canary={"image": "example.com/org/server:2", "weight": 10})  # now invalid
    results = tick(force_full=True)
    assert all(not r.failed for r in results), [r.summary() for r in results]
    assert kube1.ingress("inference-wd-a") is None and kube1.ingress("inference-wd-a-canary") is None
    assert kube1.deployment("wd-a") is not None  # the rest of its last declaration stays
    assert status(env, "wd-a")["state"] == "error" and status(env, "wd-a")["ingress"] == "withdrawn"
    put(env, "wd-a", state="deleted")
    tick()


def test_an_update_that_fails_as_a_whole_writes_no_success(env, tmp_path):
    """Issue 11.5: credentials the cluster refuses fail every endpoint of the update; no status says
    creating, and the error says what failed (not "2 errors occurred")."""
    import json
    from dataclasses import replace

    from .conftest import make_runner

    cfg = json.loads(env.kubeconfig("local-1").read_text())
    cfg["users"][0]["user"]["token"] = "not-a-valid-token"
    bad = tmp_path / "kubeconfig-bad"
    bad.write_text(json.dumps(cfg))
    r = make_runner(env, stacks=("local",))
    try:
        for state in r.states.values():
            state.settings = replace(state.settings, kubeconfig=str(bad), stack="local-badauth")
        r.states = {"local-badauth": next(iter(r.states.values()))}
        put(env, "auth-a")
        put(env, "auth-b")
        results = r.tick()
        assert results[0].action == "failed", results[0].summary()
        for name in ("auth-a", "auth-b"):
            st = status(env, name)
            assert st.get("state") == "error", st
            assert "credentials" in st["error"] or "nauthorized" in st["error"], st["error"]
            assert "errors occurred" not in st["error"]
    finally:
        r.close()
        for name in ("auth-a", "auth-b"):
            put(env, name, state="deleted")
