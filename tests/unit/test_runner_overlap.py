"""The runner's scheduling without an engine: drift planning, the free worker for changes, and the
deletions our own operations cause (runner.py)."""

from __future__ import annotations

import time
from concurrent.futures import Future
from dataclasses import replace

from gco_infra import manifests as m
from gco_infra.drift import Drift
from gco_infra.endpoint import validate_all
from gco_infra.plan import Plan, RunnerOptions, plan_stack, targets_for
from gco_infra.program import StackSettings
from gco_infra.runner import DRIFT_GRACE, Runner

REGION = "us-east-1"
S = StackSettings(stack="us-east-1", region=REGION)


def item(name, **spec):
    return {"endpoint_name": name, "desired_state": "running", "target_regions": [REGION],
            "spec": {"image": "org/server:1", **spec}}


def outputs_for(items):
    eps = {}
    for ep in validate_all(items).endpoints.values():
        objs, fp = m.declaration(ep, REGION, S.cluster)
        eps[ep.name] = {"fingerprint": fp, "objects": {r: f'{o["kind"]}/{o["metadata"]["name"]}' for r, o in objs.items()}}
    return {"endpoints": eps, "declarationVersion": m.DECLARATION_VERSION}


class NoStore:
    calls = 0


def runner(shards=1, **opts) -> Runner:
    return Runner([replace(S, shards=shards)], NoStore(), {}, RunnerOptions(**opts))


def test_a_drifted_endpoint_is_targeted_without_counting_as_changed():
    items = [item("a"), item("b")]
    v = validate_all(items)
    plan = plan_stack(S, v, outputs_for(items), full_due=False, opts=RunnerOptions())
    assert not plan.needs_operation
    plan.drifted = ["b"]
    assert plan.needs_operation and plan.touched == [] and plan.targeted == ["b"]
    targets = targets_for(plan, v, S, outputs_for(items))
    assert targets and all("b" in t for t in targets) and not any("::a" in t for t in targets)


def test_drift_of_a_changed_endpoint_is_not_listed_twice():
    plan = Plan(stack="s", region=REGION, desired={}, changed=["a"], drifted=["a", "b"])
    assert plan.targeted == ["a", "b"]


def test_a_deletion_during_our_own_operation_is_ours_and_later_ones_are_drift():
    r = runner()
    r._quiet[(REGION, "a")] = (100.0, 110.0)
    deleted = lambda t: Drift("Service", "ns", "a", "deleted", t)  # noqa: E731
    assert r._ours(REGION, "a", deleted(105.0))
    assert r._ours(REGION, "a", deleted(110.0 + DRIFT_GRACE))  # delivered late by the watch
    assert not r._ours(REGION, "a", deleted(110.0 + DRIFT_GRACE + 0.1))
    assert not r._ours(REGION, "a", deleted(99.0))
    assert not r._ours(REGION, "a", Drift("Deployment", "ns", "a", "changed by kubectl-edit", 105.0))  # by its author
    assert not r._ours(REGION, "b", deleted(105.0))


def test_drift_is_planned_only_in_the_shard_that_holds_the_endpoint():
    r = runner(shards=4)
    items = [item(f"e{i}") for i in range(12)]
    v = validate_all(items)
    r._drifted[REGION] = {f"e{i}": Drift("Service", "ns", f"e{i}", "deleted", time.monotonic()) for i in range(12)}
    seen = []
    for state in r.states.values():
        mine = [i for i in items if state.settings.owns(i["endpoint_name"])]
        plan = plan_stack(state.settings, v, outputs_for(mine), full_due=False, opts=r.opts)
        got = r._drift_for(state.settings, plan, outputs_for(mine)["endpoints"])
        assert all(state.settings.owns(n) for n in got)
        seen += got
    assert sorted(seen) == sorted(f"e{i}" for i in range(12))


def test_drift_of_an_endpoint_no_longer_declared_needs_no_repair():
    r = runner()
    items = [item("a")]
    v = validate_all(items)
    r._drifted[REGION] = {"gone": Drift("Service", "ns", "gone", "deleted", time.monotonic())}
    plan = plan_stack(S, v, outputs_for(items), full_due=False, opts=r.opts)
    assert r._drift_for(S, plan, outputs_for(items)["endpoints"]) == []
    r._settle_drift(S, plan)
    assert r._drifted[REGION] == {}


def test_the_sweep_goes_through_every_endpoint_in_batches_and_skips_targeted_ones():
    r = runner(full_every=100.0, sweep_batch=3)
    items = [item(f"e{i}") for i in range(7)]
    v = validate_all(items)
    state = r.states[S.stack]
    seen, now = [], 1000.0
    for _ in range(3):
        plan = plan_stack(S, v, outputs_for(items), full_due=False, opts=r.opts)
        plan.drifted = ["e0"] if not seen else []
        swept = r._sweep(state, plan, outputs_for(items)["endpoints"], now)
        assert len(swept) <= 3 and "e0" not in (swept if not seen else [])
        assert state.next_sweep == now + 100.0 * 3 / 7
        seen += swept
        now = state.next_sweep
    assert set(seen) >= {f"e{i}" for i in range(1, 7)}  # every endpoint within full_every
    assert seen[:3] == ["e1", "e2", "e3"] and seen[3:6] == ["e4", "e5", "e6"]


def test_describe_names_changes_drift_and_the_sweep():
    from gco_infra.runner import describe

    plan = Plan(stack="s", region=REGION, desired={}, changed=["a"], drifted=["b"], swept=["a", "c", "d"])
    assert describe(plan) == "targeted up: changes to a; drift repair of b; sweep of 2 endpoint(s) (c .. d)"
    assert describe(Plan(stack="s", region=REGION, desired={}, full=True, reason="first apply")) == \
        "full up --refresh (first apply)"


def test_without_checkpoints_the_engine_skips_them_and_with_them_it_does_not():
    assert runner().env["PULUMI_SKIP_CHECKPOINTS"] == "true"
    with_them = Runner([S], NoStore(), {"PULUMI_SKIP_CHECKPOINTS": "true"}, RunnerOptions(checkpoints=True))
    assert "PULUMI_SKIP_CHECKPOINTS" not in with_them.env
