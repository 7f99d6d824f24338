"""End to end: table -> runner (Automation API, real engine and provider) -> kube-apiserver, read back."""

from __future__ import annotations

import json
import time

from gco_infra.store import EndpointStore, StoreConfig, StoreError

from .conftest import Kube, make_runner


def put(local, name, state="running", regions=("local-1",), **spec):
    item = {"endpoint_name": name, "desired_state": state, "target_regions": list(regions),
            "spec": {"image": "example.com/org/server:1", "gpu_count": 0, **spec}}
    local.store().put_desired(item)
    return item


def container(dep):
    return dep.spec.template.spec.containers[0]


def status(env, name, region="local-1"):
    return ((env.store().get(name) or {}).get("region_status") or {}).get(region, {})


def test_full_featured_endpoint_is_created_with_every_object(env, tick, kube1):
    put(env, "full", image="vllm/vllm-openai:v0.6.3", gpu_count=2, replicas=3, capacity_type="spot",
        model_path="/models/full", model_source="s3://models/full/", env={"A": "1"}, args=["--model", "/models/full"],
        autoscaling={"enabled": True, "min_replicas": 2, "max_replicas": 5},
        canary={"image": "vllm/vllm-openai:v0.6.4", "weight": 20})
    tick()
    assert kube1.of("full") == {("Deployment", "full"), ("Service", "full"), ("Ingress", "inference-full"),
                                ("HPA", "full"), ("Deployment", "full-canary"), ("Service", "full-canary"),
                                ("Ingress", "inference-full-canary")}
    d = kube1.deployment("full")
    c = container(d)
    assert c.image == "vllm/vllm-openai:v0.6.3"
    assert c.args == ["--model", "/models/full", "--root-path", "/inference/full"]
    assert c.resources.limits["nvidia.com/gpu"] == "2"
    assert d.spec.template.spec.node_selector["karpenter.sh/capacity-type"] == "spot"
    assert d.spec.template.spec.init_containers[0].args[:3] == ["s3", "sync", "s3://models/full/"]
    assert d.metadata.annotations["pulumi.com/skipAwait"] == "true"
    assert d.metadata.labels["gco.io/type"] == "inference"
    hpa = kube1.autoscaler("full")
    assert (hpa.spec.min_replicas, hpa.spec.max_replicas) == (2, 5)
    deadline = time.monotonic() + 60  # we leave the count to the HPA controller: it enforces minReplicas
    while kube1.deployment("full").spec.replicas != 2 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert kube1.deployment("full").spec.replicas == 2
    canary_ing = kube1.ingress("inference-full-canary")
    action = json.loads(canary_ing.metadata.annotations["alb.ingress.kubernetes.io/actions.weighted"])
    assert [t["weight"] for t in action["forwardConfig"]["targetGroups"]] == [80, 20]
    assert status(env, "full")["state"] == "creating"


def test_spec_changes_reach_the_live_deployment(env, tick, kube1):
    put(env, "change", env={"A": "1"})
    tick()
    put(env, "change", env={"A": "2", "B": "x"}, resources={"limits": {"memory": "20Gi"}}, args=["--fast"])
    results = tick()
    assert any(r.action == "targeted" and r.changed == 1 for r in results if r.region == "local-1")
    c = container(kube1.deployment("change"))
    assert {e.name: e.value for e in c.env} == {"A": "2", "B": "x"}
    assert c.resources.limits["memory"] == "20Gi"
    assert c.args == ["--fast"]


def test_scale_stop_and_restart_at_one_replica(env, tick, kube1):
    put(env, "scaler", replicas=1)
    tick()
    put(env, "scaler", replicas=4)
    tick()
    assert kube1.deployment("scaler").spec.replicas == 4
    put(env, "scaler", state="stopped", replicas=1)
    tick()
    assert kube1.deployment("scaler").spec.replicas == 0
    assert kube1.ingress("inference-scaler") is None
    assert kube1.service("scaler") is not None
    assert status(env, "scaler")["state"] == "stopped"
    put(env, "scaler", state="running", replicas=1)
    tick()
    assert kube1.deployment("scaler").spec.replicas == 1
    assert kube1.ingress("inference-scaler") is not None


def test_canary_add_weight_change_and_rollback(env, tick, kube1):
    put(env, "canaried")
    tick()
    primary_before = kube1.ingress("inference-canaried").to_dict()
    put(env, "canaried", canary={"image": "example.com/org/server:2", "weight": 10})
    tick()
    assert kube1.deployment("canaried-canary") is not None
    put(env, "canaried", canary={"image": "example.com/org/server:2", "weight": 50})
    tick()
    action = json.loads(kube1.ingress("inference-canaried-canary").metadata.annotations["alb.ingress.kubernetes.io/actions.weighted"])
    assert [t["weight"] for t in action["forwardConfig"]["targetGroups"]] == [50, 50]
    put(env, "canaried")  # rollback
    tick()
    assert kube1.of("canaried") == {("Deployment", "canaried"), ("Service", "canaried"), ("Ingress", "inference-canaried")}
    primary = kube1.ingress("inference-canaried")
    assert not any(k.startswith("alb.ingress.kubernetes.io/actions") for k in primary.metadata.annotations)
    backend = primary.spec.rules[0].http.paths[0].backend.service
    assert (backend.name, backend.port.number) == ("canaried", 80)
    assert primary.spec.to_dict() == primary_before["spec"]


def test_region_removed_only_there(env, tick, kube1, kube2):
    put(env, "twoway", regions=("local-1", "local-2"))
    tick()
    assert kube1.deployment("twoway") and kube2.deployment("twoway")
    put(env, "twoway", regions=("local-2",))
    tick()
    assert kube1.of("twoway") == set()
    assert kube2.deployment("twoway") is not None
    assert status(env, "twoway", "local-1")["state"] == "deleted"


def test_deleted_removes_everything(env, tick, kube1, kube2):
    put(env, "doomed", regions=("local-1", "local-2"), canary={"image": "a/b:2", "weight": 5})
    tick()
    put(env, "doomed", state="deleted", regions=("local-1", "local-2"))
    tick()
    assert kube1.of("doomed") == set() and kube2.of("doomed") == set()
    assert status(env, "doomed", "local-1")["state"] == "deleted"
    assert status(env, "doomed", "local-2")["state"] == "deleted"


def test_out_of_band_deletion_restored_by_full_reconcile(env, tick, kube1):
    put(env, "restored")
    tick()
    kube1.apps.delete_namespaced_deployment("restored", "gco-inference")
    kube1.net.delete_namespaced_ingress("inference-restored", "gco-inference")
    assert kube1.deployment("restored") is None
    tick(force_full=True)
    assert kube1.deployment("restored") is not None
    assert kube1.ingress("inference-restored") is not None


def test_invalid_record_leaves_running_objects_while_others_deploy(env, tick, kube1):
    put(env, "steady", replicas=2, env={"V": "1"})
    tick()
    before = kube1.deployment("steady").metadata.resource_version
    put(env, "steady", replicas=-5, env={"V": "2"})  # invalid
    put(env, "bystander")
    tick(force_full=True)
    d = kube1.deployment("steady")
    assert d.metadata.resource_version == before
    assert d.spec.replicas == 2 and {e.name: e.value for e in container(d).env} == {"V": "1"}
    assert kube1.deployment("bystander") is not None
    st = status(env, "steady")
    assert st["state"] == "error" and "spec.replicas must be >= 0, got -5" in st["error"]
    put(env, "steady", replicas=2, env={"V": "3"})  # fixed: applied again
    tick()
    assert {e.name: e.value for e in container(kube1.deployment("steady")).env} == {"V": "3"}


def test_unreadable_table_changes_nothing(env, tick, kube1):
    put(env, "kept")
    tick()
    names_before = kube1.names()
    broken = make_runner(env)
    broken.store = EndpointStore(StoreConfig(table="no-such-table", region="us-east-1", endpoint_url=env.dynamodb_endpoint))
    try:
        try:
            broken.tick(force_full=True)
            raise AssertionError("tick should have stopped on the unreadable table")
        except StoreError as exc:
            assert "no-such-table" in str(exc)
        assert broken.operations == 0
    finally:
        broken.close()
    assert kube1.names() == names_before


def test_no_change_tick_runs_no_pulumi_operation(env, tick, runner):
    put(env, "quiet")
    tick()
    before = runner.operations
    results = tick()
    assert runner.operations == before
    assert all(r.action == "none" for r in results)
