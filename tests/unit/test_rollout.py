"""Rollout decisions (gco_infra/rollout.py): which revision each region may run, and the gate."""

from __future__ import annotations

from dataclasses import replace

from hypothesis import given, settings, strategies as st

from gco_infra import rollout
from gco_infra.endpoint import (Validated, config_rollout_policy, endpoint_to_item, parse_endpoint, spec_revision,
                                validate_all)
from gco_infra.manifests import REVISION_ANNOTATION, ClusterSettings, declaration

POLICY = {"waves": [["r1"], ["r2", "r3"]], "bake_seconds": 60, "unready_limit_seconds": 300}


def item(image="img:1", policy=POLICY, statuses=None, state=None, **extra):
    it = {"endpoint_name": "ep", "desired_state": "running", "target_regions": ["r1", "r2", "r3"],
          "spec": {"image": image, "gpu_count": 0}, **extra}
    if policy is not None:
        it["rollout_policy"] = policy
    if statuses is not None:
        it["region_status"] = statuses
    if state is not None:
        it["rollout"] = rollout.state_to_item(state)
    return it


def ep_of(it):
    result = parse_endpoint(it)
    assert result.ok, result.errors
    return result.endpoint


def healthy(rev, **kw):
    return {"state": "running", "replicas_ready": 1, "replicas_desired": 1, "revision": rev, **kw}


def run(statuses_by_region, it, state, now):
    ep = ep_of({**it, "region_status": statuses_by_region})
    return rollout.step(ep, ep.rollout_policy, state, endpoint_to_item(ep)["spec"], now)


# ---- the policy and the revision ---------------------------------------------------------------------------------


def test_policy_errors_name_the_endpoint_and_field():
    bad = parse_endpoint(item(policy={"waves": [["r1"], ["r1", "Bad Region"]], "bake_seconds": [1], "speed": 3}))
    assert bad.endpoint is None
    text = "\n".join(bad.errors)
    assert 'endpoint "ep": rollout_policy.waves[1][0] names r1 a second time' in text
    assert "rollout_policy.waves[1][1] must be a region name" in text
    assert "rollout_policy.bake_seconds must be one number or one per wave (2), got 1" in text
    assert "rollout_policy.speed is not a rollout policy field" in text
    assert parse_endpoint(item(policy={"waves": []})).errors == (
        'endpoint "ep": rollout_policy.waves must list at least one wave of regions',)


def test_stack_default_policy_from_config_text():
    policy, problems = config_rollout_policy('{"waves": [["r1"]], "bake_seconds": "30"}')
    assert problems == [] and policy.waves == (("r1",),) and policy.bake_seconds == (30,)
    assert config_rollout_policy({"waves": "r1"})[1] == ["gco:rolloutPolicy.waves must be a list, got str"]


def test_revision_is_of_the_validated_spec():
    a = ep_of(item())
    b = ep_of({**item(), "spec": {"image": "img:1", "gpu_count": "0", "replicas": 1}})
    assert spec_revision(a) == spec_revision(b)
    assert spec_revision(a) != spec_revision(ep_of(item(image="img:2")))
    assert spec_revision(a) == spec_revision(replace(a, rollout_policy=None, desired_state="stopped"))


def test_records_without_a_policy_declare_exactly_as_before():
    it = item(policy=None)
    validated = validate_all([it])
    view = rollout.region_view(validated, "r2", {"ep": it}, lambda: {"ep": endpoint_to_item(ep_of(item(image="old:1", policy=None)))}, None)
    assert view is validated
    objects, _ = declaration(view.endpoints["ep"], "r2", ClusterSettings())
    assert REVISION_ANNOTATION not in objects["deployment"]["metadata"]["annotations"]


# ---- which revision a region declares ------------------------------------------------------------------------------


def declared(it, region, kept_image=None, default=None):
    validated = validate_all([it])
    kept = {} if kept_image is None else {"ep": endpoint_to_item(ep_of(item(image=kept_image)))}
    return rollout.region_view(validated, region, {"ep": it}, lambda: kept, default).endpoints.get("ep")


def test_an_unrecorded_change_reaches_the_first_wave_only():
    it = item(image="img:2")
    new = spec_revision(ep_of(it))
    first = declared(it, "r1", kept_image="img:1")
    assert (first.spec.image, first.revision) == ("img:2", new)
    later = declared(it, "r2", kept_image="img:1")
    assert later.spec.image == "img:1" and later.revision == spec_revision(ep_of(item(image="img:1")))
    objects, _ = declaration(later, "r2", ClusterSettings())
    assert objects["deployment"]["metadata"]["annotations"][REVISION_ANNOTATION] == later.revision


def test_a_region_where_nothing_runs_takes_the_current_revision():
    assert declared(item(image="img:2"), "r3").spec.image == "img:2"


def test_recorded_rollout_decides_and_kept_specs_come_from_the_table():
    old, new = ep_of(item(image="img:1")), ep_of(item(image="img:2"))
    r_old, r_new = spec_revision(old), spec_revision(new)
    state = rollout.RolloutState(revision=r_new, regions={"r1": r_new, "r2": r_old}, base={"r1": r_old, "r2": r_old},
                                 specs={r_old: endpoint_to_item(old)["spec"], r_new: endpoint_to_item(new)["spec"]})
    it = item(image="img:2", state=state)
    # r2's stack applied something else by hand: the table's spec for its allowed revision wins
    assert declared(it, "r2", kept_image="img:9").spec.image == "img:1"
    assert declared(it, "r1", kept_image="img:1").spec.image == "img:2"
    failed = rollout.rollback(state, 0, "failed", "bad")
    assert failed.regions["r1"] == r_old and r_new in failed.failed
    it = item(image="img:2", state=failed)
    assert declared(it, "r1", kept_image="img:2").spec.image == "img:1"
    assert declared(it, "r3").spec.image == "img:1"  # failed: a region where nothing runs gets a good revision


def test_urgent_goes_everywhere_and_stop_is_never_held_back():
    it = item(image="img:2", policy={**POLICY, "urgent": True})
    assert declared(it, "r3", kept_image="img:1").spec.image == "img:2"
    stopped = declared({**item(image="img:1"), "desired_state": "stopped"}, "r3", kept_image="img:1")
    assert stopped.desired_state == "stopped"


def test_stack_default_policy_applies_to_records_without_one():
    policy, _ = config_rollout_policy(POLICY)
    it = item(image="img:2", policy=None)
    assert declared(it, "r2", kept_image="img:1", default=policy).spec.image == "img:1"
    assert declared(it, "r2", kept_image="img:1").spec.image == "img:2"


def test_unreadable_rollout_state_keeps_what_runs():
    it = {**item(image="img:2"), "rollout": {"revision": 5}}
    assert declared(it, "r1", kept_image="img:1").spec.image == "img:1"
    assert rollout.read_state(it)[1] == "rollout.revision must be a revision string"


# ---- the gate ------------------------------------------------------------------------------------------------------


def test_first_deploy_and_a_spec_every_region_runs_complete_at_once():
    s = run({}, item(), None, 100.0)
    assert s.event == "completed" and s.state.phase == "complete"
    assert set(s.state.regions) == {"r1", "r2", "r3"}


def test_good_rollout_goes_wave_by_wave_after_its_bake_time():
    old, it = ep_of(item(image="img:1")), item(image="img:2")
    r_old, r_new = spec_revision(old), spec_revision(ep_of(it))
    done = rollout.RolloutState(revision=r_old, phase="complete", regions={r: r_old for r in ("r1", "r2", "r3")},
                                specs={r_old: endpoint_to_item(old)["spec"]}, seq=4)
    statuses = {r: healthy(r_old) for r in ("r1", "r2", "r3")}
    s = run(statuses, it, done, 1000.0)
    assert s.event == "started" and s.state.seq == 5 and s.state.regions == {"r1": r_new, "r2": r_old, "r3": r_old}
    assert s.state.base == done.regions and set(s.state.specs) == {r_old, r_new}
    state = s.state
    assert run(statuses, it, state, 1010.0).state is None  # r1 still runs the old revision
    statuses["r1"] = healthy(r_new)
    state = run(statuses, it, state, 1020.0).state
    assert state.healthy_since is not None and state.wave == 0
    assert run(statuses, it, state, 1079.0).state is None  # baking
    state = run(statuses, it, state, 1080.0).state
    assert state.wave == 1 and state.regions == {"r1": r_new, "r2": r_new, "r3": r_new}
    statuses["r2"] = healthy(r_new)
    state = run(statuses, it, state, 1090.0).state  # r3 not yet: only r2's timer is dropped
    assert state.wave == 1 and set(state.unhealthy) == {"r3"} and state.healthy_since is None
    statuses["r3"] = healthy(r_new)
    state = run(statuses, it, state, 1100.0).state
    state = run(statuses, it, state, 1160.0).state
    assert state.phase == "complete" and state.message == "every wave passed"


def test_a_wave_that_goes_unhealthy_restarts_its_bake_time():
    it = item(image="img:2")
    r_new = spec_revision(ep_of(it))
    state = rollout.RolloutState(revision=r_new, regions={"r1": r_new}, wave_started="1970-01-01T00:16:40Z",
                                 healthy_since="1970-01-01T00:16:40Z", seq=1)
    s = run({"r1": healthy(r_new, replicas_ready=0, state="updating")}, it, state, 1010.0)
    assert s.event == "unhealthy" and s.state.healthy_since is None


def test_withdrawn_ingress_fails_the_wave_and_rolls_back():
    old, it = ep_of(item(image="img:1")), item(image="img:2")
    r_old, r_new = spec_revision(old), spec_revision(ep_of(it))
    state = rollout.RolloutState(revision=r_new, regions={"r1": r_new, "r2": r_old, "r3": r_old},
                                 base={"r1": r_old, "r2": r_old, "r3": r_old},
                                 specs={r_old: endpoint_to_item(old)["spec"]}, wave_started="1970-01-01T00:16:40Z", seq=2,
                                 started="1970-01-01T00:16:40Z", unhealthy={"r1": "1970-01-01T00:16:40Z"})
    # withdrawn before the rollout (the old revision was dead): the new one has to come up first
    dead_before = healthy(r_new, ingress="withdrawn", replicas_ready=0, unready_since="1970-01-01T00:10:00Z")
    assert run({"r1": dead_before}, it, state, 1001.0).state is None
    died = healthy(r_new, ingress="withdrawn", replicas_ready=0, unready_since="1970-01-01T00:16:45Z")
    s = run({"r1": died}, it, state, 1001.0)
    assert s.event == "failed" and s.state.phase == "failed" and s.state.failed == (r_new,)
    assert s.state.regions == {"r1": r_old, "r2": r_old, "r3": r_old}
    assert "r1: Ingress withdrawn" in s.state.message
    assert run({}, it, s.state, 2000.0).state is None  # not tried again until the spec changes


def test_a_region_unhealthy_past_the_limit_fails_and_one_without_a_known_base_is_named():
    it = item(image="img:2")
    r_new = spec_revision(ep_of(it))
    state = rollout.RolloutState(revision=r_new, regions={"r1": r_new}, base={"r1": "unknown1"},
                                 wave_started="1970-01-01T00:00:00Z", seq=2, unhealthy={"r1": "1970-01-01T00:00:00Z"})
    assert run({"r1": healthy("other")}, it, state, 299.0).state is None
    s = run({"r1": healthy("other")}, it, state, 300.0)
    assert s.event == "failed" and "r1: not healthy on revision" in s.state.message
    assert "r1 keep it: the revision they ran before is not known" in s.state.message


def test_steering():
    it = item(image="img:2")
    r_new = spec_revision(ep_of(it))
    state = rollout.RolloutState(revision=r_new, regions={"r1": r_new}, wave_started="1970-01-01T00:16:40Z",
                                 healthy_since="1970-01-01T00:16:40Z", seq=1)
    paused = rollout.pause(state, 1000, "ana")
    assert paused.phase == "paused" and paused.seq == 2
    assert run({"r1": healthy(r_new)}, it, paused, 5000.0).state is None  # a paused rollout stays
    resumed = rollout.resume(paused, 1100, "ana")
    assert resumed.wave_started == "1970-01-01T00:18:20Z"
    approved = rollout.approve(resumed, 1100, "ana")
    s1 = run({"r1": healthy(r_new)}, it, approved, 1101.0)  # healthy, and approved: no bake time
    assert s1.event == "advanced" and s1.state.wave == 1 and s1.state.seq == approved.seq + 1
    try:
        rollout.resume(state, 0, "ana")
        raise AssertionError("resume of a progressing rollout must be refused")
    except rollout.SteerError as exc:
        assert "not paused" in str(exc)


def test_a_record_edited_during_a_rollout_starts_over_from_what_regions_may_run():
    old, mid, it = ep_of(item(image="img:1")), ep_of(item(image="img:2")), item(image="img:3")
    r_old, r_mid, r_new = spec_revision(old), spec_revision(mid), spec_revision(ep_of(it))
    state = rollout.RolloutState(revision=r_mid, regions={"r1": r_mid, "r2": r_old, "r3": r_old},
                                 specs={r_old: endpoint_to_item(old)["spec"], r_mid: endpoint_to_item(mid)["spec"]}, seq=3)
    s = run({}, it, state, 10.0)
    assert s.event == "started" and s.state.wave == 0
    assert s.state.regions == {"r1": r_new, "r2": r_old, "r3": r_old}
    assert s.state.base == {"r1": r_mid, "r2": r_old, "r3": r_old}
    assert set(s.state.specs) == {r_old, r_mid, r_new}


def test_state_round_trips_through_the_table_shape():
    state = rollout.RolloutState(revision="abc", phase="paused", wave=1, regions={"r1": "abc"}, base={"r1": "x"},
                                 specs={"x": {"image": "i"}}, failed=("z",), approved=1, seq=9, message="m",
                                 wave_started="2026-01-01T00:00:00Z")
    back, problem = rollout.read_state({"rollout": rollout.state_to_item(state)})
    assert problem is None and back == state


# ---- property: the waves' order holds whatever the regions report ---------------------------------------------------


REGIONS = ("r1", "r2", "r3")


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(REGIONS), st.sampled_from(("healthy", "old", "sick", "withdrawn")),
                          st.integers(min_value=1, max_value=400)), min_size=1, max_size=40))
def test_no_region_gets_the_revision_before_every_earlier_wave_baked(events):
    old, it = ep_of(item(image="img:1")), item(image="img:2")
    r_old, r_new = spec_revision(old), spec_revision(ep_of(it))
    statuses = {r: healthy(r_old) for r in REGIONS}
    state = rollout.RolloutState(revision=r_old, phase="complete", regions={r: r_old for r in REGIONS},
                                 specs={r_old: endpoint_to_item(old)["spec"]})
    now = 1000.0
    healthy_since: dict[int, float] = {}
    for region, kind, dt in events:
        now += dt
        statuses[region] = {"healthy": healthy(r_new), "old": healthy(r_old),
                            "sick": healthy(r_new, replicas_ready=0, state="updating"),
                            "withdrawn": healthy(r_new, replicas_ready=0, ingress="withdrawn")}[kind]
        s = run(statuses, it, state, now)
        if s.state is None:
            continue
        before = state
        state = s.state
        if s.event == "advanced":
            # the wave that passed was healthy, since its timer started, for its bake time
            assert before.healthy_since is not None
            assert now - rollout._parse_iso(before.healthy_since) >= 60 - 1
        waves = rollout.waves_for(ep_of(it).rollout_policy, REGIONS)
        allowed_waves = {i for i, w in enumerate(waves) for r in w if state.regions.get(r) == r_new}
        if state.phase in ("failed", "aborted"):
            assert not allowed_waves, "a failed rollout leaves no region on its revision (the base is known)"
            break
        assert all(i <= state.wave for i in allowed_waves)
    del healthy_since


def test_a_wave_keeps_its_own_bake_time_when_waves_without_targets_are_left_out():
    policy, _ = config_rollout_policy({"waves": [["a"], ["b"], ["c"]], "bake_seconds": [60, 600, 0]})
    assert rollout.waves_for(policy, ["b", "c", "z"]) == [("b",), ("c",), ("z",)]
    assert rollout.bakes_for(policy, ["b", "c", "z"]) == [600, 0, 0]


def test_a_kept_spec_that_no_longer_validates_is_never_a_removal():
    it = item(image="img:2")
    kept = endpoint_to_item(ep_of(item(image="img:1")))
    kept["spec"]["replicas"] = -5  # as if the rules tightened since it was applied
    view = rollout.region_view(validate_all([it]), "r2", {"ep": it}, lambda: {"ep": kept}, None)
    assert view.endpoints["ep"].spec.image == "img:2"


def test_a_rollout_recorded_when_its_first_wave_already_runs_it_starts_baking_in_the_same_write():
    old, it = ep_of(item(image="img:1")), item(image="img:2")
    r_old, r_new = spec_revision(old), spec_revision(ep_of(it))
    done = rollout.RolloutState(revision=r_old, phase="complete", regions={r: r_old for r in ("r1", "r2", "r3")},
                                specs={r_old: endpoint_to_item(old)["spec"]}, seq=7)
    s = run({"r1": healthy(r_new), "r2": healthy(r_old), "r3": healthy(r_old)}, it, done, 1000.0)
    assert s.state.seq == 8 and s.state.healthy_since == "1970-01-01T00:16:40Z" and s.state.wave == 0
    assert rollout.due(ep_of(it), ep_of(it).rollout_policy, s.state) == 1060.0
    assert s.state.unhealthy == {}
    waiting = replace(s.state, healthy_since=None, unhealthy={"r1": "1970-01-01T00:16:40Z"})
    assert rollout.due(ep_of(it), ep_of(it).rollout_policy, waiting) == 1000.0 + 300  # the unready limit


def progressing(wave=1, **kw):
    """A rollout of img:2 over r1 | r2, r3, in ``wave`` (from 0), recorded at t=1000."""
    old, it = ep_of(item(image="img:1")), item(image="img:2")
    r_old, r_new = spec_revision(old), spec_revision(ep_of(it))
    regions = {"r1": r_new, "r2": r_new if wave else r_old, "r3": r_new if wave else r_old}
    state = rollout.RolloutState(
        revision=r_new, regions=regions, base={r: r_old for r in ("r1", "r2", "r3")},
        specs={r_old: endpoint_to_item(old)["spec"], r_new: endpoint_to_item(ep_of(it))["spec"]},
        wave=wave, wave_started="1970-01-01T00:16:40Z", started="1970-01-01T00:16:40Z", seq=5,
        waves=(("r1",), ("r2", "r3")), bakes=(60, 60),
        unhealthy={r: "1970-01-01T00:16:40Z" for r in (("r2", "r3") if wave else ("r1",))}, **kw)
    return it, state, r_old, r_new


def test_an_earlier_wave_that_dies_later_fails_the_rollout_everywhere():
    it, state, r_old, r_new = progressing(wave=1)
    died = healthy(r_new, ingress="withdrawn", replicas_ready=0, unready_since="1970-01-01T00:17:00Z")
    s = run({"r1": died, "r2": healthy(r_new), "r3": healthy(r_new)}, it, state, 1100.0)
    assert s.event == "failed" and "r1: Ingress withdrawn" in s.state.message
    assert s.state.regions == {"r1": r_old, "r2": r_old, "r3": r_old}


def test_a_blip_shorter_than_the_limit_is_not_a_failure_a_longer_one_is():
    it, state, r_old, r_new = progressing(wave=1)
    blip = healthy(r_new, replicas_ready=1, replicas_desired=3)  # the HPA scaled up: 1 of 3 ready
    s = run({"r1": blip, "r2": healthy(r_new), "r3": healthy(r_new)}, it, state, 5000.0)
    assert s.event in ("unhealthy", "healthy") and s.state.unhealthy == {"r1": "1970-01-01T01:23:20Z"}
    assert run({"r1": blip, "r2": healthy(r_new), "r3": healthy(r_new)}, it, s.state, 5299.0).state is None
    assert run({"r1": blip, "r2": healthy(r_new), "r3": healthy(r_new)}, it, s.state, 5300.0).event == "failed"


def test_a_stopped_endpoint_holds_its_wave_and_its_timers_start_again_when_it_runs():
    it, state, r_old, r_new = progressing(wave=0)
    stopped = {**it, "desired_state": "stopped"}
    statuses = {"r1": {"state": "stopped", "replicas_ready": 0, "replicas_desired": 0, "revision": r_new}}
    s = run(statuses, stopped, state, 5000.0)
    assert s.event == "held" and s.state.held and s.state.wave == 0
    assert run(statuses, stopped, s.state, 90000.0).state is None  # never advances while stopped
    again = run({"r1": healthy(r_new, replicas_ready=0, state="creating")}, it, s.state, 90000.0)
    assert again.event in ("resumed", "unhealthy") and not again.state.held
    assert again.state.wave_started == "1970-01-02T01:00:00Z" and again.state.phase == "progressing"


def test_a_canary_that_is_not_ready_keeps_the_wave_unhealthy():
    it, state, r_old, r_new = progressing(wave=0)
    it = {**it, "spec": {**it["spec"], "canary": {"image": "img:c", "weight": 10}}}
    r_new = spec_revision(ep_of(it))
    state = replace(state, revision=r_new, regions={**state.regions, "r1": r_new})
    dead_canary = healthy(r_new, canary_ready=0, canary_desired=1)
    assert run({"r1": dead_canary}, it, state, 1010.0).state is None
    s = run({"r1": healthy(r_new, canary_ready=1, canary_desired=1)}, it, state, 1010.0)
    assert s.event == "healthy"


def test_urgent_midway_completes_everywhere_and_a_retargeted_region_gets_what_passed():
    it, state, r_old, r_new = progressing(wave=0)
    urgent = {**it, "rollout_policy": {**POLICY, "urgent": True}}
    s = run({}, urgent, state, 1010.0)
    assert s.event == "completed" and s.state.regions == {"r1": r_new, "r2": r_new, "r3": r_new}
    done = replace(s.state, regions={"r1": r_new, "r2": r_new})  # r3 was untargeted, then targeted again
    assert run({}, it, done, 1020.0).state.regions["r3"] == r_new


def test_targets_edited_midway_never_move_the_wave_onto_other_regions():
    it, state, r_old, r_new = progressing(wave=0)
    narrowed = {**it, "target_regions": ["r2", "r3"]}  # wave 1's only region is no longer targeted
    s = run({"r2": healthy(r_old), "r3": healthy(r_old)}, narrowed, state, 1010.0)
    assert s.event == "advanced" and s.state.wave == 1 and s.state.regions["r2"] == r_new


def test_a_state_without_seq_is_unreadable():
    raw = rollout.state_to_item(rollout.RolloutState(revision="abc", seq=1))
    del raw["seq"]
    assert rollout.read_state({"rollout": raw}) == (None, "rollout.seq is missing (every write of the rollout sets it)")


def test_a_policy_added_to_an_unchanged_spec_waits_for_revisions_then_completes():
    it = item(image="img:1")
    r1 = spec_revision(ep_of(it))
    unannotated = {r: {"state": "running", "replicas_ready": 1, "replicas_desired": 1} for r in ("r1", "r2", "r3")}
    assert run(unannotated, it, None, 1000.0).state is None
    s = run({r: healthy(r1) for r in ("r1", "r2", "r3")}, it, None, 1010.0)
    assert s.event == "completed" and s.state.phase == "complete"


def test_stacks_reading_one_table_must_carry_the_same_default_policy(tmp_path, monkeypatch):
    from gco_infra.program import rollout_policy_disagreement

    for var in ("GCO_TABLE", "GCO_DYNAMODB_ENDPOINT"):  # an engine operation in this process may have set them
        monkeypatch.delenv(var, raising=False)

    (tmp_path / "stacks").mkdir()

    def stack(name, region, policy=None):
        lines = ["config:", f"  gco:region: {region}", "  gco:kubeconfig: /nowhere", "  gco:table: t1",
                 "  gco:tableRegion: us-east-1"]
        if policy:
            lines.append(f"  gco:rolloutPolicy: '{policy}'")
        (tmp_path / "stacks" / f"Pulumi.{name}.yaml").write_text("\n".join(lines) + "\n")

    stack("a", "r1", '{"waves": [["r1"], ["r2"]]}')
    stack("b", "r2", '{"waves": [["r1"], ["r2"]]}')
    assert rollout_policy_disagreement(tmp_path) is None
    stack("c", "r3")
    why = rollout_policy_disagreement(tmp_path)
    assert why is not None and "set: a, b; unset: c" in why and "table t1" in why


def test_a_rollout_paused_for_longer_than_the_unready_limit_is_not_failed_on_resume():
    it, state, r_old, r_new = progressing(wave=0)
    paused = rollout.pause(state, 1010, "ana")
    resumed = rollout.resume(paused, 90000, "ana")
    assert resumed.unhealthy == {"r1": "1970-01-02T01:00:00Z"}
    assert run({"r1": healthy(r_old)}, it, resumed, 90010.0).state is None  # still coming up: not failed
