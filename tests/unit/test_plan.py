"""The runner's planning and status decisions (plan.py): pure functions, no engine."""

from __future__ import annotations

from gco_infra import manifests as m
from gco_infra.endpoint import validate_all
from gco_infra.program import StackSettings
from gco_infra.plan import (
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


def test_first_apply_and_a_due_full_reconcile_are_full():
    items = [item("a")]
    assert plan_stack(S, validate_all(items), None, full_due=False, opts=OPTS).full
    assert plan_stack(S, validate_all(items), outputs_for(items), full_due=True, opts=OPTS).reason == "full reconcile"


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
    a["region_status"] = {"us-east-1": {"state": "running", "ingress": "withdrawn", "unready_since": "2026-11-27T10:00:00Z", "replicas_ready": 0}}
    out = outputs_for([item("a")])
    plan = _plan([a], out)
    assert plan.changed == ["a"]
    res = StackResult(stack=S.stack, region=S.region, action="targeted")
    up = status_updates(plan, res, validate_all([a]), {"a": a})["a"]
    assert up["state"] == "updating" and up["ingress"] == "withdrawn" and up["unready_since"] == "2026-11-27T10:00:00Z"
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


# ---- failures, invalid records and malformed statuses (issue 11: 4, 5, 10) ----------------------------


def _by_name(items):
    return {i["endpoint_name"]: i for i in items}


def test_an_update_failing_as_a_whole_writes_no_success_anywhere():
    items = [item("a"), item("b")]
    plan = _plan(items, None)
    for res in (
        StackResult(stack=S.stack, region=S.region, action="failed", message="error: failed to save checkpoint"),
        StackResult(stack=S.stack, region=S.region, action="failed", message="ProgramError: kubeconfig missing",
                    endpoint_errors={"*": "Traceback ..."}),
        # an engine error tied to no endpoint next to one tied to an endpoint: still a failure of all
        StackResult(stack=S.stack, region=S.region, action="failed", message="error: Unauthorized",
                    endpoint_errors={"*": "Unauthorized", "a": "create failed"}),
    ):
        ups = status_updates(plan, res, validate_all(items), _by_name(items))
        assert {u["state"] for u in ups.values()} == {"error"}, ups
        assert set(ups) == {"a", "b"}
        assert all(u["error"] for u in ups.values())


def test_the_engine_message_names_what_failed_not_how_many():
    from gco_infra.runner import _engine_message

    text = ("error: update failed\n  kubernetes:apps/v1:Deployment (x): error: failed to save checkpoint: "
            "write /b/.pulumi/stacks/x.json: read-only file system\nerror: 2 errors occurred:")
    msg = _engine_message(text)
    assert "read-only file system" in msg and "2 errors occurred" not in msg


def test_invalid_record_status_only_in_regions_it_targets():
    bad = {"endpoint_name": "bad", "desired_state": "running", "target_regions": ["eu-west-1"],
           "spec": {"image": "org/server:1", "replicas": -1}}
    plan = _plan([bad], None)
    res = StackResult(stack=S.stack, region=S.region, action="full")
    assert status_updates(plan, res, validate_all([bad]), _by_name([bad])) == {}
    bad["target_regions"] = ["eu-west-1", "us-east-1"]
    ups = status_updates(_plan([bad], None), res, validate_all([bad]), _by_name([bad]))
    assert ups["bad"]["state"] == "error" and "spec.replicas" in ups["bad"]["error"]


def test_invalid_record_held_by_the_stack_reports_there_even_if_it_no_longer_targets_it():
    good = item("e")
    out = outputs_for([good])
    bad = dict(good, target_regions="us-east-1", spec={"image": "org/server:1", "replicas": -1})
    plan = _plan([bad], out)
    assert plan.kept == ["e"] and plan.removed == []
    ups = status_updates(plan, StackResult(stack=S.stack, region=S.region), validate_all([bad]), _by_name([bad]))
    assert ups["e"]["state"] == "error"


def test_malformed_region_status_never_stops_status_writes_for_others():
    weird = [
        dict(item("a"), region_status="garbage"),
        dict(item("b"), region_status={"us-east-1": ["not", "a", "map"]}),
        dict(item("c"), region_status={"us-east-1": {"state": "exploded", "replicas_ready": "many", "error": "x" * 100_000}}),
        dict(item("d"), region_status=[1, 2]),
        item("ok"),
    ]
    plan = _plan(weird, None)
    ups = status_updates(plan, StackResult(stack=S.stack, region=S.region, action="full"), validate_all(weird),
                         _by_name(weird))
    # entries neither writer can read back are left alone (and reported); the others go on
    assert set(ups) == {"ok"}


def test_a_gpu_metric_the_cluster_cannot_serve_is_said_in_the_region_status():
    """The platform's CLI writes autoscaling metric gpu: the endpoint deploys, the note says why the
    metric is missing in this region, and it disappears when the record no longer asks for it."""
    a = item("a", autoscaling={"enabled": True, "metrics": [{"type": "gpu", "target": 60}]})
    plan = _plan([a], None)
    assert plan.created == ["a"]
    up = status_updates(plan, StackResult(stack=S.stack, region=S.region, action="full"), validate_all([a]), {"a": a})["a"]
    assert up["state"] == "creating" and "gpuUtilizationMetric" in up["note"]
    a["region_status"] = {S.region: up}
    b = dict(a, spec={"image": "org/server:1", "autoscaling": {"enabled": True}})
    plan2 = _plan([b], outputs_for([a]))
    up2 = status_updates(plan2, StackResult(stack=S.stack, region=S.region, action="targeted"), validate_all([b]), {"a": b})["a"]
    assert "note" not in up2


def test_outputs_follow_the_resources_a_checkpoint_holds():
    """After `pulumi state move` the outputs still list what left and miss what arrived."""
    from gco_infra.plan import held_endpoints, reconcile_outputs

    comp = "gco:inference:Endpoint"
    deployment = {"resources": [
        {"urn": "urn:pulumi:s::gco-infra::pulumi:pulumi:Stack::gco-infra-s", "type": "pulumi:pulumi:Stack"},
        {"urn": f"urn:pulumi:s::gco-infra::{comp}::stays", "type": comp},
        {"urn": f"urn:pulumi:s::gco-infra::{comp}::arrived", "type": comp},
        {"urn": f"urn:pulumi:s::gco-infra::{comp}$kubernetes:apps/v1:Deployment::stays", "type": "kubernetes:apps/v1:Deployment"},
    ]}
    assert held_endpoints(deployment) == {"stays", "arrived"}
    outputs = outputs_for([item("stays"), item("left")])
    fixed = reconcile_outputs(outputs, held_endpoints(deployment))
    assert set(fixed["endpoints"]) == {"stays", "arrived"}
    assert fixed["endpoints"]["stays"] == outputs["endpoints"]["stays"]
    plan = plan_stack(S, validate_all([item("stays"), item("arrived")]), fixed, full_due=False, opts=OPTS)
    assert plan.removed == [] and plan.changed == ["arrived"]


def test_switching_autoscaling_off_hands_replicas_back_in_the_same_tick():
    from gco_infra.plan import hpa_handbacks

    on = [item("a", replicas=2, autoscaling={"enabled": True, "min_replicas": 4}), item("b")]
    out = outputs_for(on)
    off = [item("a", replicas=2), item("b")]
    plan = _plan(off, out)
    assert plan.changed == ["a"] and hpa_handbacks(plan, off, S, out) == ["a"]
    stopped = [item("a", state="stopped", replicas=2), item("b")]
    assert hpa_handbacks(_plan(stopped, out), stopped, S, out) == []  # an HPA never scales from 0
    assert hpa_handbacks(_plan(on, out), on, S, out) == []


def test_a_never_updated_stack_that_holds_moved_endpoints_counts_them():
    from gco_infra.plan import reconcile_outputs

    fixed = reconcile_outputs({}, {"moved"})
    assert set(fixed["endpoints"]) == {"moved"}
    plan = plan_stack(S, validate_all([]), fixed, full_due=False, opts=OPTS)
    assert plan.removed == ["moved"] and plan.applied == 1  # counted by the deletion bound, not a "first apply"
    assert reconcile_outputs({}, set()) == {}
