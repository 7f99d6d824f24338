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
from gco_infra.runner import (BACKGROUND_WAIT, REPAIR_LIMIT, Operation, Runner, answered_by_the_operation, ours, quiet_sdk_debug,
                              sweep_batch, sweep_now)

REGION = "us-east-1"
S = StackSettings(stack="us-east-1", region=REGION)


def item(name, **spec):
    return {"endpoint_name": name, "desired_state": "running", "target_regions": [REGION],
            "spec": {"image": "org/server:1", **spec}}


def outputs_for(items):
    eps = {}
    for ep in validate_all(items).endpoints.values():
        objs, fp = m.declaration(ep, REGION, S.cluster)
        eps[ep.name] = {"fingerprint": fp, "objects": {  # as the stack's outputs name them
            r: f'{o["kind"]}/{o["metadata"]["name"]}' for r, o in objs.items()}}
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


def test_a_deletion_is_ours_only_when_the_endpoint_no_longer_declares_that_object():
    applied = outputs_for([item("a")])["endpoints"]["a"]
    service = next(ref for ref in applied["objects"].values() if ref.startswith("Service/"))
    kind, name = service.split("/")
    assert not ours(Drift(kind, "gco-inference", name, "deleted", 1.0), applied)  # still declared: someone deleted it
    assert ours(Drift("Ingress", "gco-inference", "gone-canary", "deleted", 1.0), applied)  # no longer declared
    assert not ours(Drift(kind, "gco-inference", name, "changed by kubectl-edit", 1.0), applied)  # has an author


def test_an_endpoint_another_writer_keeps_changing_is_left_to_the_sweep():
    messages = []
    r = Runner([S], NoStore(), {}, RunnerOptions(), progress=messages.append)
    items = [item("a")]
    v, out = validate_all(items), outputs_for(items)
    kind, name = next(ref for ref in out["endpoints"]["a"]["objects"].values() if ref.startswith("Deployment/")).split("/")
    ns = "gco-inference"
    for t in range(REPAIR_LIMIT + 3):  # planned while every worker is busy: not a repair yet
        r._drifted[REGION] = {"a": Drift(kind, ns, name, "changed by old-controller", float(t))}
        plan = plan_stack(S, v, out, full_due=False, opts=r.opts)
        assert r._drift_for(S, plan, out["endpoints"], now=1000.0 + t) == ["a"]
    repaired = []
    for t in range(REPAIR_LIMIT + 3):
        r._drifted[REGION] = {"a": Drift(kind, ns, name, "changed by old-controller", float(t))}
        plan = plan_stack(S, v, out, full_due=False, opts=r.opts)
        repaired.append(bool(r._drift_for(S, plan, out["endpoints"], now=1000.0 + t)))
        if repaired[-1]:  # started: what tick() records when the repair's operation starts
            r._repairs.setdefault((REGION, "a"), []).append(1000.0 + t)
        r._settle_drift(S, plan)
    assert repaired == [True] * REPAIR_LIMIT + [False] * 3
    assert sum("fighting the declaration" in m for m in messages) == 1
    plan = plan_stack(S, v, out, full_due=False, opts=r.opts)
    r._drifted[REGION] = {"a": Drift(kind, ns, name, "changed by old-controller", 0.0)}
    assert r._drift_for(S, plan, out["endpoints"], now=1000.0 + 700) == ["a"]  # a new window


def test_drift_is_planned_only_in_the_shard_that_holds_the_endpoint():
    r = runner(shards=4)
    items = [item(f"e{i}") for i in range(12)]
    v = validate_all(items)
    r._drifted[REGION] = {f"e{i}": Drift("Deployment", "gco-inference", f"e{i}", "changed by kubectl-edit",
                                         time.monotonic()) for i in range(12)}
    seen = []
    for state in r.states.values():
        mine = [i for i in items if state.settings.owns(i["endpoint_name"])]
        plan = plan_stack(state.settings, v, outputs_for(mine), full_due=False, opts=r.opts)
        got = r._drift_for(state.settings, plan, outputs_for(mine)["endpoints"], now=1.0)
        assert all(state.settings.owns(n) for n in got)
        seen += got
    assert sorted(seen) == sorted(f"e{i}" for i in range(12))


def test_drift_of_an_endpoint_no_longer_declared_needs_no_repair():
    r = runner()
    items = [item("a")]
    v = validate_all(items)
    r._drifted[REGION] = {"gone": Drift("Service", "ns", "gone", "deleted", time.monotonic())}
    plan = plan_stack(S, v, outputs_for(items), full_due=False, opts=r.opts)
    assert r._drift_for(S, plan, outputs_for(items)["endpoints"], now=1.0) == []
    r._settle_drift(S, plan)
    assert r._drifted[REGION] == {}


def test_the_sweep_goes_through_every_endpoint_in_batches_and_skips_targeted_ones():
    items = [item(f"e{i}") for i in range(7)]
    v, out = validate_all(items), outputs_for(items)
    plan = plan_stack(S, v, out, full_due=False, opts=RunnerOptions())
    seen, cursor = [], ""
    for _ in range(3):
        batch = sweep_batch(plan, out["endpoints"], cursor, 3)
        seen.append(batch)
        cursor = batch[-1]
    assert seen == [["e0", "e1", "e2"], ["e3", "e4", "e5"], ["e6", "e0", "e1"]]
    plan.drifted = ["e4"]
    assert sweep_batch(plan, out["endpoints"], "e2", 3) == ["e3", "e5", "e6"]


def test_the_sweep_period_refreshes_every_endpoint_once_per_full_every():
    r = runner(full_every=700.0, sweep_batch=25)
    state = r.states[S.stack]
    state.outputs = outputs_for([item(f"e{i}") for i in range(100)])
    assert r._sweep_period(state) == 700.0 * 25 / 100
    r.full_every_for[REGION] = 100.0  # a region without a watch
    assert r._sweep_period(state) == 25.0
    state.outputs = outputs_for([item("e0")])
    assert r._sweep_period(state) == 100.0


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


def test_while_changes_arrive_a_full_reconcile_never_takes_the_last_free_worker():
    r = runner(overlap=True, parallel=3)
    r._last_change = time.monotonic()
    full = Plan(stack="x", region=REGION, desired={}, full=True)
    change = Plan(stack="y", region=REGION, desired={}, changed=["a"])
    assert r._may_start(full) and r._may_start(change)
    r._inflight["x"] = Operation(Future(), None, full, None, 0.0)
    assert r._may_start(full)  # two free workers: one may go to a full reconcile
    r._inflight["y"] = Operation(Future(), None, full, None, 0.0)
    assert not r._may_start(full) and r._may_start(change)  # the last free worker is for changes
    assert not r._may_start(Plan(stack="w", region=REGION, desired={}, swept=["b"]))  # a sweep alone waits too
    r._inflight["z"] = Operation(Future(), None, change, None, 0.0)
    assert not r._may_start(change)  # every worker busy: planned again by a later tick
    assert runner(overlap=True, parallel=1)._may_start(full)  # one worker: it must do everything
    assert runner(overlap=False, parallel=2)._may_start(full)  # ticks that wait start everything


def test_with_no_change_lately_background_work_uses_every_worker():
    from gco_infra.runner import CHANGES_LATELY

    r = runner(overlap=True, parallel=2)
    full = Plan(stack="x", region=REGION, desired={}, full=True, reason="first apply")
    r._inflight["w"] = Operation(Future(), None, full, None, 0.0)
    assert r._may_start(full, now=1000.0)  # a runner's first full reconcile: nothing to keep a worker for
    r._last_change = 1000.0
    assert not r._may_start(full, now=1000.0 + CHANGES_LATELY - 1)
    assert r._may_start(full, now=1000.0 + CHANGES_LATELY)  # quiet again, and stacks still wait for theirs
    for state in r.states.values():
        state.full_done = True
    # After the start, a full after a failure or a sweep never takes the worker the next change needs.
    assert not r._may_start(full, now=10**6)


def test_recent_removals_count_against_the_bound_across_ticks():
    from gco_infra.plan import removal_refusal

    opts = RunnerOptions(max_delete_fraction=0.1, max_delete_min=2, deletion_window=600.0)
    assert removal_refusal("s", 5, 100, opts) is None
    assert removal_refusal("s", 5, 95, opts, recent=5) is None  # 10 of the 100 there were
    refused = removal_refusal("s", 5, 90, opts, recent=10)
    assert refused and "10 already removed in the last 600s" in refused
    assert RunnerOptions().deletion_window == 0.0  # each tick on its own unless `run` sets a window
    r = runner(deletion_window=600.0)
    r._removals = [(0.0, "s.shard-0", "s", 4), (500.0, "s.shard-1", "s", 3), (900.0, "s", "s", 1)]
    assert r._recent_removals(now=1000.0) == {"s.shard-1": 3, "s": 4}


def test_background_work_waits_behind_changes_only_for_a_while():
    from gco_infra.runner import BACKGROUND_WAIT

    r = runner(overlap=True, parallel=2)
    sweep = Plan(stack="w", region=REGION, desired={}, swept=["b"])
    change = Plan(stack="y", region=REGION, desired={}, changed=["a"])
    r._inflight["y"] = Operation(Future(), None, change, None, 0.0)
    r._waiting["w"] = 100.0
    now = 100.0 + BACKGROUND_WAIT
    r._last_change = now - 1  # changes keep arriving
    assert r._deferred(sweep, now=now - 1)
    assert not r._may_start(sweep, deferred=r._deferred(sweep, now=now - 1), now=now - 1)
    assert not r._deferred(sweep, now=now)  # waited long enough: queues with changes
    assert r._may_start(sweep, deferred=r._deferred(sweep, now=now), now=now)
    assert not r._deferred(change, now=0.0)


# ---- an operation's own answers instead of reading the state back --------------------------------


class _Stack:
    """Stands in for automation.Stack: up() asks outputs() and info() afterwards, as the SDK's does."""

    def __init__(self) -> None:
        self.state_reads = 0

    def outputs(self):
        self.state_reads += 1
        return {"region": type("V", (), {"value": "from-state"})()}

    def info(self, show_secrets=True):
        self.state_reads += 1
        return "history"

    def up(self):
        return self.outputs(), self.info(False)


def test_an_update_answers_its_outputs_from_what_the_program_exported():
    stack = _Stack()
    captured = {"outputs": {"region": "r1", "endpoints": {"a": {"fingerprint": "f"}}}}
    with answered_by_the_operation(stack, captured):
        outputs, summary = stack.up()
    assert stack.state_reads == 0
    assert {k: v.value for k, v in outputs.items()} == captured["outputs"]
    assert summary.result == "succeeded"
    assert stack.outputs()["region"].value == "from-state" and stack.state_reads == 1  # restored afterwards


def test_without_the_programs_exports_the_state_answers():
    stack = _Stack()
    with answered_by_the_operation(stack, {}):
        outputs, _ = stack.up()
    assert outputs["region"].value == "from-state" and stack.state_reads == 1


def test_the_sdks_debug_messages_are_dropped_in_the_runners_processes(monkeypatch):
    import pulumi.log

    sent = []
    monkeypatch.setattr(pulumi.log, "debug", lambda *a, **k: sent.append(a))
    monkeypatch.setattr(pulumi.log, "warn", lambda *a, **k: sent.append(("warn",) + a))
    quiet_sdk_debug()
    pulumi.log.debug("registering resource: ty=kubernetes:apps/v1:Deployment")
    pulumi.log.warn('endpoint "x": keeping the last applied declaration')
    assert sent == [("warn", 'endpoint "x": keeping the last applied declaration')]


def test_a_due_sweep_goes_alone_and_joins_a_change_once_it_has_waited_long_enough():
    quiet = Plan(stack="w", region=REGION, desired={})
    busy = Plan(stack="w", region=REGION, desired={}, changed=["a"])
    assert not sweep_now(quiet, now=99.0, due=100.0)
    assert sweep_now(quiet, now=100.0, due=100.0)
    assert not sweep_now(busy, now=100.0, due=100.0)  # a sweep never slows a change...
    assert not sweep_now(busy, now=100.0 + BACKGROUND_WAIT - 1, due=100.0)
    assert sweep_now(busy, now=100.0 + BACKGROUND_WAIT, due=100.0)  # ...until churn would starve the backstop
    drifted = Plan(stack="w", region=REGION, desired={}, drifted=["b"])
    assert sweep_now(drifted, now=100.0 + BACKGROUND_WAIT, due=100.0)


def test_only_a_runners_start_refreshes_first():
    from gco_infra.runner import describe, refresh_first

    start = Plan(stack="s", region=REGION, desired={}, full=True, reason="full reconcile")
    assert refresh_first(start, forced=False, failed=False)
    assert not refresh_first(start, forced=True, failed=False)  # --full: every endpoint declared
    assert not refresh_first(start, forced=False, failed=True)  # the state may not say what a failure left
    assert not refresh_first(start, forced=False, failed=False, pending=2)  # nor what an interrupted update did
    for reason in ("first apply", "declaration version changed"):
        assert not refresh_first(replace(start, reason=reason), forced=False, failed=False)
    assert not refresh_first(replace(start, full=False), forced=False, failed=False)
    assert describe(replace(start, refresh_first=True)).startswith("full reconcile: refresh, then update")


def test_a_failure_makes_the_next_full_reconcile_declare_every_endpoint_until_one_succeeds():
    from gco_infra.plan import StackResult

    r = runner()
    state = r.states[S.stack]
    plan = Plan(stack=S.stack, region=REGION, desired={}, full=True, reason="full reconcile")
    op = Operation(Future(), state, plan, validate_all([]), 0.0)
    r._complete(op, StackResult(stack=S.stack, region=REGION, action="failed"), None)
    assert state.failed and state.last_full == 0.0
    r._complete(op, StackResult(stack=S.stack, region=REGION, action="full", outputs={"endpoints": {}}), None)
    assert not state.failed and not state.forced and state.full_done


class _Event:
    def __init__(self, op, urn):
        from types import SimpleNamespace

        self.res_outputs_event = SimpleNamespace(metadata=SimpleNamespace(op=op, urn=urn))


def test_the_refresh_names_the_endpoints_whose_objects_changed_or_went():
    from pulumi.automation import OpType

    from gco_infra.plan import endpoint_urns
    from gco_infra.runner import refresh_all

    a = endpoint_urns("s", "a", {m.DEPLOYMENT: "a", m.SERVICE: "a", m.INGRESS: "inference-a"})
    b = endpoint_urns("s", "b", {m.DEPLOYMENT: "b", m.SERVICE: "b"})
    events = [_Event(OpType.UPDATE, "urn:pulumi:s::gco-infra::pulumi:pulumi:Stack::gco-infra-s"),  # the outputs
              _Event(OpType.SAME, a[0]), _Event(OpType.SAME, a[1]), _Event(OpType.UPDATE, a[2]),
              _Event(OpType.DELETE, a[3]), _Event(OpType.SAME, b[1]), _Event("same", b[2])]
    seen, asked = [], {}

    class Stack:
        def refresh(self, **kw):
            asked.update(kw)
            for e in events:
                kw["on_event"](e)

    found = refresh_all(Stack(), lambda: None, seen.append, RunnerOptions(pulumi_parallel=7), lambda: {})
    assert found == {"a": ["a changed", "inference-a deleted"]}
    assert seen == events  # the operation's own handler sees every event too
    assert asked["run_program"] is True and asked["parallel"] == 7


class _Watch:
    def __init__(self, lists):
        self.lists, self.forgotten, self.errors = lists, False, {}

    def first_lists(self):
        return self.lists

    def forget_first_lists(self):
        self.forgotten = True


def test_a_start_with_a_watch_is_judged_from_its_first_lists_and_repairs_only_what_drifted():
    from gco_infra.drift import owned_by_us

    items = [item("a"), item("b"), item("c", env={"NEW": "1"})]
    r = runner()
    state = r.states[S.stack]
    state.outputs, state.outputs_loaded = outputs_for([item("a"), item("b"), item("c")]), True
    ours = owned_by_us([{"manager": "pulumi-kubernetes-1", "operation": "Apply",
                         "fieldsV1": {"f:spec": {"f:template": {}}}, "time": "2025-01-01T00:00:00Z"}])
    state.recorded = {("Deployment", "gco-inference", n): (n, ours) for n in "abc"}
    listed = {("Deployment", "gco-inference", n): [{"manager": "pulumi-kubernetes-1", "operation": "Apply",
                                                     "fieldsV1": {"f:spec": {"f:template": {}}}}] for n in "ac"}
    validated = validate_all(items)
    plan = plan_stack(S, validated, state.outputs, full_due=True, opts=r.opts)
    plan.refresh_first = True
    r.drift[REGION] = _Watch(None)
    assert not r._judged_by_the_watch(state, plan, 100.0) and plan.full  # lists not done: nothing decided
    r.drift[REGION] = _Watch(listed)
    assert r._judged_by_the_watch(state, plan, 100.0)
    # b's Deployment is gone; c changed in the table (a targeted update anyway); a is as recorded
    assert (plan.full, plan.refresh_first, plan.changed, plan.drifted) == (False, False, ["c"], ["b"])
    assert plan.drift_seen["b"].reason == "deleted"
    assert set(r._drifted[REGION]) == {"b"}  # kept until the repair starts, so a deferred one is planned again
    assert state.full_done and state.last_full == 100.0 and r._orphan_check[REGION]
    assert r.drift[REGION].forgotten  # the region's only stack: nothing judges from the lists any more


def test_a_new_declaration_version_skips_its_refresh_only_when_the_watch_found_nothing_drifted():
    from gco_infra.drift import owned_by_us
    from gco_infra.runner import describe, new_declaration

    r = runner()
    state = r.states[S.stack]
    state.outputs, state.outputs_loaded = outputs_for([item("a"), item("b")]), True
    state.outputs["declarationVersion"] = "an older one"
    apply = [{"manager": "pulumi-kubernetes-1", "operation": "Apply", "fieldsV1": {"f:spec": {}}}]
    state.recorded = {("Deployment", "gco-inference", n): (n, owned_by_us(apply)) for n in "ab"}
    validated = validate_all([item("a"), item("b")])

    def planned():
        plan = plan_stack(S, validated, state.outputs, full_due=False, opts=r.opts)
        assert (plan.full, plan.reason) == (True, "declaration version changed")
        return plan

    plan = planned()
    assert new_declaration(plan, forced=False, failed=False)
    assert not new_declaration(plan, forced=True, failed=False)  # a person's --full refreshes
    assert not new_declaration(plan, forced=False, failed=True)  # so does the reconcile after a failure
    assert not new_declaration(plan, forced=False, failed=False, pending=1)
    r.drift[REGION] = _Watch({k: apply for k in state.recorded})
    assert r._judged_by_the_watch(state, plan, 5.0)
    assert plan.full and plan.judged and not plan.refresh_first  # every endpoint, no refresh
    assert describe(plan).startswith("full up without a refresh")
    assert not state.full_done and not r.drift[REGION].forgotten  # settled when the update ends
    # b's Deployment gone while no runner watched: every endpoint with a refresh
    r.drift[REGION] = _Watch({("Deployment", "gco-inference", "a"): apply})
    plan = planned()
    assert r._judged_by_the_watch(state, plan, 5.0) and plan.full and not plan.judged
    # what the watch saw since its lists counts too, and an update without a refresh leaves it for a repair
    r.drift[REGION] = _Watch({k: apply for k in state.recorded})
    r._drifted[REGION] = {"b": Drift("Deployment", "gco-inference", "b", "deleted", 4.0)}
    plan = planned()
    assert r._judged_by_the_watch(state, plan, 5.0) and not plan.judged
    r._drifted[REGION] = {"b": Drift("Deployment", "gco-inference", "b", "deleted", 6.0)}
    r._settle_drift(S, replace(plan, judged=True))
    assert "b" in r._drifted[REGION]


def test_a_start_trusts_the_checkpoint_only_after_a_succeeded_update_or_a_refresh_that_changed_nothing():
    from gco_infra.plan import trusted_checkpoint

    assert trusted_checkpoint({"kind": "update", "result": "succeeded", "resourceChanges": {"update": 3}})
    assert trusted_checkpoint({"kind": "refresh", "result": "succeeded", "resourceChanges": {"same": 40, "update": 0}})
    assert not trusted_checkpoint({"kind": "refresh", "result": "succeeded", "resourceChanges": {"same": 39, "update": 1}})
    assert not trusted_checkpoint({"kind": "update", "result": "failed"})
    assert not trusted_checkpoint({"kind": "update", "result": "in-progress"})
    assert not trusted_checkpoint({"kind": "import", "result": "succeeded"})
    assert not trusted_checkpoint(None)  # no history, or it could not be read


def test_the_judged_start_keeps_a_kept_invalid_records_drift():
    from gco_infra.drift import owned_by_us

    r = runner()
    state = r.states[S.stack]
    state.outputs, state.outputs_loaded = outputs_for([item("a"), item("k")]), True
    ours = owned_by_us([{"manager": "pulumi-kubernetes-1", "operation": "Apply", "fieldsV1": {"f:spec": {}}}])
    state.recorded = {("Deployment", "gco-inference", n): (n, ours) for n in "ak"}
    r.drift[REGION] = _Watch({("Deployment", "gco-inference", "a"): [
        {"manager": "pulumi-kubernetes-1", "operation": "Apply", "fieldsV1": {"f:spec": {}}}]})
    items = [item("a"), {"endpoint_name": "k", "desired_state": "running", "target_regions": [REGION], "spec": {}}]
    plan = plan_stack(S, validate_all(items), state.outputs, full_due=True, opts=r.opts)
    assert plan.kept == ["k"]
    assert r._judged_by_the_watch(state, plan, 1.0) and plan.drifted == ["k"]


def test_only_a_ticks_start_reads_the_stacks_history_and_only_once(monkeypatch):
    from types import SimpleNamespace

    from gco_infra import runner as runner_module

    asked = []
    root = {"urn": "urn:pulumi:s::gco-infra::pulumi:pulumi:Stack::gco-infra-s", "type": "pulumi:pulumi:Stack",
            "outputs": {"region": REGION, "endpoints": {}}}
    ws = SimpleNamespace(list_stacks=lambda: [SimpleNamespace(name=S.stack)],
                         export_stack=lambda name: SimpleNamespace(deployment={"resources": [root]}))
    monkeypatch.setattr(runner_module.state_backend, "checkpoint_token", lambda stack, env: None)
    monkeypatch.setattr(runner_module.state_backend, "secrets_mismatch", lambda stack, dep, env: None)
    monkeypatch.setattr(runner_module.state_backend, "last_operation",
                        lambda stack, env: asked.append(stack) or {"kind": "update", "result": "failed"})
    r = runner()
    monkeypatch.setattr(r, "_workspace", lambda: ws)
    state = r.states[S.stack]
    r.load_outputs(state)  # a guard, the preview: no history
    assert asked == [] and not state.failed and state.outputs["region"] == REGION
    state.outputs_loaded = False
    assert r._load_all([state]) == [None]
    assert asked == [S.stack] and state.failed  # the last update failed: the start declares everything
    state.outputs_loaded, state.failed = False, False
    r._load_all([state])
    assert asked == [S.stack]  # read once per runner


def test_a_full_asked_while_a_starts_refresh_ran_still_declares_everything():
    from gco_infra.plan import StackResult

    r = runner()
    state = r.states[S.stack]
    state.forced = True
    start = Plan(stack=S.stack, region=REGION, desired={}, full=True, reason="full reconcile", refresh_first=True)
    r._complete(Operation(Future(), state, start, validate_all([]), 5.0),
                StackResult(stack=S.stack, region=REGION, action="full", outputs={"endpoints": {}}), None)
    assert state.forced and state.last_full == 0.0 and not state.full_done


def test_the_watch_repairs_a_kept_invalid_records_last_declaration():
    r = runner()
    state = r.states[S.stack]
    state.outputs = outputs_for([item("a"), item("k")])
    items = [item("a"), {"endpoint_name": "k", "desired_state": "running", "target_regions": [REGION], "spec": {}}]
    plan = plan_stack(S, validate_all(items), state.outputs, full_due=False, opts=r.opts)
    r._drifted[REGION] = {"k": Drift("Deployment", "gco-inference", "k", "deleted", 1.0)}
    assert r._drift_for(S, plan, state.outputs["endpoints"], 2.0) == ["k"]
