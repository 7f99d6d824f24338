"""The runner's planning and status decisions: pure functions, no engine."""

from __future__ import annotations

from gco_infra import manifests as m
from gco_infra.endpoint import validate_all
from gco_infra.program import StackSettings
from gco_infra.runner import (
    exact_glob,
    Plan, RunnerOptions, StackResult, endpoint_of_object, exit_code, plan_stack, status_updates, targets_for,
)

S = StackSettings(stack="us-east-1", region="us-east-1")
OPTS = RunnerOptions()


def item(name, state="running", regions=("us-east-1",), **spec):
    return {"endpoint_name": name, "desired_state": state, "target_regions": list(regions),
            "spec": {"image": "org/server:1", **spec}}


def outputs_for(items):
    v = validate_all(items)
    eps = {}
    for ep in v.endpoints.values():
        objs, fp = m.declaration(ep, S.region, S.cluster)
        if objs:
            eps[ep.name] = {"fingerprint": fp,
                            "objects": {r: f'{o["kind"]}/{o["metadata"]["name"]}' for r, o in objs.items()}}
    return {"endpoints": eps, "declarationVersion": m.DECLARATION_VERSION}


def test_nothing_changed_needs_no_operation():
    items = [item(f"e{i}") for i in range(5)]
    plan = plan_stack(S, validate_all(items), outputs_for(items), full_due=False, opts=OPTS)
    assert not plan.needs_operation and plan.touched == []


def test_one_change_among_many_is_targeted():
    items = [item(f"e{i}") for i in range(50)]
    out = outputs_for(items)
    items[7] = item("e7", env={"A": "2"})
    plan = plan_stack(S, validate_all(items), out, full_due=False, opts=OPTS)
    assert plan.changed == ["e7"] and not plan.full
    urns = targets_for(plan, validate_all(items), S, out)
    assert not any("pulumi:pulumi:Stack" in u for u in urns)  # targeting the root would target everything
    assert "urn:pulumi:us-east-1::gco-infra::gco:inference:Endpoint*::e7" in urns
    assert "urn:pulumi:us-east-1::gco-infra::gco:inference:Endpoint$kubernetes:apps/v1:Deployment*::e7" in urns
    assert not any("::e8" in u for u in urns)


def test_first_apply_and_periodic_are_full():
    items = [item("a")]
    assert plan_stack(S, validate_all(items), None, full_due=False, opts=OPTS).full
    assert plan_stack(S, validate_all(items), outputs_for(items), full_due=True, opts=OPTS).reason == "periodic full reconcile"


def test_removal_targets_old_objects_including_canary():
    before = [item("a", canary={"image": "x/y:2", "weight": 5})]
    out = outputs_for(before)
    after = [item("a")]
    plan = plan_stack(S, validate_all(after), out, full_due=False, opts=OPTS)
    urns = targets_for(plan, validate_all(after), S, out)
    assert any(u.endswith("Ingress*::inference-a-canary") for u in urns)


def test_invalid_record_is_not_removed():
    items = [item("a"), item("b")]
    out = outputs_for(items)
    broken = [item("a"), item("b", replicas=-1)]
    plan = plan_stack(S, validate_all(broken), out, full_due=False, opts=OPTS)
    assert plan.removed == [] and "b" in plan.invalid


def test_mass_deletion_refused_then_allowed():
    items = [item(f"e{i}") for i in range(30)]
    out = outputs_for(items)
    remaining = items[:20]
    plan = plan_stack(S, validate_all(remaining), out, full_due=False, opts=OPTS)
    assert plan.refused and "refusing to remove 10 endpoints" in plan.refused and "bound 3" in plan.refused
    allowed = plan_stack(S, validate_all(remaining), out, full_due=False, opts=RunnerOptions(allow_mass_delete=True))
    assert allowed.refused is None and len(allowed.removed) == 10


def test_two_removals_always_within_bound():
    items = [item("a"), item("b"), item("c")]
    plan = plan_stack(S, validate_all(items[:1]), outputs_for(items), full_due=False, opts=OPTS)
    assert plan.refused is None


def _plan(items, out, **kw):
    return plan_stack(S, validate_all(items), out, full_due=False, opts=OPTS, **kw)


def test_status_written_only_when_it_changes():
    items = [item("a"), item("b")]
    plan = _plan(items, None)
    res = StackResult(stack=S.stack, region=S.region, action="full")
    ups = status_updates(plan, res, validate_all(items), {i["endpoint_name"]: i for i in items})
    assert {n: u["state"] for n, u in ups.items()} == {"a": "creating", "b": "creating"}
    # Stored already: a later no-op tick writes nothing.
    for i in items:
        i["region_status"] = {"us-east-1": ups[i["endpoint_name"]]}
    plan2 = _plan(items, outputs_for(items))
    res2 = StackResult(stack=S.stack, region=S.region)
    assert status_updates(plan2, res2, validate_all(items), {i["endpoint_name"]: i for i in items}) == {}


def test_health_fields_are_preserved_in_status_writes():
    a = item("a", replicas=3)
    a["region_status"] = {"us-east-1": {"state": "running", "ingress": "withdrawn", "unready_since": "t0", "replicas_ready": 0}}
    out = outputs_for([item("a")])
    plan = _plan([a], out)
    assert plan.changed == ["a"]
    res = StackResult(stack=S.stack, region=S.region, action="targeted")
    up = status_updates(plan, res, validate_all([a]), {"a": a})["a"]
    assert up["state"] == "updating" and up["ingress"] == "withdrawn" and up["unready_since"] == "t0"
    assert up["replicas_desired"] == 3


def test_failed_endpoint_gets_error_others_get_states():
    items = [item("good"), item("bad")]
    plan = _plan(items, None)
    res = StackResult(stack=S.stack, region=S.region, action="full", endpoint_errors={"bad": "admission webhook denied"})
    ups = status_updates(plan, res, validate_all(items), {i["endpoint_name"]: i for i in items})
    assert ups["bad"]["state"] == "error" and "admission webhook denied" in ups["bad"]["error"]
    assert ups["good"]["state"] == "creating" and "error" not in ups["good"]


def test_invalid_record_gets_error_status():
    items = [item("a", replicas=-1)]
    plan = _plan(items, None)
    ups = status_updates(plan, StackResult(stack=S.stack, region=S.region, action="full"), validate_all(items),
                         {"a": items[0]})
    assert ups["a"]["state"] == "error" and "spec.replicas must be >= 0" in ups["a"]["error"]


def test_removed_and_stopped_states():
    items = [item("gone", state="deleted"), item("paused", state="stopped")]
    out = outputs_for([item("gone"), item("paused")])
    plan = _plan(items, out)
    res = StackResult(stack=S.stack, region=S.region, action="targeted")
    ups = status_updates(plan, res, validate_all(items), {i["endpoint_name"]: i for i in items})
    assert ups["gone"]["state"] == "deleted" and ups["paused"]["state"] == "stopped"
    assert ups["paused"]["replicas_desired"] == 0


def test_object_names_map_back_to_endpoints():
    assert endpoint_of_object("inference-llama3-canary") == "llama3"
    assert endpoint_of_object("llama3-canary") == "llama3"
    assert endpoint_of_object("inference-llama3") == "llama3"


def test_exit_codes():
    ok = StackResult(stack="s", region="r", action="none")
    assert exit_code([ok]) == 0
    assert exit_code([ok, StackResult(stack="s", region="r", action="refused")]) == 4
    assert exit_code([StackResult(stack="s", region="r", action="skipped")]) == 75
    assert exit_code([StackResult(stack="s", region="r", action="full", failed=1)]) == 1
    assert isinstance(Plan(stack="s", region="r", desired={}), Plan)


def test_readmitted_ingress_is_applied_again_even_with_equal_objects():
    withdrawn = item("a")
    withdrawn["region_status"] = {"us-east-1": {"state": "running", "ingress": "withdrawn"}}
    recovered = item("a")
    recovered["region_status"] = {"us-east-1": {"state": "running", "ingress": "active"}}
    # Health deleted the Ingress and the runner never ticked in between: objects equal, marker differs.
    plan = plan_stack(S, validate_all([recovered]), outputs_for([item("a")]), full_due=False, opts=OPTS)
    assert plan.changed == ["a"]
    plan = plan_stack(S, validate_all([withdrawn]), outputs_for([item("a")]), full_due=False, opts=OPTS)
    assert plan.changed == ["a"]


def test_exact_glob_matches_only_its_urn():
    import re

    urn = "urn:pulumi:s::gco-infra::gco:inference:Endpoint$kubernetes:apps/v1:Deployment::e7"
    glob = exact_glob(urn)
    pattern = re.compile("^" + ".*".join("[^:]*".join(re.escape(p) for p in seg.split("*")) for seg in glob.split("**")) + "$")
    assert pattern.match(urn)
    assert not pattern.match(urn.replace("::e7", "::e77"))
    assert not pattern.match(urn.replace("::e7", "::xe7"))
    assert not pattern.match(urn.replace("Deployment", "Service"))


def test_full_reconcile_without_changes_writes_no_status():
    items = [item("a"), item("b")]
    for i in items:
        i["region_status"] = {"us-east-1": {"state": "running", "replicas_ready": 1, "replicas_desired": 1}}
    plan = plan_stack(S, validate_all(items), outputs_for(items), full_due=True, opts=OPTS)
    assert plan.full and plan.touched == []
    res = StackResult(stack=S.stack, region=S.region, action="full")
    assert status_updates(plan, res, validate_all(items), {i["endpoint_name"]: i for i in items}) == {}
